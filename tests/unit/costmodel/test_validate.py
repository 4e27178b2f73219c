"""The internal-consistency check of a cost model: each rule refuses what it should (naming
the field), and what our own fit, denoising and HELM import produce passes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import idealrt.core.costmodel as costmodel
from idealrt.core.costmodel.fit import FitOptions, fit_with_replicates
from idealrt.core.costmodel.predict import predict_runtime
from idealrt.core.costmodel.validate import MAX_SECONDS, check_cost_model
from idealrt.core.domain import CostModel, FitQuality, Sample
from idealrt.core.errors import InvalidArgument
from idealrt.services.metrics.denoise import denoise
from idealrt.services.metrics.helm import import_helm

from .test_fit import Truth, make_samples

ROOT = Path(__file__).resolve().parents[3]
REASON = "COST_MODEL_INCONSISTENT"


def _model(**changes: Any) -> CostModel:
    base = CostModel(
        id="cm_1",
        profile_id="prof_1",
        alpha_knots_p=(1, 64, 512),
        alpha_knots_s=(0.02, 0.03, 0.07),
        beta0_s=0.02,
        beta1_s=1e-7,
        overhead_s=0.0,
        kind="idealized",
        quality=FitQuality("kfold", 9, 0.01, 0.02, 0.03),
        intervals={"beta0": (0.019, 0.021), "alpha@64": (0.029, 0.031)},
        valid_prompt_tokens=(1, 512),
        valid_output_tokens=(1, 64),
        fit_options=FitOptions(bootstrap=20).to_record(),
    )
    return dataclasses.replace(base, **changes)


def test_exported_from_the_package() -> None:
    assert "check_cost_model" in costmodel.__all__
    assert costmodel.check_cost_model is check_cost_model


def test_a_consistent_model_passes() -> None:
    check_cost_model(_model())


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        # kind in the known set
        ({"kind": "mystery"}, "kind"),
        ({"kind": ""}, "kind"),
        # at least one alpha knot, one time per knot
        ({"alpha_knots_p": (), "alpha_knots_s": ()}, "alpha_knots_p"),
        ({"alpha_knots_s": (0.02, 0.03)}, "alpha_knots_s"),
        # knot prompt sizes: integers >= 1 (int32), strictly increasing
        ({"alpha_knots_p": (0, 64, 512)}, "alpha_knots_p[0]"),
        ({"alpha_knots_p": (1, 64, 64)}, "alpha_knots_p[2]"),
        ({"alpha_knots_p": (1, 512, 64)}, "alpha_knots_p[2]"),
        ({"alpha_knots_p": (1, 64, 2**31)}, "alpha_knots_p[2]"),
        ({"alpha_knots_p": (1, 64.5, 512)}, "alpha_knots_p[1]"),
        ({"alpha_knots_p": (1, True, 512)}, "alpha_knots_p[1]"),
        # knot times finite, >= 0
        ({"alpha_knots_s": (0.02, NAN, 0.07)}, "alpha_knots_s[1]"),
        ({"alpha_knots_s": (0.02, INF, 0.07)}, "alpha_knots_s[1]"),
        ({"alpha_knots_s": (-0.01, 0.03, 0.07)}, "alpha_knots_s[0]"),
        ({"alpha_knots_s": (0.02, 0.03, 2 * MAX_SECONDS)}, "alpha_knots_s[2]"),
        # beta0 >= 0, beta1 finite, overhead >= 0
        ({"beta0_s": -INF}, "beta0_s"),
        ({"beta0_s": NAN}, "beta0_s"),
        ({"beta0_s": -1e-9}, "beta0_s"),
        ({"beta1_s": INF}, "beta1_s"),
        ({"beta1_s": NAN}, "beta1_s"),
        ({"beta1_s": -2 * MAX_SECONDS}, "beta1_s"),
        ({"overhead_s": -0.1}, "overhead_s"),
        ({"overhead_s": NAN}, "overhead_s"),
        # intervals finite, low <= high
        ({"intervals": {"beta0": (NAN, 0.02)}}, "intervals[beta0].low"),
        ({"intervals": {"beta0": (0.01, INF)}}, "intervals[beta0].high"),
        ({"intervals": {"beta0": (0.03, 0.02)}}, "intervals[beta0]"),
        ({"intervals": {"beta0": (0.01,)}}, "intervals[beta0]"),
        # validity ranges ordered and >= 0 (int32)
        ({"valid_prompt_tokens": (600, 512)}, "valid_prompt_tokens"),
        ({"valid_prompt_tokens": (-1, 512)}, "valid_prompt_tokens[0]"),
        ({"valid_output_tokens": (1, 2**31)}, "valid_output_tokens[1]"),
        # quality numbers
        ({"quality": FitQuality("kfold", -1, 0.0, 0.0, 0.0)}, "quality.points"),
        ({"quality": FitQuality("kfold", 3, NAN, 0.0, 0.0)}, "quality.mean_rel"),
        ({"quality": FitQuality("kfold", 3, 0.0, 0.0, -INF)}, "quality.max_rel"),
        # recorded fit options: readable, valid, small
        ({"fit_options": {"trim": "'a lot'"}}, "fit_options"),
        ({"fit_options": {"seed": "-1"}}, "fit_options.seed"),
        ({"fit_options": {"knot_z": "inf"}}, "fit_options"),
        ({"fit_options": {"knot_z": "float('inf')"}}, "fit_options"),
        ({"fit_options": {"seed": "(" * 300 + "1" + ")" * 300}}, "fit_options[seed]"),
        ({"fit_options": {"seed": "-" * 200 + "1"}}, "fit_options"),
    ],
)
def test_each_rule(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_cost_model(_model(**changes))
    assert (info.value.reason, info.value.field) == (REASON, field)


@pytest.mark.parametrize(
    "changes",
    [
        {"alpha_knots_s": (0.05, 0.03, 0.07)},  # not monotone: HELM tables are kept exactly
        {"alpha_knots_p": (7,), "alpha_knots_s": (0.01,)},  # one knot: flat alpha
        {"beta1_s": -1e-9},  # finite is all beta1 needs
        {"valid_prompt_tokens": (0, 0), "valid_output_tokens": (0, 0)},  # unknown domain
        {"intervals": {}, "fit_options": {}, "quality": FitQuality()},
        {"fit_options": {"from_a_newer_idealrt": "x", "bootstrap": "5"}},
        {"kind": "denoised", "alpha_knots_s": (-0.003, 0.03, 0.07), "overhead_s": -0.002},
        {"kind": "imported", "beta0_s": 0.0, "alpha_knots_s": (0.0, 0.0, 0.0)},
    ],
)
def test_what_a_model_may_legitimately_look_like(changes: dict[str, Any]) -> None:
    check_cost_model(_model(**changes))


def test_the_check_is_not_fooled_by_a_non_model() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_cost_model({"alpha_knots_p": (1,)})  # type: ignore[arg-type]
    assert (info.value.reason, info.value.field) == (REASON, "cost_model")


# ---- what our own code produces --------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        FitOptions(bootstrap=30),
        FitOptions(bootstrap=30, fit_overhead=True),  # kind "denoised"
        FitOptions(bootstrap=0, beta_linear=False),
        FitOptions(bootstrap=30, robust_centre="trimmed", max_knots=3, seed=5),
    ],
)
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_models_our_fit_produces_pass(options: FitOptions, noise: float) -> None:
    samples = make_samples(Truth(overhead=0.05), noise=noise, outliers=0.05, seed=2)
    cm, replicates = fit_with_replicates(samples, options=options)
    cm.fit_options = options.to_record()
    check_cost_model(cm)
    for r in replicates:
        check_cost_model(r)
    # and without per-step or prefill times (the totals-only fit)
    bare = make_samples(Truth(), noise=noise, seed=3, steps=False, prefill=False)
    check_cost_model(fit_with_replicates(bare, options=options)[0])


P_GRID = (1, 256, 512, 1024, 1536, 1920)
O_GRID = (1, 2, 4, 8, 16, 32, 64)


def _api_samples(truth: CostModel, trials: int, seed: int, lucky: bool = False) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for p in P_GRID:
        for o in O_GRID:
            for r in range(trials):
                t = float(predict_runtime(truth, p, o))
                if trials > 1:
                    t = (t + rng.exponential(0.01)) * (1.0 + rng.exponential(0.05))
                out.append(
                    Sample(
                        prompt_tokens=p,
                        output_tokens=o,
                        prefill_ns=0,
                        decode_ns=(),
                        total_ns=round(t * 1e9),
                        repeat=r,
                    )
                )
    if lucky:  # one trial faster than the uncontended runtime (a cache hit)
        t = 0.6 * float(predict_runtime(truth, 1, 1))
        out.append(Sample(1, 1, 0, (), round(t * 1e9), repeat=trials))
    return out


@pytest.mark.parametrize("beta1", [0.0, 2e-6])
@pytest.mark.parametrize(("trials", "lucky"), [(1, False), (5, False), (5, True)])
def test_models_denoising_produces_pass(beta1: float, trials: int, lucky: bool) -> None:
    """Including the paper's minimum rule where it puts alpha(p_min) (beta1 > 0 absorbed
    into a constant beta) or the overhead (a lucky trial at (1, 1)) below zero."""
    truth = CostModel(
        id="truth",
        profile_id="",
        alpha_knots_p=P_GRID,
        alpha_knots_s=(0.02 + beta1, 0.06, 0.1, 0.2, 0.33, 0.45),
        beta0_s=0.02,
        beta1_s=beta1,
        overhead_s=0.15,
    )
    samples = _api_samples(truth, trials, seed=trials, lucky=lucky)
    for method in ("quantile", "min"):
        check_cost_model(denoise(samples, method))
    check_cost_model(denoise(samples, "quantile", 0.3, beta_linear=False))


def test_the_min_rule_can_go_below_zero_and_still_pass() -> None:
    """The case the denoised exemption exists for (see the module doc): a context-dependent
    beta, which the paper's constant-beta rule (beta_linear=False; the min rule fits beta1
    by default since issue 15) absorbs into a constant, puts alpha(p_min) below zero."""
    beta1 = 2e-6
    truth = CostModel("t", "", P_GRID, (0.02 + beta1, 0.06, 0.1, 0.2, 0.33, 0.45), 0.02, beta1)
    cm = denoise(_api_samples(truth, 1, seed=0), "min", beta_linear=False)
    assert cm.kind == "denoised" and cm.alpha_knots_s[0] < 0.0
    check_cost_model(cm)
    with pytest.raises(InvalidArgument) as info:  # the same numbers as an idealized model
        check_cost_model(dataclasses.replace(cm, kind="idealized"))
    assert (info.value.reason, info.value.field) == (REASON, "alpha_knots_s[0]")


def _helm_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {
            "openai/text-ada-001": {
                "runtime_per_output_token": 0.006,
                "runtime_for_prompt_tokens": {"1": 0.006, "256": 0.01, "512": 0.014},
                "overhead": 0.076,
            },
            "together/gpt-neox-20b": {  # not monotone: 472 is faster than 428
                "runtime_per_output_token": 0.033,
                "runtime_for_prompt_tokens": {"1": 0.035, "428": 0.118, "472": 0.11},
            },
            "m/one-knot": {"runtime_per_output_token": 0.0, "runtime_for_prompt_tokens": {"7": 0}},
        }
    ]
    for d in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):
        docs += [json.loads(f.read_text()) for f in sorted(d.glob("helm_*.json"))]
    return docs


def test_models_helm_import_produces_pass() -> None:
    count = 0
    for doc in _helm_docs():
        for cm in import_helm(doc).values():
            check_cost_model(cm)
            count += 1
    assert count >= 3
