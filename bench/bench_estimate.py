"""Workload estimation throughput, in process: queries per second.

Measures `estimate_workload` on one large workload and `WorkloadAccumulator` fed in chunks
(as a client-streaming RPC would), with percentiles and the out-of-domain count on. Prints
a table and writes bench/results/estimate.json with a description of the machine.

    .venv/bin/python bench/bench_estimate.py [--queries 2000000] [--repeats 7]

Target: >= 1,000,000 queries/s. Reported figure: the median over repeats (best alongside).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from idealrt.core.costmodel.estimate import WorkloadAccumulator, estimate_workload
from idealrt.core.domain import CostModel

TARGET_QPS = 1_000_000
RESULTS = Path(__file__).resolve().parent / "results" / "estimate.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
        "loadavg_1m": load[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "note": "shared machine: other processes may run concurrently",
    }


def _model() -> CostModel:
    # davinci-shaped numbers from HELM's A100 table (design.md), with a context term.
    return CostModel(
        id="bench",
        profile_id="",
        alpha_knots_p=(1, 256, 512, 1024, 1536, 1920),
        alpha_knots_s=(0.084, 0.12, 0.17, 0.323, 0.46, 0.597),
        beta0_s=0.081,
        beta1_s=2e-6,
        valid_prompt_tokens=(1, 1920),
        valid_output_tokens=(1, 512),
    )


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=10_000, help="streamed chunk size")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n = args.queries
    p = rng.integers(1, 2048, size=n)
    o = rng.integers(1, 600, size=n)
    cm = _model()

    def one_shot() -> object:
        return estimate_workload(cm, p, o)

    def streamed() -> object:
        acc = WorkloadAccumulator(cm)
        for lo in range(0, n, args.chunk):
            acc.add(p[lo : lo + args.chunk], o[lo : lo + args.chunk])
        return acc.result()

    single_p, single_o = p[:1], o[:1]

    def single() -> object:
        return estimate_workload(cm, single_p, single_o)

    results: dict[str, dict[str, float]] = {}
    for name, fn, count, reps in (
        ("estimate_workload", one_shot, n, args.repeats),
        (f"accumulator_chunk_{args.chunk}", streamed, n, args.repeats),
        ("single_query_call", single, 1, 2000),
    ):
        times = _time(fn, reps)
        med, best = statistics.median(times), min(times)
        results[name] = {
            "queries": count,
            "repeats": reps,
            "median_s": med,
            "best_s": best,
            "queries_per_s_median": count / med,
            "queries_per_s_best": count / best,
        }
        print(
            f"{name:32s} {count:>10,d} queries  median {med * 1e3:9.3f} ms  "
            f"{count / med:>14,.0f} q/s (best {count / best:,.0f})"
        )

    headline = results["estimate_workload"]["queries_per_s_median"]
    print(f"target {TARGET_QPS:,} q/s: {'met' if headline >= TARGET_QPS else 'NOT met'}")
    doc = {
        "benchmark": "estimate",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "target_queries_per_s": TARGET_QPS,
        "headline_queries_per_s": headline,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
