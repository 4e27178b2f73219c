"""The whole suite in one process (the embedded default): four gRPC servers on loopback
ports, a SQLite store under the data dir. Services still talk to each other over gRPC, as
they do when deployed separately.

Plaintext and zero-config: the suite ignores IDEALRT_TLS_* (a deployment runs each service
with `idealrt serve` / its module, which honour them). Loopback needs nothing; another
`host` (`idealrt up --host 0.0.0.0`) is refused unless IDEALRT_INSECURE=1."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from idealrt.core.config import (
    DEFAULT_DATA_DIR,
    MetricsConfig,
    ProfilerConfig,
    ServingConfig,
    StoreConfig,
)
from idealrt.core.grpc_server import GrpcServer
from idealrt.core.tls import insecure_from_env

__all__ = ["Suite", "start_suite"]


@dataclasses.dataclass
class Suite:
    store: str
    serving: str
    profiler: str
    metrics: str
    servers: list[GrpcServer]
    data_dir: Path

    def addresses(self) -> dict[str, str]:
        return {
            "store": self.store,
            "serving": self.serving,
            "profiler": self.profiler,
            "metrics": self.metrics,
        }

    def stop(self, grace_s: float = 5.0) -> None:
        # reverse order: profiler stops measuring before serving and store go away
        for server in reversed(self.servers):
            server.stop(grace_s)
        self.servers.clear()

    def __enter__(self) -> Suite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_suite(
    data_dir: Path = DEFAULT_DATA_DIR,
    store_url: str = "",
    host: str = "127.0.0.1",
    ports: dict[str, int] | None = None,
    serving_target: str = "",
    resume: bool = True,
    contention_monitors: bool | None = None,
    contention_checks: bool | None = None,
) -> Suite:
    """Start store, serving, metrics and profiler; `serving_target` replaces the local
    serving as the profiler's default endpoint when given. `contention_monitors`: see
    ProfilerConfig (None: $IDEALRT_CONTENTION_MONITORS, default on; off only for test
    suites on shared machines); `contention_checks` likewise
    ($IDEALRT_CONTENTION_CHECKS)."""
    from idealrt.services.metrics.server import build_server as build_metrics
    from idealrt.services.profiler.outbound import OutboundPolicy
    from idealrt.services.profiler.server import build_server as build_profiler
    from idealrt.services.serving.server import build_server as build_serving
    from idealrt.services.store.server import build_server as build_store

    ports = ports or {}
    env_cfg = ProfilerConfig.from_env()
    insecure = insecure_from_env()  # plaintext off loopback only when asked for
    data_dir.mkdir(parents=True, exist_ok=True)
    servers: list[GrpcServer] = []

    def addr(name: str) -> str:
        return f"{host}:{ports.get(name, 0)}"

    try:
        store, store_port = build_store(
            StoreConfig(
                address=addr("store"),
                store_url=store_url,
                data_dir=data_dir,
                allow_insecure=insecure,
            )
        )
        servers.append(store)
        store_target = f"{host}:{store_port}"
        serving, serving_port = build_serving(
            ServingConfig(address=addr("serving"), allow_insecure=insecure)
        )
        servers.append(serving)
        serving_addr = f"{host}:{serving_port}"
        metrics, metrics_port = build_metrics(
            MetricsConfig(
                address=addr("metrics"), store_target=store_target, allow_insecure=insecure
            )
        )
        servers.append(metrics)
        profiler, profiler_port = build_profiler(
            ProfilerConfig(
                address=addr("profiler"),
                allow_insecure=insecure,
                store_target=store_target,
                serving_target=serving_target or serving_addr,
                data_dir=data_dir,
                contention_monitors=env_cfg.contention_monitors
                if contention_monitors is None
                else contention_monitors,
                contention_checks=env_cfg.contention_checks
                if contention_checks is None
                else contention_checks,
                # with the serving it measures in this process, store writes go between
                # samples: on a thread of their own they would take CPU and GIL from a
                # timed generation (ProfilerConfig.background_writes)
                background_writes=bool(serving_target),
                outbound_config=env_cfg.outbound_config,
            ),
            # on loopback and zero-config: HTTP targets may reach loopback hosts, and no
            # credential exists, unless IDEALRT_OUTBOUND_CONFIG says otherwise
            None if env_cfg.outbound_config else OutboundPolicy.loopback(),
        )
        servers.append(profiler)
    except BaseException:
        for s in reversed(servers):
            s.stop(0)
        raise
    return Suite(
        store=store_target,
        serving=serving_addr,
        profiler=f"{host}:{profiler_port}",
        metrics=f"{host}:{metrics_port}",
        servers=servers,
        data_dir=data_dir,
    )
