"""The load generator of bench_service.py, run as a process of its own:

    python bench/_load.py --target 127.0.0.1:PORT --rpc health --clients 200 --seconds 60 \
        [--channels 8] [--param KEY=VALUE ...] [--watches N --watch-target ADDR]

`--clients` concurrent callers (grpc.aio tasks, spread over `--channels` channels, i.e.
HTTP/2 connections) each issue the RPC back to back for `--seconds` (after a short warm-up
that is not counted); every call has a deadline. With `--watches N` it first opens N
WatchProfile streams on the profiler at `--watch-target` (one channel per 100 streams) and
holds them for the whole run, then reports how many were still open at the end.

Prints one JSON line: calls, calls_per_s, latency percentiles (p50/p90/p99/max, seconds,
client-measured: queueing in the server included), errors by status code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from idealrt.metrics.v1 import metrics_service_pb2 as mpb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as mpbg
from idealrt.profiler.v1 import profiler_service_pb2 as ppb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as ppbg
from idealrt.store.v1 import store_service_pb2 as spb
from idealrt.store.v1 import store_service_pb2_grpc as spbg

DEADLINE_S = 30.0
WARMUP_S = 2.0
OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]

Call = Callable[[], Awaitable[Any]]


def _calls(rpc: str, channel: grpc.aio.Channel, params: dict[str, str]) -> Call:
    """One caller's RPC: a function issuing one call."""
    if rpc == "health":
        stub = health_pb2_grpc.HealthStub(channel)
        hreq = health_pb2.HealthCheckRequest(service="")
        return lambda: stub.Check(hreq, timeout=DEADLINE_S)
    if rpc in ("estimate", "estimate_intervals"):
        mstub = mpbg.MetricsServiceStub(channel)
        ereq = mpb.EstimateRuntimeRequest(
            cost_model_id=params["cost_model_id"],
            queries=[mpb.Query(prompt_tokens=512, output_tokens=128)],
            intervals=rpc == "estimate_intervals",
        )
        return lambda: mstub.EstimateRuntime(ereq, timeout=DEADLINE_S)
    if rpc == "store_list_get":
        sstub = spbg.StoreServiceStub(channel)
        lreq = spb.ListProfilesRequest(page_size=10)

        async def list_get() -> None:
            page = await sstub.ListProfiles(lreq, timeout=DEADLINE_S)
            if page.profiles:
                await sstub.GetProfile(
                    spb.GetProfileRequest(id=page.profiles[0].id), timeout=DEADLINE_S
                )

        return list_get
    if rpc == "profiler_get":
        pstub = ppbg.ProfilerServiceStub(channel)
        greq = ppb.GetProfileRequest(id=params["profile_id"])
        return lambda: pstub.GetProfile(greq, timeout=DEADLINE_S)
    raise SystemExit(f"unknown --rpc {rpc}")


async def _caller(
    call: Call, stop_at: float, count_from: float, lat: list[float], errors: Counter[str]
) -> None:
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            return
        try:
            await call()
        except grpc.aio.AioRpcError as e:
            if t0 >= count_from:
                errors[e.code().name] += 1
            continue
        if t0 >= count_from:
            lat.append(time.perf_counter() - t0)


async def _watch(stub: ppbg.ProfilerServiceStub, pid: str, opened: list[int]) -> None:
    call = stub.WatchProfile(ppb.WatchProfileRequest(id=pid))
    first = True
    async for _ in call:
        if first:
            opened[0] += 1
            first = False
    opened[1] += 1  # ended


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    params = dict(p.split("=", 1) for p in args.param)
    watch_channels: list[grpc.aio.Channel] = []
    watch_tasks: list[asyncio.Task[None]] = []
    opened = [0, 0]  # opened, ended
    if args.watches:
        for i in range(args.watches):
            if i % 100 == 0:
                watch_channels.append(grpc.aio.insecure_channel(args.watch_target, OPTIONS))
            stub = ppbg.ProfilerServiceStub(watch_channels[-1])
            watch_tasks.append(asyncio.create_task(_watch(stub, params["profile_id"], opened)))
        t_open = time.perf_counter()
        while opened[0] < args.watches and time.perf_counter() - t_open < 60:
            await asyncio.sleep(0.1)
    channels = [grpc.aio.insecure_channel(args.target, OPTIONS) for _ in range(args.channels)]
    lat: list[float] = []
    errors: Counter[str] = Counter()
    now = time.perf_counter()
    count_from = now + WARMUP_S
    stop_at = count_from + args.seconds
    tasks = [
        _caller(
            _calls(args.rpc, channels[i % len(channels)], params), stop_at, count_from, lat, errors
        )
        for i in range(args.clients)
    ]
    await asyncio.gather(*tasks)
    still_open = opened[0] - opened[1]
    for t in watch_tasks:
        t.cancel()
    for ch in channels + watch_channels:
        await ch.close()
    a = np.asarray(lat) if lat else np.zeros(1)
    return {
        "rpc": args.rpc,
        "clients": args.clients,
        "channels": args.channels,
        "seconds": args.seconds,
        "calls": len(lat),
        "calls_per_s": len(lat) / args.seconds,
        "p50_s": float(np.quantile(a, 0.5)),
        "p90_s": float(np.quantile(a, 0.9)),
        "p99_s": float(np.quantile(a, 0.99)),
        "max_s": float(a.max()),
        "errors": dict(errors),
        "watches_requested": args.watches,
        "watches_opened": opened[0],
        "watches_open_at_end": still_open,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--rpc", required=True)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--watches", type=int, default=0)
    ap.add_argument("--watch-target", default="")
    args = ap.parse_args(argv)
    print(json.dumps(asyncio.run(main_async(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
