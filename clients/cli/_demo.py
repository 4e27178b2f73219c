"""`idealrt demo`: the main job end to end on the embedded suite.

Profiles GPT-2 small (random weights, fixed seed) on PyTorch/CPU over a sparse grid plus a
held-out grid, fits the idealized-runtime cost model, checks it on the held-out points,
estimates a sample workload and prints one readable report.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

import numpy as np

from idealrt.clients.cli._profile import watch_with_progress
from idealrt.clients.cli._render import console, emit_json, ms, print_table
from idealrt.clients.cli._session import Session
from idealrt.core.domain import (
    Backend,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    StackSpec,
)

__all__ = ["DEMO_PLAN", "cmd_demo", "demo_workload"]

# Sparse fit grid (4 prompt sizes x 3 output lengths) and a denser held-out grid in between.
DEMO_PLAN = ProfilePlan(
    prompt_tokens=(1, 128, 384, 768),
    output_tokens=(1, 16, 64),
    holdout_prompt_tokens=(64, 256, 512, 640),
    holdout_output_tokens=(8, 32),
    repeats=3,
    warmups=1,
    seed=7,
)


def demo_workload(n: int = 1000, seed: int = 0) -> tuple[list[int], list[int]]:
    """A benchmark-like workload: p from 16 to 768 (log-uniform), o from 1 to 64."""
    rng = np.random.default_rng(seed)
    p = np.exp(rng.uniform(np.log(16), np.log(768), n)).astype(int)
    o = rng.integers(1, 65, n)
    return p.tolist(), o.tolist()


def cmd_demo(args: argparse.Namespace, s: Session) -> int:
    t0 = time.perf_counter()
    model = args.model
    # One thread pinned to the last core: the profiler watches that core for foreign work.
    # The embedded suite's serving child is pinned there, and the suite's own threads keep
    # off it while the profile runs (services/suite.py). Decode is memory-bound, so one
    # thread loses little on this class of machine.
    core = str(max(os.sched_getaffinity(0)))
    prof = Profile(
        id="",
        model=ModelRef(name=model, seed=0),
        stack=StackSpec(
            backend=Backend.PYTORCH,
            device="cpu",
            dtype="fp32",
            options={"threads": "1", "cores": core},
        ),
        plan=DEMO_PLAN,
        request_id=uuid.uuid4().hex,
    )
    if not args.json:
        console.print(
            f"[bold]idealrt demo[/bold]: {model} (random weights, seed 0) on "
            f"pytorch/cpu/fp32, 1 thread on core {core}; suite at "
            + ", ".join(f"{k} {v}" for k, v in s.addresses.items())
        )
    created = s.profiler.create_profile(prof)
    final = watch_with_progress(s.profiler, created, quiet=args.json)
    if final.state != ProfileState.SUCCEEDED:
        console.print(f"[red]profile {final.id} ended {final.state.value}: {final.error}")
        return 1
    cm = s.metrics.fit(final.id, request_id=uuid.uuid4().hex, name=f"{model}-demo")
    ps, os_ = demo_workload()
    est = s.metrics.estimate(cm.id, ps, os_, per_query=False)
    elapsed = time.perf_counter() - t0
    if args.json:
        emit_json(
            {"profile": final, "cost_model": cm, "workload": est.summary, "elapsed_s": elapsed}
        )
        return 0
    rows: list[tuple[str, str]] = []
    for p, a in zip(cm.alpha_knots_p, cm.alpha_knots_s, strict=True):
        ci = cm.intervals.get(f"alpha@{p}")
        rows.append((f"alpha({p})", ms(a) + (f"  [{ms(ci[0])}, {ms(ci[1])}]" if ci else "")))
    ci = cm.intervals.get("beta0")
    rows.append(
        (
            "beta0 (per output token)",
            ms(cm.beta0_s) + (f"  [{ms(ci[0])}, {ms(ci[1])}]" if ci else ""),
        )
    )
    rows.append(("beta1 (per token of context)", f"{cm.beta1_s * 1e3:.6f}"))
    rows.append(
        (
            "beta(c) at c=128 / 768",
            f"{ms(cm.beta0_s + cm.beta1_s * 128)} / {ms(cm.beta0_s + cm.beta1_s * 768)}",
        )
    )
    q = cm.quality
    rows.append(("", ""))
    rows.append((f"held-out error, {q.points} configs", "not used in the fit"))
    rows.append(("  mean / p95 / max", f"{q.mean_rel:.2%} / {q.p95_rel:.2%} / {q.max_rel:.2%}"))
    print_table(f"idealized-runtime cost model {cm.id} (ms)", ["quantity", "value"], rows)
    sm = est.summary
    print_table(
        "sample workload: 1,000 queries, p 16-768, o 1-64",
        ["total s", "mean ms", "p50 ms", "p90 ms", "p99 ms", "out of domain"],
        [
            (
                f"{sm.sum_s:.2f}",
                ms(sm.mean_s),
                ms(sm.p50_s),
                ms(sm.p90_s),
                ms(sm.p99_s),
                str(sm.out_of_domain),
            )
        ],
    )
    console.print(
        f"profile {final.id}: {final.completed_samples} samples; "
        f"demo took {elapsed:.0f} s. Data in {args.data_dir}/"
    )
    return 0
