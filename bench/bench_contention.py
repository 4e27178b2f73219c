"""Contention caught, then waited out (issue 15): a hog on the measured core during a
local profile, in one run beside clean profiles of the same configuration.

Model: GPT-2-small (catalog "gpt2", random weights seed 0) on pytorch, CPU fp32, one
thread pinned to one core; the real profiler (`run_profile`, contention detection and
re-measurement on, monitors on the measured core) against the serving registry in this
process. Three profiles of the same plan, in this order: clean A, contended (a busy-loop
subprocess pinned to the SAME core, switched on and off on a seeded random schedule,
segments of `--seg-lo`..`--seg-hi` s, on with probability `--duty`), clean B.

Reported:
- on the contended profile, every judged sample (OK or CONTENDED) by whether it overlapped
  the hog (>= 10% of its duration): flagged share of the hog-overlapping ones (target
  >= 95%), the profile's final state (target: SUCCEEDED, i.e. contention waited out rather
  than INVALID), wall time against the clean ones';
- on the clean profiles, the share of samples flagged CONTENDED (target <= 2%);
- the fits (idealized, no bootstrap) of the contended profile and of clean A against clean
  B: beta0, beta1 and alpha at the grid's prompt sizes, relative differences (target:
  within 2%; clean A vs clean B shows what the machine itself does between two runs).
The HTTP half of the issue's bench (the same against `transformers serve`) is not here.

    .venv/bin/python bench/bench_contention.py [--quick] [--duty 0.3]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _common as c
from _hog import Hog, confusion

from idealrt.core.costmodel.fit import FitOptions, fit_cost_model
from idealrt.core.costmodel.predict import alpha_at
from idealrt.core.domain import Backend, CostModel, ModelRef, ProfilePlan, Sample, StackSpec
from idealrt.core.errors import IdealrtError

GRID_P, GRID_O = (1, 128, 512), (1, 16, 32)
QUICK_P, QUICK_O = (1, 128), (1, 8)
TRUTH_OVERLAP = 0.10


def _fit(samples: list[Sample]) -> CostModel | str:
    """The idealized fit of the OK samples, or why there is none."""
    ok = [s for s in samples if s.flag.value == "ok"]
    try:
        return fit_cost_model(ok, options=FitOptions(bootstrap=0))
    except IdealrtError as exc:
        return f"no fit: {exc.message}"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else float("inf")


def fit_difference(
    cm: CostModel | str, ref: CostModel | str, prompts: tuple[int, ...]
) -> dict[str, float]:
    """Relative differences of cm against ref: beta at the smallest and largest context of
    the grid (beta0 + beta1 * context), and alpha at each prompt size (max over them); nan
    where either has no fit."""
    if isinstance(cm, str) or isinstance(ref, str):
        return {"beta": float("nan"), "alpha": float("nan")}
    lo, hi = min(prompts), max(prompts) + 32
    beta = max(_rel(cm.beta0_s + cm.beta1_s * x, ref.beta0_s + ref.beta1_s * x) for x in (lo, hi))
    alpha = max(_rel(float(alpha_at(cm, p)), float(alpha_at(ref, p))) for p in prompts)
    return {"beta": beta, "alpha": alpha}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duty", type=float, default=0.3)
    ap.add_argument("--seg-lo", type=float, default=0.5)
    ap.add_argument("--seg-hi", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=0, help="default 5 (quick: 2)")
    ap.add_argument("--core", type=int, default=c.default_core())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    c.quiet_logs()
    out = c.out_dir(args.quick, args.out_dir)
    repeats = args.repeats or (2 if args.quick else 5)
    gp, go = (QUICK_P, QUICK_O) if args.quick else (GRID_P, GRID_O)
    model = ModelRef(name="gpt2", seed=0)
    stack = StackSpec(backend=Backend.PYTORCH, options={"threads": "1", "cores": str(args.core)})
    plan = ProfilePlan(prompt_tokens=gp, output_tokens=go, repeats=repeats, warmups=1, seed=0)
    doc = c.begin_doc("contention", args.quick, vars(args))
    doc.update(
        model=f"gpt2 (catalog; random weights seed 0), pytorch CPU fp32, threads=1, pinned to "
        f"core {args.core}; the hog is pinned to the same core",
        grid={"p": gp, "o": go},
        repeats=repeats,
    )
    from idealrt.services.serving.registry import ModelRegistry

    registry = ModelRegistry()
    runs: dict[str, Any] = {}
    hog_log = None
    try:
        for name in ("clean_a", "contended", "clean_b"):
            print(f"[contention] profile {name} ...", flush=True)
            if name == "contended":
                with Hog(args.core, args.duty, args.seed, args.seg_lo, args.seg_hi) as hog:
                    runs[name] = c.profile_in_process(registry, model, stack, plan)
                hog_log = hog.log
            else:
                runs[name] = c.profile_in_process(registry, model, stack, plan)
    finally:
        registry.close()
    assert hog_log is not None
    fits = {k: _fit(r.samples) for k, r in runs.items()}
    doc["profiles"] = {
        k: {
            "state": r.profile.state.value,
            "error": r.profile.error,
            "flags": c.flag_counts(r.samples),
            "wall_s": r.wall_s,
            "provenance": {
                k2: v for k2, v in r.profile.provenance.entries.items() if "contention" in k2
            },
        }
        for k, r in runs.items()
    }
    tally = confusion(runs["contended"].samples, hog_log.epoch, TRUTH_OVERLAP)
    doc["hog"] = {"duty_observed": hog_log.duty_observed, "on_intervals": len(hog_log.epoch)}
    doc["confusion"] = tally
    hit = tally["flagged_and_hog"] + tally["missed_hog"]
    flagged_share = tally["flagged_and_hog"] / hit if hit else float("nan")
    false_flags = {}
    for k in ("clean_a", "clean_b"):
        judged = [s for s in runs[k].samples if s.flag.value in ("ok", "contended")]
        flagged = sum(s.flag.value == "contended" for s in judged)
        false_flags[k] = flagged / len(judged) if judged else float("nan")
    doc["false_flag_share"] = false_flags
    diffs = {
        "contended_vs_clean_b": fit_difference(fits["contended"], fits["clean_b"], gp),
        "clean_a_vs_clean_b": fit_difference(fits["clean_a"], fits["clean_b"], gp),
    }
    doc["fit_differences"] = diffs
    doc["fits"] = {
        k: f
        if isinstance(f, str)
        else {
            "beta0_s": f.beta0_s,
            "beta1_s": f.beta1_s,
            "alpha_knots_p": list(f.alpha_knots_p),
            "alpha_knots_s": list(f.alpha_knots_s),
        }
        for k, f in fits.items()
    }
    targets = [
        c.target("hog-overlapping samples flagged", flagged_share, ">=", 0.95, "%"),
        c.target("clean runs: samples flagged (worst)", max(false_flags.values()), "<=", 0.02, "%"),
        c.target(
            "contended profile SUCCEEDED (1 = yes)",
            float(runs["contended"].profile.state.value == "succeeded"),
            ">=",
            1.0,
        ),
        *[
            c.target(f"contended vs clean fit: {k}", v, "<=", 0.02, "%")
            for k, v in diffs["contended_vs_clean_b"].items()
        ],
    ]
    cont = doc["profiles"]["contended"]
    why = f": {cont['error'][:160]}" if cont["error"] else ""
    da, dc = diffs["clean_a_vs_clean_b"], diffs["contended_vs_clean_b"]
    lines = [
        f"- hog duty {hog_log.duty_observed:.0%} observed on core {args.core}: {tally}; "
        f"flagged {flagged_share:.0%} of the {hit} hog-overlapping samples",
        f"- contended profile {cont['state']} in {cont['wall_s']:.0f} s "
        f"(clean: {doc['profiles']['clean_a']['wall_s']:.0f} s, "
        f"{doc['profiles']['clean_b']['wall_s']:.0f} s){why}",
        f"- clean runs flagged {false_flags['clean_a']:.1%} and {false_flags['clean_b']:.1%}",
        f"- fit vs clean B: contended beta {dc['beta']:.1%}, alpha {dc['alpha']:.1%}; "
        f"clean A beta {da['beta']:.1%}, alpha {da['alpha']:.1%}",
    ]
    doc["targets"] = targets
    doc["summary_md"] = lines
    for line in lines:
        print(line)
    for t in targets:
        value, goal = c.fmt(t["value"], t["unit"]), c.fmt(t["threshold"], t["unit"])
        print(f"  {t['name']}: {value} {t['op']} {goal} {'met' if t['met'] else 'NOT met'}")
    c.write_result(out / "contention.json", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
