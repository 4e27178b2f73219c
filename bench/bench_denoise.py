"""Denoising under injected contention: the paper's min rule vs our low-quantile rule (15).

Model: GPT-2-small (catalog "gpt2", random weights seed 0) on pytorch with kernels=aten (see
main: the rules' overhead convention), CPU fp32, one thread pinned to one core; a grid small
enough to repeat: p in 1,64,256,512 x o in 1,16,48.
1. Measured truth: the same grid measured with the hog off, in the same run, through the
   real profiler (`run_profile`, contention detection on), 5 repeats. Per configuration the
   median total of its clean repeats, and per prompt size the median time to first token:
   that is what every rule is scored against (issue 15: measured truth, not a model's
   prediction; the reference's own fit is kept in the JSON for information only).
2. Contended data, API-like: for each duty cycle, 5 trials per configuration run directly
   through the serving registry (no contention detection, no re-measurement) in randomized
   interleaved rounds, while a busy-loop subprocess pinned to the SAME core is switched on
   and off on a seeded random schedule (segments of 0.3-2 s, on with probability = duty).
   Each sample's overlap with the hog is recorded.
3. Rules side by side on the contended data: denoise(method="min") (the paper's minimum,
   beta1 fitted), the same with constant beta (the paper exactly, beta_linear=False) and
   denoise(method="quantile") at q = 0.1 (ours) and 0.05. Each: mean / p95 / max relative
   error of its predicted total at every configuration against the measured uncontended
   median, the same for alpha(p) against the measured uncontended TTFT median, the fitted
   parameters, the overhead (true value ~0 for a local model) and the quality the rule
   reports itself (k-fold). The same rules applied to the clean data show each rule's own
   bias without injected contention.
4. Bonus: run_profile (detector on) over the same contended setup; how many samples it
   flagged vs how many overlapped the hog (>= 10% of their duration).

    .venv/bin/python bench/bench_denoise.py [--quick] [--duties 0.3,0.5] [--trials 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
from _hog import Hog, confusion, overlap_fraction

from idealrt.core.costmodel.evaluate import config_runtimes
from idealrt.core.costmodel.fit import FitOptions, fit_cost_model, usable_samples
from idealrt.core.costmodel.predict import alpha_at, predict_runtime
from idealrt.core.domain import Backend, CostModel, ModelRef, ProfilePlan, Sample, StackSpec
from idealrt.services.metrics.denoise import denoise

GRID_P, GRID_O = (1, 64, 256, 512), (1, 16, 48)
QUICK_P, QUICK_O = (1, 128), (1, 8)
TRUTH_OVERLAP = 0.10


def _cm(cm: CostModel) -> dict[str, Any]:
    return {
        "alpha_knots_p": list(cm.alpha_knots_p),
        "alpha_knots_s": list(cm.alpha_knots_s),
        "beta0_s": cm.beta0_s,
        "beta1_s": cm.beta1_s,
        "overhead_s": cm.overhead_s,
    }


def contended_samples(
    registry: Any, model_id: str, grid: list[tuple[int, int]], trials: int, seed: int
) -> tuple[list[Sample], list[tuple[float, float]]]:
    """`trials` generations per configuration in shuffled rounds (one warm-up round first,
    discarded); returns the samples and each one's (monotonic start, end)."""
    samples: list[Sample] = []
    spans: list[tuple[float, float]] = []
    for r in range(-1, trials):
        order = list(grid)
        random.Random(seed * 1000 + r).shuffle(order)
        for p, o in order:
            t0 = time.monotonic()
            res = registry.generate(
                model_id,
                prompt_length=p,
                prompt_seed=seed * 100000 + r * 1000 + p,
                output_tokens=o,
            )
            t1 = time.monotonic()
            if r < 0:
                continue
            samples.append(
                Sample(
                    prompt_tokens=res.prompt_tokens,
                    output_tokens=res.output_tokens,
                    prefill_ns=res.prefill_ns,
                    decode_ns=tuple(res.decode_ns),
                    total_ns=res.total_ns,
                    start_time=res.start_time,
                    repeat=r,
                )
            )
            spans.append((t0, t1))
    return samples, spans


Truth = dict[str, Any]


def measured_truth(samples: list[Sample]) -> Truth:
    """The uncontended run's medians: total per configuration, TTFT per prompt size."""
    used = usable_samples(samples, heldout=None)
    p, o, meas = config_runtimes(used)
    by_p: dict[int, list[float]] = {}
    for s in used:
        by_p.setdefault(s.prompt_tokens, []).append(s.prefill_ns * 1e-9)
    ps = np.asarray(sorted(by_p), dtype=np.float64)
    return {
        "p": p,
        "o": o,
        "total_s": meas,
        "ttft_p": ps,
        "ttft_s": np.asarray([np.median(by_p[int(k)]) for k in ps]),
    }


def compare(cm: CostModel, truth: Truth) -> dict[str, Any]:
    """Errors of `cm` against the measured uncontended truth of the same run."""
    return {
        "model": _cm(cm),
        "quality_reported": dataclasses.asdict(cm.quality),
        "fit_options": dict(cm.fit_options),
        "total_vs_measured": c.error_stats(
            predict_runtime(cm, truth["p"], truth["o"]), truth["total_s"]
        ),
        "alpha_vs_measured_ttft": c.error_stats(alpha_at(cm, truth["ttft_p"]), truth["ttft_s"]),
        "overhead_ms": cm.overhead_s * 1e3,
    }


RULES: dict[str, dict[str, Any]] = {
    "min (paper, beta1 fitted)": {"method": "min"},
    "min (paper, constant beta)": {"method": "min", "beta_linear": False},
    "quantile q=0.1 (ours)": {"method": "quantile", "quantile": 0.1},
    "quantile q=0.05": {"method": "quantile", "quantile": 0.05},
}
MIN, QUANTILE = "min (paper, beta1 fitted)", "quantile q=0.1 (ours)"


def rules(samples: list[Sample], truth: Truth) -> dict[str, Any]:
    return {name: compare(denoise(samples, **kw), truth) for name, kw in RULES.items()}


def _side_by_side(res: dict[str, Any]) -> str:
    return "; ".join(
        f"{name}: total {r['total_vs_measured']['mean_rel']:.2%} / max "
        f"{r['total_vs_measured']['max_rel']:.2%}, alpha "
        f"{r['alpha_vs_measured_ttft']['mean_rel']:.2%}"
        f", overhead {r['overhead_ms']:.1f} ms"
        for name, r in res.items()
    )


def bonus(
    registry: Any,
    model: ModelRef,
    stack: StackSpec,
    plan: ProfilePlan,
    core: int,
    duty: float,
    seed: int,
) -> dict[str, Any]:
    """run_profile with its detector on, under the same hog schedule."""
    with Hog(core, duty, seed) as hog:
        run = c.profile_in_process(registry, model, stack, plan, contention=True)
    judged = [s for s in run.samples if s.flag.value in ("ok", "contended")]
    tally = confusion(judged, hog.log.epoch, TRUTH_OVERLAP)
    return {
        "state": run.profile.state.value,
        "error": run.profile.error,
        "samples_judged": len(judged),
        "flags": c.flag_counts(run.samples),
        "confusion": tally,
        "duty_observed": hog.log.duty_observed,
        "wall_s": run.wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duties", default="", help="default 0.3,0.5 (quick: 0.5)")
    ap.add_argument("--trials", type=int, default=0, help="default 5 (quick: 2)")
    ap.add_argument("--core", type=int, default=c.default_core())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bonus", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    c.quiet_logs()
    out = c.out_dir(args.quick, args.out_dir)
    trials = args.trials or (2 if args.quick else 5)
    duties = [float(x) for x in (args.duties or ("0.5" if args.quick else "0.3,0.5")).split(",")]
    gp, go = (QUICK_P, QUICK_O) if args.quick else (GRID_P, GRID_O)
    grid = [(p, o) for p in gp for o in go]
    model = ModelRef(name="gpt2", seed=0)
    # kernels=aten: the denoising rules assume, as HELM does for APIs, that prefilling the
    # smallest prompt (1 token) costs one decode step (overhead = curve(1) - beta(1)). The
    # pytorch stack's default decodes on idealrt's native kernels but prefills on ATen, so its
    # alpha(1) is ~7 ms above beta and that gap would be read as per-request overhead; on
    # ATen alone a 1-token prefill and a decode step run the same kernels. (Since issue 15 the
    # rules use that convention only for totals-only data: these samples carry the time to
    # first token, which bounds alpha from below and is fitted directly; kept for
    # comparability with earlier runs.)
    stack = StackSpec(
        backend=Backend.PYTORCH,
        options={"threads": "1", "cores": str(args.core), "kernels": "aten"},
    )
    plan = ProfilePlan(prompt_tokens=gp, output_tokens=go, repeats=trials, warmups=1, seed=0)
    doc = c.begin_doc("denoise", args.quick, vars(args))
    doc.update(
        model="gpt2 (catalog; random weights seed 0), pytorch CPU fp32, threads=1, "
        f"pinned to core {args.core}; the hog is pinned to the same core",
        grid={"p": gp, "o": go},
        trials=trials,
        scored_against="the same configurations measured uncontended in the same run (medians)",
    )
    from idealrt.services.serving.registry import ModelRegistry

    registry = ModelRegistry()
    lines: list[str] = []
    targets: list[dict[str, Any]] = []
    try:
        print("[denoise] reference profile (hog off) ...", flush=True)
        ref_run = c.profile_in_process(registry, model, stack, plan, contention=True)
        ref = fit_cost_model(ref_run.samples, options=FitOptions(bootstrap=0))
        truth = measured_truth(ref_run.samples)
        doc["reference"] = {
            "state": ref_run.profile.state.value,
            "error": ref_run.profile.error,
            "flags": c.flag_counts(ref_run.samples),
            "measured_configs": int(truth["p"].size),
            "fit_for_information_only": _cm(ref),
        }
        clean = [s for s in ref_run.samples if s.flag.value == "ok"]
        doc["rules_on_clean_data"] = rules(clean, truth)
        loaded = registry.load(model, stack, max_context=max(gp) + max(go))
        doc["contended"] = {}
        for i, duty in enumerate(duties):
            print(f"[denoise] contended trials, duty {duty} ...", flush=True)
            with Hog(args.core, duty, args.seed + i) as hog:
                samples, spans = contended_samples(registry, loaded.model_id, grid, trials, i)
            overlaps = [overlap_fraction(hog.log.monotonic, a, b) for a, b in spans]
            res = rules(samples, truth)
            doc["contended"][str(duty)] = {
                "samples": len(samples),
                "duty_observed": hog.log.duty_observed,
                "samples_overlapping_hog": sum(x >= TRUTH_OVERLAP for x in overlaps),
                "mean_overlap": float(np.mean(overlaps)),
                "rules": res,
            }
            mn, qu = res[MIN]["total_vs_measured"], res[QUANTILE]["total_vs_measured"]
            lines.append(
                f"- duty {duty} (observed {hog.log.duty_observed:.0%}, "
                f"{doc['contended'][str(duty)]['samples_overlapping_hog']}/{len(samples)} samples "
                f"hit), mean error vs measured uncontended truth: {_side_by_side(res)}"
            )
            targets.append(
                c.target(
                    f"duty {duty}: quantile mean error vs measured truth <= min rule's",
                    qu["mean_rel"] - mn["mean_rel"],
                    "<=",
                    0.0,
                    "%",
                )
            )
        registry.unload(loaded.model_id)
        if not args.no_bonus:
            print("[denoise] bonus: run_profile's detector under the hog ...", flush=True)
            bplan = dataclasses.replace(plan, repeats=max(1, min(3, trials)))
            doc["detector"] = bonus(
                registry, model, stack, bplan, args.core, duties[-1], args.seed + 100
            )
            d = doc["detector"]
            lines.append(
                f"- run_profile detector at duty {duties[-1]}: {d['confusion']} "
                f"(profile {d['state']}{': ' + d['error'][:120] if d['error'] else ''})"
            )
    finally:
        registry.close()
    cl = doc["rules_on_clean_data"]
    lines.insert(0, f"- clean data (no hog), vs measured truth: {_side_by_side(cl)}")
    doc["targets"] = targets
    doc["summary_md"] = lines
    for line in lines:
        print(line)
    c.write_result(out / "denoise.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
