"""Denoising on synthetic API measurements whose uncontended runtime is known exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from idealrt.core.costmodel.predict import alpha_at, predict_runtime
from idealrt.core.domain import CostModel, Sample, SampleFlag, SampleTiming
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.metrics import denoise as denoise_mod
from idealrt.services.metrics.denoise import denoise, hat_basis

P_GRID = (1, 256, 512, 1024, 1536, 1920)
O_GRID = (1, 2, 4, 8, 16, 32, 64)


def _truth(beta1: float = 0.0) -> CostModel:
    # alpha(1) = beta(1): the identification both rules rely on.
    beta0 = 0.02
    return CostModel(
        id="truth",
        profile_id="",
        alpha_knots_p=P_GRID,
        alpha_knots_s=(beta0 + beta1, 0.06, 0.1, 0.2, 0.33, 0.45),
        beta0_s=beta0,
        beta1_s=beta1,
        overhead_s=0.15,
    )


def _sample(p: int, o: int, t_s: float, repeat: int = 0, **kw: object) -> Sample:
    ns = round(t_s * 1e9)
    return Sample(
        prompt_tokens=p,
        output_tokens=o,
        prefill_ns=0,
        decode_ns=(),
        total_ns=ns,
        repeat=repeat,
        **kw,
    )


def _samples(
    truth: CostModel,
    trials: int,
    rng: np.random.Generator | None = None,
    lucky: tuple[int, int] | None = None,
) -> list[Sample]:
    out = []
    for p in P_GRID:
        for o in O_GRID:
            base = float(predict_runtime(truth, p, o))
            for r in range(trials):
                t = base
                if rng is not None:
                    # jitter, always: a little queueing and a little slowdown
                    t = (t + rng.exponential(0.01)) * (1.0 + rng.exponential(0.01))
                    if rng.random() < 0.3:  # contended trial: queueing + shared hardware
                        t = (t + rng.exponential(0.3)) * (1.0 + rng.exponential(0.3))
                    if rng.random() < 0.05:
                        t += rng.uniform(1.0, 10.0)  # rare huge spike
                out.append(_sample(p, o, t, r))
    if lucky is not None:
        # One trial faster than the uncontended runtime (e.g. a response cache hit).
        out.append(_sample(*lucky, 0.6 * float(predict_runtime(truth, *lucky)), trials))
    return out


def _rel_err(cm: CostModel, truth: CostModel) -> float:
    p, o = np.meshgrid(np.arange(1, 1921, 37), np.arange(1, 65, 3))
    pred = predict_runtime(cm, p.ravel(), o.ravel())
    true = predict_runtime(truth, p.ravel(), o.ravel())
    return float(np.mean(np.abs(pred - true) / true))


def test_all_is_what_it_claims() -> None:
    for name in denoise_mod.__all__:
        assert hasattr(denoise_mod, name)


def test_hat_basis_reproduces_alpha() -> None:
    cm = _truth()
    p = np.array([1, 2, 100, 256, 700, 1920, 2500, 4000])
    h = hat_basis(p, cm.alpha_knots_p)
    np.testing.assert_allclose(h @ np.array(cm.alpha_knots_s), alpha_at(cm, p), rtol=1e-12)
    np.testing.assert_allclose(h.sum(axis=1), 1.0)


@pytest.mark.parametrize("method", ["min", "quantile"])
def test_noiseless_recovers_truth_exactly(method: str) -> None:
    truth = _truth()
    cm = denoise(_samples(truth, trials=2), method=method)
    assert cm.kind == "denoised"
    assert cm.alpha_knots_p == P_GRID
    assert cm.overhead_s == pytest.approx(truth.overhead_s, abs=1e-8)
    assert cm.beta0_s == pytest.approx(truth.beta0_s, abs=1e-8)
    assert cm.beta1_s == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(cm.alpha_knots_s, truth.alpha_knots_s, atol=1e-8)
    assert cm.valid_prompt_tokens == (1, 1920)
    assert cm.valid_output_tokens == (1, 64)


def test_quantile_recovers_context_dependent_beta() -> None:
    truth = _truth(beta1=2e-6)
    cm = denoise(_samples(truth, trials=1), method="quantile")
    assert cm.beta1_s == pytest.approx(2e-6, rel=1e-5)
    assert cm.beta0_s == pytest.approx(0.02, rel=1e-6)
    assert cm.overhead_s == pytest.approx(0.15, rel=1e-6)
    # Issue 15: the minimum rule fits beta1 too (it was forced to 0, absorbing the context
    # term into a larger constant beta); beta_linear=False is the paper's constant beta.
    m = denoise(_samples(truth, trials=1), method="min")
    assert m.beta1_s == pytest.approx(2e-6, rel=1e-6)
    assert m.beta0_s == pytest.approx(0.02, rel=1e-6)
    assert m.overhead_s == pytest.approx(0.15, rel=1e-6)
    assert denoise(_samples(truth, trials=1), method="min", beta_linear=False).beta1_s == 0.0


def test_min_rule_is_documented_arithmetic() -> None:
    # Two prompt sizes, minima chosen by hand: beta = 0.5, T(1) = 2.0, T(10) = 3.0
    rows = [(1, 1, 2.0), (1, 3, 3.0), (10, 1, 3.0), (10, 3, 4.0), (10, 3, 9.0), (1, 1, 7.0)]
    cm = denoise([_sample(p, o, t) for p, o, t in rows], method="min")
    assert cm.beta0_s == pytest.approx(0.5)
    assert cm.overhead_s == pytest.approx(2.0 - 0.5)  # m(1, 1) - beta
    np.testing.assert_allclose(cm.alpha_knots_s, [0.5, 1.5])


def _param_err(cm: CostModel, truth: CostModel) -> float:
    """Mean relative error over overhead, beta at context 1000 and every alpha knot."""
    errs = [
        abs(cm.overhead_s - truth.overhead_s) / truth.overhead_s,
        abs(cm.beta0_s + cm.beta1_s * 1000 - truth.beta0_s) / truth.beta0_s,
        *(abs(a - b) / b for a, b in zip(cm.alpha_knots_s, truth.alpha_knots_s, strict=True)),
    ]
    return float(np.mean(errs))


@pytest.mark.parametrize("lucky", [(1, 1), (1024, 32)])
def test_quantile_beats_min_rule_under_contention(lucky: tuple[int, int]) -> None:
    truth = _truth()
    for seed in range(5):
        samples = _samples(truth, trials=5, rng=np.random.default_rng(seed), lucky=lucky)
        q = denoise(samples, method="quantile", quantile=0.1)
        m = denoise(samples, method="min")
        assert _param_err(q, truth) < 0.03
        assert _param_err(q, truth) < _param_err(m, truth)
        assert _rel_err(q, truth) < 0.015
        assert _rel_err(q, truth) < _rel_err(m, truth)
    if lucky == (1, 1):
        # the lucky trial sets m(1, 1): the min rule's overhead/alpha split collapses
        assert m.overhead_s < 0.7 * truth.overhead_s
        assert q.overhead_s == pytest.approx(truth.overhead_s, rel=0.05)


def test_quantile_is_robust_to_one_lucky_trial() -> None:
    truth = _truth()
    samples = _samples(truth, trials=5, rng=np.random.default_rng(11))
    lucky = [*samples, _sample(1, 1, 0.01), _sample(1920, 64, 0.5)]
    a = denoise(samples)
    b = denoise(lucky)
    assert _rel_err(b, a) < 0.01
    assert _rel_err(denoise(lucky, method="min"), denoise(samples, method="min")) > 0.05


def test_excluded_samples_and_errors() -> None:
    truth = _truth()
    good = _samples(truth, trials=1)
    junk = [
        _sample(1, 1, 0.001, flag=SampleFlag.WARMUP),
        _sample(1, 1, 0.001, flag=SampleFlag.NONCONFORMING),
        _sample(1, 1, 0.001, heldout=True),
    ]
    cm = denoise(good + junk, method="min")
    assert cm.overhead_s == pytest.approx(truth.overhead_s, abs=1e-8)

    with pytest.raises(FailedPrecondition) as ei:
        denoise([_sample(1, 4, 1.0), _sample(2, 4, 1.1)])
    assert ei.value.reason == "DENOISE_GRID_INSUFFICIENT"
    with pytest.raises(FailedPrecondition) as ei:
        denoise(junk)
    assert ei.value.reason == "DENOISE_NO_SAMPLES"
    with pytest.raises(FailedPrecondition) as ei:
        # two output lengths, but never at the same prompt size: no slope for the min rule
        denoise([_sample(1, 1, 1.0), _sample(2, 4, 1.1)], method="min")
    assert ei.value.reason == "DENOISE_GRID_INSUFFICIENT"
    with pytest.raises(InvalidArgument) as ei2:
        denoise(good, method="median")
    assert ei2.value.reason == "DENOISE_METHOD_INVALID"
    with pytest.raises(InvalidArgument) as ei2:
        denoise(good, quantile=1.0)
    assert ei2.value.reason == "QUANTILE_OUT_OF_RANGE"
    with pytest.raises(InvalidArgument) as ei2:
        denoise([*junk, *good, _sample(0, 1, 1.0)])
    assert ei2.value.reason == "SAMPLE_INVALID"
    assert ei2.value.field == f"samples[{len(junk) + len(good)}]"
    with pytest.raises(InvalidArgument) as ei2:
        denoise([*good, _sample(1, 2, 1.0, batch_size=4)])
    assert ei2.value.reason == "MIXED_BATCH_SIZES"


def _streaming_api(
    rng: np.random.Generator, trials: int = 5, *, heldout_p: tuple[int, ...] = ()
) -> tuple[list[Sample], dict[int, float]]:
    """An API that reports time to first token: TTFT = 30 ms of network and queueing + the
    prefill, the total = TTFT + decode steps at beta(c) = 8 ms + 2e-6 * c + 1 ms after the
    last token; contention adds time to both. Returns the samples and the true TTFT."""
    grid_p = (1, 128, 512, 1024, *heldout_p)
    ttft_true = {p: 0.030 + 0.005 + 2e-5 * p for p in grid_p}
    out = []
    for p in grid_p:
        for o in (1, 8, 32):
            for r in range(trials):
                n = o - 1
                decode = 0.008 * n + 2e-6 * (n * p + n * o / 2.0)
                hit = rng.random() < 0.4
                slow = 1.0 + (rng.exponential(0.4) if hit else rng.exponential(0.01))
                ttft = ttft_true[p] * slow
                total = ttft + decode * slow + 0.001
                out.append(
                    Sample(
                        prompt_tokens=p,
                        output_tokens=o,
                        prefill_ns=round(ttft * 1e9),
                        decode_ns=(),
                        total_ns=round(total * 1e9),
                        repeat=r,
                        heldout=p in heldout_p,
                    )
                )
    return out, ttft_true


@pytest.mark.parametrize("method", ["min", "quantile"])
def test_alpha_never_below_the_measured_ttft_floor(method: str) -> None:
    """Issue 15: the min rule put alpha(1) at beta (8 ms) where every measured time to first
    token at p = 1 was above 35 ms, and forced beta1 = 0."""
    for seed in range(4):
        samples, ttft_true = _streaming_api(np.random.default_rng(seed))
        cm = denoise(samples, method=method)  # type: ignore[arg-type]
        for p, a in zip(cm.alpha_knots_p, cm.alpha_knots_s, strict=True):
            floor = min(s.prefill_ns for s in samples if s.prompt_tokens == p) * 1e-9
            assert a >= floor - 1e-12, (p, a, floor)
            assert a == pytest.approx(ttft_true[p], rel=0.05)
        assert cm.beta1_s > 0.0
        assert cm.beta0_s + cm.beta1_s * 500 == pytest.approx(0.008 + 2e-6 * 500, rel=0.05)
        assert cm.fit_options["denoise_alpha_floor"] == "'ttft_min'"


def test_method_options_and_quality_are_stored() -> None:
    """Issue 15: denoised models stored empty fit options and quality "none"."""
    samples, _ = _streaming_api(np.random.default_rng(0))
    q = denoise(samples, method="quantile", quantile=0.2)
    assert q.fit_options["denoise_method"] == "'quantile'"
    assert float(q.fit_options["denoise_quantile"]) == 0.2
    assert q.fit_options["beta_linear"] == "True"
    assert q.quality.method == "kfold" and q.quality.points == 6  # p = 128, 512 x 3 lengths
    m = denoise(samples, method="min")
    assert m.fit_options["denoise_method"] == "'min'" and "denoise_quantile" not in m.fit_options
    assert m.quality.method == "kfold"
    # a held-out grid: scored there, against the rule's own statistic of the trials
    held, _ = _streaming_api(np.random.default_rng(1), heldout_p=(64, 256))
    for method in ("min", "quantile"):
        cm = denoise(held, method=method)  # type: ignore[arg-type]
        assert cm.alpha_knots_p == (1, 128, 512, 1024)  # held-out sizes never fitted
        assert cm.quality.method == "heldout" and cm.quality.points == 6
        assert cm.quality.mean_rel < 0.1
    # the record is one check_cost_model accepts (FitOptions reads what it knows)
    from idealrt.core.costmodel.validate import check_cost_model

    check_cost_model(q)


def test_the_timing_evidence_is_recorded_and_a_totals_only_prefill_is_no_ttft() -> None:
    """Issue 15: a denoised model names the timing its samples had; a totals-only sample's
    prefill (a row stored before timing was recorded may hold one) is never taken for TTFT."""
    samples, _ = _streaming_api(np.random.default_rng(0))
    n = sum(1 for s in samples if s.flag is SampleFlag.OK and not s.heldout)
    streamed = [dataclasses.replace(s, timing=SampleTiming.STREAM_CHUNKS) for s in samples]
    cm = denoise(streamed, method="min")
    assert cm.fit_options["timing"] == f"stream_chunks:{n}"
    assert cm.fit_options["timing_used"] == "alpha=prefill"
    assert cm.fit_options["denoise_alpha_floor"] == "'ttft_min'"
    totals = [dataclasses.replace(s, timing=SampleTiming.TOTALS_ONLY) for s in samples]
    cm = denoise(totals, method="min")
    assert cm.fit_options["timing"] == f"totals_only:{n}"
    assert cm.fit_options["timing_used"] == "alpha=totals"
    assert cm.fit_options["denoise_alpha_floor"] == "'none'"
