"""Connections for one CLI invocation: a deployed suite (addresses from flags or
IDEALRT_* env), or the embedded suite started in this process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from idealrt.clients.metrics import MetricsClient
from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.serving import ServingClient
from idealrt.clients.store import StoreClient

__all__ = ["Session", "open_session"]


@dataclass
class Session:
    profiler: ProfilerClient
    metrics: MetricsClient
    store: StoreClient
    serving: ServingClient | None
    addresses: dict[str, str]
    embedded: bool


@contextlib.contextmanager
def open_session(
    *,
    data_dir: Path,
    store_url: str = "",
    profiler: str = "",
    metrics: str = "",
    store: str = "",
    serving_target: str = "",
) -> Iterator[Session]:
    profiler = profiler or os.environ.get("IDEALRT_PROFILER", "")
    metrics = metrics or os.environ.get("IDEALRT_METRICS", "")
    store = store or os.environ.get("IDEALRT_STORE", "")
    if profiler and metrics and store:
        clients = (ProfilerClient(profiler), MetricsClient(metrics), StoreClient(store))
        try:
            yield Session(
                *clients,
                serving=None,
                embedded=False,
                addresses={"profiler": profiler, "metrics": metrics, "store": store},
            )
        finally:
            for c in clients:
                c.close()
        return
    if profiler or metrics or store:
        raise SystemExit("give all of --profiler, --metrics and --store (or none: embedded)")
    from idealrt.services.suite import start_suite

    with start_suite(
        data_dir=data_dir, store_url=store_url, serving_target=serving_target
    ) as suite:
        pc, mc, sc = (
            ProfilerClient(suite.profiler),
            MetricsClient(suite.metrics),
            StoreClient(suite.store),
        )
        sv = ServingClient(suite.serving)
        try:
            yield Session(pc, mc, sc, sv, addresses=suite.addresses(), embedded=True)
        finally:
            for closer in (pc.close, mc.close, sc.close, sv.close):
                closer()
