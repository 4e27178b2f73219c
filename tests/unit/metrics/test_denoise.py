"""Denoising on synthetic API measurements whose uncontended runtime is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from idealrt.core.costmodel.predict import alpha_at, predict_runtime
from idealrt.core.domain import CostModel, Sample, SampleFlag
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
    # The paper's rule has no context term: it absorbs beta1 into a larger constant beta.
    assert denoise(_samples(truth, trials=1), method="min").beta1_s == 0.0


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
