"""idealrt as a service under load (issue 14): RPC throughput and latency at 200 concurrent
clients, a 100,000-query estimate in one call, store ingest, 1,000 open watch streams, and
serving's queue.

Every service runs as `python -m idealrt.services.<name>` (a process of its own,
configured by environment variables as deployed); the load generator (`_load.py`:
grpc.aio, 200 callers over 8 channels, back to back, every call with a deadline) runs in
another process on the same machine, so both share its cores, as a caller on the same
node would. Each target is a ratio against a reference measured in the same run on the
same server: its gRPC health Check at the same load (what gRPC Python itself serves on
this machine through the same interceptor, logging and metrics).

Sections (each measured once, in this order, never two at once):
1. server models: health and the service's hot RPC on the sync server and on grpc.aio,
   for metrics (EstimateRuntime) and the store (ListProfiles+GetProfile): the numbers
   behind each service's default (core/config.py, services/*/server.py).
2. metrics: EstimateRuntime with one query, without and with intervals, vs health (60 s
   each); one call of 100,000 queries vs the same estimate in process.
3. store: ListProfiles(page 10)+GetProfile vs health on SQLite and PostgreSQL (60 s each);
   AppendSamples ingest with 8 writers (bench/_svc_ingest.py).
4. profiler: health and GetProfile p99 with no stream open, then with 1,000 WatchProfile
   streams open on a running profile; the server's RSS.
5. serving: 8 concurrent Generate calls on one model vs unqueued ones (bench/_svc_serving.py).

    .venv/bin/python bench/bench_service.py [--quick] [--seconds 60] [--only metrics,store]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
from _svc import Service, load, seed_succeeded_profile

SECTIONS = ("models", "metrics", "store", "profiler", "serving")
CLIENTS = 200


def _sqlite_env(d: Path, model: str) -> dict[str, str]:
    return {"IDEALRT_STORE_URL": f"sqlite:///{d}/store.sqlite", "IDEALRT_SERVER_MODEL": model}


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    """A PostgreSQL URL: IDEALRT_TEST_POSTGRES_URL, else a throwaway server started by
    scripts/pg-test-server.sh (None when this machine has no PostgreSQL binaries)."""
    given = os.environ.get("IDEALRT_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    script = c.BENCH_DIR.parent / "scripts" / "pg-test-server.sh"
    out = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True)
    if out.returncode == 3:
        yield None
        return
    if out.returncode != 0:
        raise RuntimeError(f"pg-test-server.sh start failed: {out.stderr[-2000:]}")
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in out.stdout.splitlines()
        if line.startswith("export ")
    )
    env = {k: v.strip("'\"") for k, v in env.items()}
    try:
        yield env["IDEALRT_TEST_POSTGRES_URL"]
    finally:
        subprocess.run(["bash", str(script), "stop", env["IDEALRT_PG_TEST_DIR"]], check=False)


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("calls", "calls_per_s", "p50_s", "p90_s", "p99_s", "max_s", "errors")
    return {k: r[k] for k in keys} | {
        k: r[k] for k in ("watches_opened", "watches_open_at_end") if r.get(k)
    }


def _line(name: str, r: dict[str, Any]) -> str:
    errs = sum(r["errors"].values())
    return (
        f"{name}: {r['calls_per_s']:,.0f} calls/s, p50 {r['p50_s'] * 1e3:.1f} ms, "
        f"p99 {r['p99_s'] * 1e3:.1f} ms, {errs} errors"
    )


def _metrics_stack(d: Path, model: str) -> tuple[Service, Service, str]:
    store = Service("store", _sqlite_env(d, "sync"))
    metrics = Service(
        "metrics", {"IDEALRT_STORE_TARGET": store.target, "IDEALRT_SERVER_MODEL": model}
    )
    from idealrt.clients.metrics import MetricsClient

    pid = seed_succeeded_profile(store.target)
    with MetricsClient(metrics.target) as m:
        cm = m.fit(pid, bootstrap=200, seed=0)
        m.estimate(cm.id, [512], [128], per_query=True, intervals=True)  # replicates warm
    return store, metrics, cm.id


# ---------------------------------------------------------------- 1. server models


def section_models(seconds: float, doc: dict[str, Any]) -> list[str]:
    out: dict[str, Any] = {}
    lines = ["### Server models (sync vs grpc.aio), same load, one run", ""]
    for model in ("sync", "aio"):
        with tempfile.TemporaryDirectory() as tmp:
            store, metrics, cm_id = _metrics_stack(Path(tmp), model)
            try:
                h = load(metrics.target, "health", seconds=seconds)
                e = load(
                    metrics.target, "estimate", seconds=seconds, params={"cost_model_id": cm_id}
                )
            finally:
                metrics.stop()
                store.stop()
        with (
            tempfile.TemporaryDirectory() as tmp,
            Service("store", _sqlite_env(Path(tmp), model)) as st,
        ):
            _seed_profiles(st.target, 30)
            sh = load(st.target, "health", seconds=seconds)
            sl = load(st.target, "store_list_get", seconds=seconds)
        out[model] = {
            "metrics_health": _brief(h),
            "metrics_estimate": _brief(e),
            "store_health": _brief(sh),
            "store_list_get": _brief(sl),
        }
        lines += [
            f"- {model}: metrics health {h['calls_per_s']:,.0f}/s, EstimateRuntime "
            f"{e['calls_per_s']:,.0f}/s (p99 {e['p99_s'] * 1e3:.1f} ms); store health "
            f"{sh['calls_per_s']:,.0f}/s, ListProfiles+GetProfile {sl['calls_per_s']:,.0f}/s "
            f"(p99 {sl['p99_s'] * 1e3:.1f} ms)"
        ]
    doc["server_models"] = out
    return [*lines, ""]


def _seed_profiles(store_target: str, n: int) -> None:
    from _svc import new_profile

    from idealrt.clients.store import StoreClient

    with StoreClient(store_target) as st:
        for _ in range(n):
            st.create_profile(new_profile())


# ---------------------------------------------------------------- 2. metrics


def _large_estimate(metrics_target: str, cm_id: str, n: int, repeats: int) -> dict[str, Any]:
    """One EstimateRuntime call of `n` queries through the client library (numpy arrays,
    and Python lists) vs `estimate_workload` in process on the same numpy arrays,
    interleaved, medians; the sums must agree."""
    from idealrt.clients.metrics import MetricsClient
    from idealrt.core.costmodel.estimate import estimate_workload

    rng = np.random.default_rng(1)
    p = rng.integers(1, 2048, size=n).astype(np.int64)
    o = rng.integers(1, 512, size=n).astype(np.int64)
    pl, ol = p.tolist(), o.tolist()
    rpc_s, rpc_list_s, local_s, local_list_s = [], [], [], []
    with MetricsClient(metrics_target) as m:
        cm = m.get_cost_model(cm_id)
        m.estimate(cm_id, p, o, per_query=False)  # warm: the model is cached server-side
        for _ in range(repeats):
            t0 = time.perf_counter()
            remote = m.estimate(cm_id, p, o, per_query=False).summary
            rpc_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m.estimate(cm_id, pl, ol, per_query=False)
            rpc_list_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            local = estimate_workload(cm, p, o)
            local_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            estimate_workload(cm, pl, ol)
            local_list_s.append(time.perf_counter() - t0)
    rel = abs(remote.sum_s - local.total_s) / local.total_s
    return {
        "queries": n,
        "repeats": repeats,
        "rpc_s_median": float(np.median(rpc_s)),
        "rpc_from_lists_s_median": float(np.median(rpc_list_s)),
        "in_process_s_median": float(np.median(local_s)),
        "ratio": float(np.median(rpc_s) / np.median(local_s)),
        "in_process_from_lists_s_median": float(np.median(local_list_s)),
        "ratio_from_lists": float(np.median(rpc_list_s) / np.median(local_list_s)),
        "sum_relative_difference": rel,
    }


def section_metrics(
    seconds: float, quick: bool, doc: dict[str, Any], targets: list[Any]
) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        store, metrics, cm_id = _metrics_stack(Path(tmp), _default_model("metrics"))
        try:
            params = {"cost_model_id": cm_id}
            h = load(metrics.target, "health", seconds=seconds)
            e = load(metrics.target, "estimate", seconds=seconds, params=params)
            ei = load(metrics.target, "estimate_intervals", seconds=seconds, params=params)
            big = _large_estimate(metrics.target, cm_id, 100_000, 3 if quick else 9)
        finally:
            metrics.stop()
            store.stop()
    doc["metrics"] = {
        "health": _brief(h),
        "estimate": _brief(e),
        "estimate_intervals": _brief(ei),
        "estimate_100k": big,
    }
    tp, tpi = e["calls_per_s"] / h["calls_per_s"], ei["calls_per_s"] / h["calls_per_s"]
    targets += [
        c.target("EstimateRuntime throughput / health", tp, ">=", 0.5, "x"),
        c.target("EstimateRuntime p99 / health p99", e["p99_s"] / h["p99_s"], "<=", 2.0, "x"),
        c.target("EstimateRuntime with intervals throughput / health", tpi, ">=", 0.25, "x"),
        c.target(
            "EstimateRuntime errors (both)",
            float(sum(e["errors"].values()) + sum(ei["errors"].values())),
            "<=",
            0.0,
        ),
        c.target("100k queries in one call / in process", big["ratio"], "<=", 2.0, "x"),
    ]
    return [
        "### Metrics",
        "",
        f"- {_line('health (reference)', h)}",
        f"- {_line('EstimateRuntime, 1 query', e)} ({tp:.2f}x health)",
        f"- {_line('EstimateRuntime, 1 query, intervals', ei)} ({tpi:.2f}x health)",
        f"- 100,000 queries in one call: {big['rpc_s_median'] * 1e3:.1f} ms through the client "
        f"from numpy arrays vs {big['in_process_s_median'] * 1e3:.1f} ms in process "
        f"({big['ratio']:.2f}x); from Python lists {big['rpc_from_lists_s_median'] * 1e3:.1f} "
        f"vs {big['in_process_from_lists_s_median'] * 1e3:.1f} ms "
        f"({big['ratio_from_lists']:.2f}x); sums equal to {big['sum_relative_difference']:.1e}",
        "",
    ]


# ---------------------------------------------------------------- 3. store


def section_store(
    seconds: float, quick: bool, doc: dict[str, Any], targets: list[Any]
) -> list[str]:
    from _svc_ingest import run_ingest

    model = _default_model("store")
    lines = ["### Store", ""]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, postgres() as pg:
        urls = {"sqlite": f"sqlite:///{tmp}/store.sqlite", "postgresql": pg}
        for backend, url in urls.items():
            if url is None:
                lines.append(f"- {backend}: not measured (no PostgreSQL binaries on this machine)")
                continue
            env = {"IDEALRT_STORE_URL": url, "IDEALRT_SERVER_MODEL": model}
            with Service("store", env) as st:
                _seed_profiles(st.target, 30)
                h = load(st.target, "health", seconds=seconds)
                lg = load(st.target, "store_list_get", seconds=seconds)
            ingest_url = url if backend == "postgresql" else f"sqlite:///{tmp}/ingest.sqlite"
            ing = run_ingest(
                backend, ingest_url, writers=8, seconds=10 if quick else 30,
                env={"IDEALRT_SERVER_MODEL": model},
            )  # fmt: skip
            ratio = lg["calls_per_s"] / h["calls_per_s"]
            goal = 50_000 if backend == "sqlite" else 20_000
            out[backend] = {"health": _brief(h), "list_get": _brief(lg), "ingest": ing}
            targets += [
                c.target(f"{backend}: ListProfiles+GetProfile / health", ratio, ">=", 0.4, "x"),
                c.target(
                    f"{backend}: ingest samples/s, 8 writers", ing["samples_per_s"], ">=", goal
                ),
                c.target(
                    f"{backend}: ingest lost + duplicated samples",
                    float(ing["lost"] + ing["duplicated"]),
                    "<=",
                    0.0,
                ),
            ]
            lines += [
                f"- {backend}: {_line('health', h)}",
                f"- {backend}: {_line('ListProfiles(page 10)+GetProfile', lg)} "
                f"({ratio:.2f}x health)",
                f"- {backend}: ingest {ing['samples_per_s']:,.0f} samples/s "
                f"({ing['writers']} writers, batches of {ing['batch_size']}, {ing['steps']} "
                f"decode steps each; {ing['retried_batches']} batches re-sent; lost "
                f"{ing['lost']}, duplicated {ing['duplicated']})",
            ]
    doc["store"] = out
    return [*lines, ""]


# ---------------------------------------------------------------- 4. profiler


def section_profiler(
    seconds: float, quick: bool, doc: dict[str, Any], targets: list[Any]
) -> list[str]:
    import dataclasses
    import socket

    from _svc import new_profile

    from idealrt.clients.profiler import ProfilerClient

    watches = 1000
    with socket.create_server(("127.0.0.1", 0)) as s:
        nowhere = f"127.0.0.1:{s.getsockname()[1]}"  # a serving nobody runs
    with tempfile.TemporaryDirectory() as tmp:
        store = Service("store", _sqlite_env(Path(tmp), "sync"))
        prof_env = {
            "IDEALRT_STORE_TARGET": store.target,
            "IDEALRT_SERVING_TARGET": nowhere,
            "IDEALRT_OUTAGE_WINDOW_S": "3600",
            "IDEALRT_DATA_DIR": tmp,
            "IDEALRT_CONTENTION_MONITORS": "0",
        }
        profiler = Service("profiler", prof_env)
        try:
            with ProfilerClient(profiler.target) as pc:
                # RUNNING for the whole section: it rides out the serving outage
                running = pc.create_profile(
                    dataclasses.replace(new_profile(), request_id="bench-watch")
                )
            params = {"profile_id": running.id}
            rss0 = profiler.rss_mib()
            h0 = load(profiler.target, "health", seconds=seconds)
            g0 = load(profiler.target, "profiler_get", seconds=seconds, params=params)
            h1 = load(
                profiler.target, "health", seconds=seconds, params=params,
                watches=watches, watch_target=profiler.target,
            )  # fmt: skip
            rss1 = profiler.rss_mib()
            g1 = load(
                profiler.target, "profiler_get", seconds=seconds, params=params,
                watches=watches, watch_target=profiler.target,
            )  # fmt: skip
        finally:
            profiler.stop()
            store.stop()
    doc["profiler"] = {
        "watches": watches,
        "health_no_streams": _brief(h0),
        "get_no_streams": _brief(g0),
        "health_with_streams": _brief(h1),
        "get_with_streams": _brief(g1),
        "rss_mib_no_streams": rss0,
        "rss_mib_with_streams": rss1,
    }
    hr, gr = h1["p99_s"] / h0["p99_s"], g1["p99_s"] / g0["p99_s"]
    targets += [
        c.target(f"health p99, {watches} watches open / none", hr, "<=", 2.0, "x"),
        c.target(f"GetProfile p99, {watches} watches open / none", gr, "<=", 2.0, "x"),
        c.target(
            f"watch streams open through the run (of {watches})",
            float(min(h1["watches_open_at_end"], g1["watches_open_at_end"])),
            ">=",
            float(watches),
        ),
    ]
    return [
        "### Profiler with open WatchProfile streams",
        "",
        f"- no stream: {_line('health', h0)}; {_line('GetProfile', g0)}",
        f"- {watches} streams open: {_line('health', h1)}; {_line('GetProfile', g1)}",
        f"- server RSS: {rss0:.0f} MiB without streams, {rss1:.0f} MiB with {watches} open",
        "",
    ]


# ---------------------------------------------------------------- 5. serving


def section_serving(quick: bool, doc: dict[str, Any], targets: list[Any]) -> list[str]:
    from _svc_serving import run_serving_queue

    r = run_serving_queue(concurrent=8, rounds=3 if quick else 10)
    doc["serving"] = r
    targets += [
        c.target("queued / unqueued decode per step", r["ratio"], "<=", 1.02, "x"),
        c.target("overlapping timed generations", float(r["overlaps"]), "<=", 0.0),
    ]
    return [
        "### Serving: 8 concurrent Generate calls on one model",
        "",
        f"- decode per step, median: unqueued {r['unqueued_decode_step_s_median'] * 1e3:.3f} ms, "
        f"queued {r['queued_decode_step_s_median'] * 1e3:.3f} ms ({r['ratio']:.4f}x); "
        f"{r['overlaps']} overlapping timed regions in {r['calls']} calls",
        "",
    ]


def _default_model(service: str) -> str:
    from idealrt.core.config import MetricsConfig, StoreConfig

    return {"metrics": MetricsConfig, "store": StoreConfig}[service].server_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=0.0, help="per load run (default 60, quick 5)")
    ap.add_argument("--model-seconds", type=float, default=0.0, help="server models (default 20)")
    ap.add_argument("--only", action="append", default=[], help=", ".join(SECTIONS))
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--core", default=None, help="ignored (the runner's common flag)")
    args = ap.parse_args(argv)
    only = [n for item in args.only for n in item.split(",") if n] or list(SECTIONS)
    seconds = args.seconds or (5.0 if args.quick else 60.0)
    model_seconds = args.model_seconds or (5.0 if args.quick else 20.0)
    c.quiet_logs()
    out = c.out_dir(args.quick, args.out_dir)
    doc = c.begin_doc("service", args.quick, vars(args))
    doc["load"] = {"clients": CLIENTS, "channels": 8, "seconds_per_run": seconds}
    targets: list[dict[str, Any]] = []
    lines = [
        f"Load: {CLIENTS} concurrent grpc.aio callers over 8 channels in a process of their "
        f"own on the same machine, {seconds:.0f} s per run after a 2 s warm-up; every ratio "
        "is against the same server's health Check in the same run.",
        "",
    ]
    if "models" in only:
        lines += section_models(model_seconds, doc)
    if "metrics" in only:
        lines += section_metrics(seconds, args.quick, doc, targets)
    if "store" in only:
        lines += section_store(seconds, args.quick, doc, targets)
    if "profiler" in only:
        lines += section_profiler(seconds, args.quick, doc, targets)
    if "serving" in only:
        lines += section_serving(args.quick, doc, targets)
    doc["targets"] = targets
    doc["summary_md"] = lines
    c.write_result(out / "service.json", doc)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
