"""Held-out error, k-fold cross-validation, HELM's proportional rule and the comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from idealrt.core.costmodel import evaluate
from idealrt.core.costmodel.evaluate import (
    compare_to_helm,
    heldout_quality,
    helm_proportional_predict,
    helm_table,
    kfold_quality,
    quality_for,
)
from idealrt.core.costmodel.fit import FitOptions
from idealrt.core.domain import CostModel, Sample, SampleFlag
from idealrt.core.errors import FailedPrecondition

DATA = [
    Path(__file__).resolve().parents[3].parent / "shared" / "data",
    Path(__file__).resolve().parents[3] / "shared" / "data",
]


def sample(p: int, o: int, total_s: float, *, heldout: bool = True, **kw: object) -> Sample:
    ns = round(total_s * 1e9)
    return Sample(p, o, prefill_ns=ns, decode_ns=(), total_ns=ns, heldout=heldout, **kw)


def curve_samples(
    prompts: tuple[int, ...], outputs: tuple[int, ...], *, heldout: bool = False
) -> list[Sample]:
    """Noise-free: alpha flat 0.02 s up to 256 then +1e-4 s/token; beta(c) = 0.01 + 2e-6 c."""
    out = []
    for p in prompts:
        a = round(1e9 * (0.02 + 1e-4 * max(p - 256, 0)))
        for o in outputs:
            d = tuple(round(1e9 * (0.01 + 2e-6 * (p + i))) for i in range(1, o))
            out.append(Sample(p, o, a, d, a + sum(d), heldout=heldout))
    return out


FLAT = CostModel(id="", profile_id="", alpha_knots_p=(1,), alpha_knots_s=(0.1,), beta0_s=0.01)


def test_all_is_what_it_claims() -> None:
    for name in evaluate.__all__:
        assert callable(getattr(evaluate, name)), name


def test_heldout_error_hand_checked() -> None:
    samples = [
        # (10, 11): predicted 0.1 + 10 * 0.01 = 0.2; measured median of 3 = 0.21
        sample(10, 11, 0.19),
        sample(10, 11, 0.21),
        sample(10, 11, 0.25),
        # (20, 1): predicted 0.1; measured 0.08 -> 0.25
        sample(20, 1, 0.08),
        # (30, 21): predicted 0.3; measured 0.3 -> 0
        sample(30, 21, 0.3),
        sample(30, 21, 0.3),
        # ignored: fit samples and a contended held-out one
        sample(10, 11, 9.0, heldout=False),
        sample(30, 21, 9.0, flag=SampleFlag.CONTENDED),
    ]
    q = heldout_quality(FLAT, samples)
    rel = [0.01 / 0.21, 0.25, 0.0]
    assert q.method == "heldout"
    assert q.points == 3
    assert q.mean_rel == pytest.approx(sum(rel) / 3)
    assert q.max_rel == pytest.approx(0.25)
    # numpy's linear 95th percentile of [0, 0.0476, 0.25]: 0.0476 + 0.9 * (0.25 - 0.0476)
    assert q.p95_rel == pytest.approx(rel[0] + 0.9 * (0.25 - rel[0]))


def test_heldout_requires_heldout_samples() -> None:
    with pytest.raises(FailedPrecondition) as err:
        heldout_quality(FLAT, [sample(10, 11, 0.2, heldout=False)])
    assert err.value.reason == "NO_HELDOUT_SAMPLES"


def test_kfold_exact_where_the_model_is_exact() -> None:
    # prompt sizes all past the bend: alpha is one straight line, so every fold predicts
    # its left-out sizes exactly.
    prompts = (256, 384, 512, 640, 768, 1024)
    q = kfold_quality(curve_samples(prompts, (2, 32)), FitOptions(bootstrap=0), k=3)
    assert q.method == "kfold"
    assert q.points == 4 * 2  # interior sizes x output lengths
    assert q.max_rel < 1e-6


def test_kfold_sees_a_missed_bend() -> None:
    # leaving out 256, the bend, the fold interpolates 128 -> 384 straight: overestimates 256
    prompts = (1, 128, 256, 384, 1024)
    q = kfold_quality(curve_samples(prompts, (2,)), FitOptions(bootstrap=0), k=3)
    assert q.method == "kfold" and q.points == 3
    a128, a384, a256 = 0.02, 0.02 + 1e-4 * 128, 0.02
    pred256 = (a128 + a384) / 2 + 0.01 + 2e-6 * 257
    meas256 = a256 + 0.01 + 2e-6 * 257
    assert q.max_rel == pytest.approx(pred256 / meas256 - 1, rel=1e-6)


def test_quality_for_picks_the_method() -> None:
    fit = curve_samples((1, 128, 256, 512, 1024), (2, 16))
    held = curve_samples((64, 300), (8,), heldout=True)
    opts = FitOptions(bootstrap=0)
    cm = CostModel(
        id="",
        profile_id="",
        alpha_knots_p=(1, 256, 1024),
        alpha_knots_s=(0.02, 0.02, 0.02 + 1e-4 * 768),
        beta0_s=0.01,
        beta1_s=2e-6,
    )
    q = quality_for(fit + held, cm, opts)
    assert (q.method, q.points) == ("heldout", 2) and q.max_rel < 1e-6
    assert quality_for(fit, cm, opts).method == "kfold"
    assert quality_for(fit, cm, FitOptions(kfold=0)).method == "none"
    assert quality_for(curve_samples((1, 1024), (2, 16)), cm, opts).method == "none"


def helm_rule(table: dict[int, float], beta: float, p: int, o: int) -> float:
    """The rule as HELM's README states it, written plainly."""
    bigger = [k for k in sorted(table) if k >= p]
    k = bigger[0] if bigger else max(table)
    return table[k] * p / k + beta * (o - 1)


def shared_file(name: str) -> Path:
    for d in DATA:
        if (d / name).exists():
            return d / name
    pytest.skip(f"shared/data/{name} is not beside this checkout")


def test_helm_rule_on_the_shared_tables() -> None:
    doc = json.loads(shared_file("helm_inference_idealized_runtimes_sample.json").read_text())
    for entry in doc.values():
        table = {int(k): float(v) for k, v in entry["runtime_for_prompt_tokens"].items()}
        beta = float(entry["runtime_per_output_token"])
        ps = np.array([1, 2, 15, 16, 17, 300, 428, 429, 1920, 2048, 5000])
        os_ = np.array([1, 2, 3, 50, 1, 64, 10, 1, 100, 7, 2])
        got = helm_proportional_predict(table, beta, ps, os_)
        want = [helm_rule(table, beta, int(p), int(o)) for p, o in zip(ps, os_, strict=True)]
        np.testing.assert_allclose(got, want, rtol=1e-15)
    # spot check by hand: gpt-neox-20b, p=300 -> key 320
    neox = doc["together/gpt-neox-20b"]
    table = {int(k): v for k, v in neox["runtime_for_prompt_tokens"].items()}
    assert helm_proportional_predict(table, 0.033, 300, 11) == pytest.approx(
        0.079 * 300 / 320 + 0.33
    )


def test_helm_rule_overhead() -> None:
    got = helm_proportional_predict({1: 0.016, 256: 0.065}, 0.016, 128, 3, overhead=0.237)
    assert got == pytest.approx(0.237 + 0.065 * 128 / 256 + 0.032)


def test_helm_table_from_measurements() -> None:
    table, beta = helm_table(curve_samples((1, 256, 1024), (2, 4)))
    assert table == pytest.approx({1: 0.02, 256: 0.02, 1024: 0.02 + 1e-4 * 768})
    assert beta == pytest.approx(0.01 + 2e-6 * 257.5, rel=0.05)  # median of all steps


def test_compare_to_helm_on_a_sparse_grid() -> None:
    fit = curve_samples((1, 256, 512, 1024), (2, 32, 128))
    ev = curve_samples((32, 64, 128, 192, 320, 448, 700, 900), (1, 100), heldout=True)
    out = compare_to_helm(fit, ev)
    assert out["points"] == 16
    assert out["ours_max_rel"] < 1e-3
    # proportional scaling of a flat region: p=32 gets 32/256 of the real prefill
    assert out["helm_max_rel"] > 0.8  # (32, 1): 1 - 32/256
    assert out["helm_mean_rel"] > 20 * out["ours_mean_rel"]
    assert out["helm_max_rel"] > out["helm_p95_rel"] >= out["helm_mean_rel"]
    # side by side: ours <= straight lines through the medians <= HELM's rule
    assert out["ours_mean_rel"] <= out["medians_mean_rel"] <= out["helm_mean_rel"]


def test_compare_to_helm_needs_data() -> None:
    with pytest.raises(FailedPrecondition):
        compare_to_helm([], curve_samples((1,), (2,)))
