"""Workload estimation: sums and percentiles against explicit per-query loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from idealrt.core.costmodel import estimate
from idealrt.core.costmodel.estimate import WorkloadAccumulator, estimate_workload
from idealrt.core.domain import CostModel
from idealrt.core.errors import InvalidArgument, ResourceExhausted


def _cm(valid_p: tuple[int, int] = (1, 1024), valid_o: tuple[int, int] = (1, 64)) -> CostModel:
    return CostModel(
        id="cm",
        profile_id="prof",
        alpha_knots_p=(1, 256, 1024),
        alpha_knots_s=(0.02, 0.05, 0.2),
        beta0_s=0.01,
        beta1_s=1e-6,
        overhead_s=0.003,
        valid_prompt_tokens=valid_p,
        valid_output_tokens=valid_o,
    )


def _runtime_loop(cm: CostModel, p: int, o: int) -> float:
    """The cost model written out term by term, independently of predict.py."""
    kp, ks = cm.alpha_knots_p, cm.alpha_knots_s
    if p <= kp[0]:
        alpha = ks[0]
    elif p >= kp[-1]:
        alpha = ks[-1] + (ks[-1] - ks[-2]) / (kp[-1] - kp[-2]) * (p - kp[-1])
    else:
        j = next(i for i in range(len(kp) - 1) if kp[i] <= p <= kp[i + 1])
        t = (p - kp[j]) / (kp[j + 1] - kp[j])
        alpha = ks[j] + t * (ks[j + 1] - ks[j])
    decode = sum(cm.beta0_s + cm.beta1_s * (p + i) for i in range(1, o))
    return cm.overhead_s + alpha + decode


def test_all_is_what_it_claims() -> None:
    for name in estimate.__all__:
        assert hasattr(estimate, name)


def test_sum_mean_percentiles_match_explicit_loop() -> None:
    rng = np.random.default_rng(1)
    p = rng.integers(1, 2000, size=300)
    o = rng.integers(1, 100, size=300)
    cm = _cm()
    expected = [_runtime_loop(cm, int(a), int(b)) for a, b in zip(p, o, strict=True)]
    est = estimate_workload(cm, p, o, percentiles=(0, 50, 90, 100), keep_runtimes=True)
    assert est.count == 300
    assert est.total_s == pytest.approx(math.fsum(expected), rel=1e-12)
    assert est.mean_s == pytest.approx(math.fsum(expected) / 300, rel=1e-12)
    assert est.runtimes_s is not None
    np.testing.assert_allclose(est.runtimes_s, expected, rtol=1e-12)
    srt = sorted(expected)
    assert est.percentiles[0] == pytest.approx(srt[0])
    assert est.percentiles[100] == pytest.approx(srt[-1])
    # numpy's linear rule: the 50th percentile of 300 values is the mean of ranks 149 and 150.
    assert est.percentiles[50] == pytest.approx((srt[149] + srt[150]) / 2)
    assert est.percentiles[90] == pytest.approx(srt[269] + 0.1 * (srt[270] - srt[269]))
    # out of domain: p > 1024 or o > 64
    assert est.out_of_domain == int(np.count_nonzero((p > 1024) | (o > 64)))


def test_single_query_and_no_runtimes_by_default() -> None:
    cm = _cm()
    est = estimate_workload(cm, [1], [1])
    assert est.total_s == pytest.approx(0.003 + 0.02)
    assert est.percentiles == {
        50.0: pytest.approx(0.023),
        90.0: pytest.approx(0.023),
        99.0: pytest.approx(0.023),
    }
    assert est.runtimes_s is None
    assert est.out_of_domain == 0


def test_unknown_domain_never_counts() -> None:
    est = estimate_workload(_cm((0, 0), (0, 0)), [5000], [500])
    assert est.out_of_domain == 0


@pytest.mark.parametrize(
    ("p", "o", "field"),
    [
        ([3, 0, 2], [1, 1, 1], "queries[1].prompt_tokens"),
        ([3, 1, 2], [1, 1, -4], "queries[2].output_tokens"),
        ([1.0, 2.5], [1, 1], "queries[1].prompt_tokens"),
        ([1.0, float("nan")], [1, 1], "queries[1].prompt_tokens"),
        ([1, 2], [1.0, float("inf")], "queries[1].output_tokens"),
    ],
)
def test_bad_tokens_name_first_bad_index(p: list[float], o: list[float], field: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        estimate_workload(_cm(), p, o)
    assert ei.value.reason == "QUERY_TOKENS_INVALID"
    assert ei.value.field == field


def test_shape_and_emptiness_and_percentile_errors() -> None:
    with pytest.raises(InvalidArgument) as ei:
        estimate_workload(_cm(), [1, 2], [1])
    assert ei.value.reason == "QUERIES_SHAPE_INVALID"
    with pytest.raises(InvalidArgument) as ei:
        estimate_workload(_cm(), [], [])
    assert ei.value.reason == "WORKLOAD_EMPTY"
    with pytest.raises(InvalidArgument) as ei:
        estimate_workload(_cm(), [1], [1], percentiles=(50, 101))
    assert ei.value.reason == "PERCENTILE_OUT_OF_RANGE"
    with pytest.raises(InvalidArgument) as ei:
        estimate_workload(_cm(), ["a"], ["b"])
    assert ei.value.reason == "QUERIES_TYPE_INVALID"


def test_accumulator_equals_one_shot() -> None:
    rng = np.random.default_rng(7)
    p = rng.integers(1, 3000, size=10_001)
    o = rng.integers(1, 200, size=10_001)
    cm = _cm()
    acc = WorkloadAccumulator(cm, percentiles=(50, 99, 99.9))
    for lo in range(0, p.size, 997):
        acc.add(p[lo : lo + 997], o[lo : lo + 997])
    acc.add([], [])
    assert acc.count == p.size
    got = acc.result(keep_runtimes=True)
    want = estimate_workload(cm, p, o, percentiles=(50, 99, 99.9), keep_runtimes=True)
    assert got.count == want.count
    assert got.total_s == pytest.approx(want.total_s, rel=1e-12)
    assert got.percentiles == want.percentiles  # same values, same order statistics
    assert got.out_of_domain == want.out_of_domain > 0
    assert got.runtimes_s is not None and want.runtimes_s is not None
    np.testing.assert_array_equal(got.runtimes_s, want.runtimes_s)


def test_accumulator_errors_use_stream_index_and_cap() -> None:
    acc = WorkloadAccumulator(_cm(), max_queries=5)
    acc.add([1, 2, 3], [1, 1, 1])
    with pytest.raises(InvalidArgument) as ei:
        acc.add([4, 0], [1, 1])
    assert ei.value.field == "queries[4].prompt_tokens"
    with pytest.raises(ResourceExhausted) as ei2:
        acc.add([1, 1, 1], [1, 1, 1])
    assert ei2.value.reason == "WORKLOAD_TOO_LARGE"
    assert acc.count == 3
    with pytest.raises(InvalidArgument):
        WorkloadAccumulator(_cm()).result()


def test_a_bad_token_count_is_shown_as_a_plain_number() -> None:
    """The message shows what the caller sent (-5), not numpy's repr (np.int64(-5))."""
    cm = CostModel(
        id="cm", profile_id="", alpha_knots_p=(1, 8), alpha_knots_s=(0.1, 0.2), beta0_s=0.01
    )
    with pytest.raises(InvalidArgument) as ei:
        estimate_workload(cm, np.array([3, -5], dtype=np.int64), [1, 1])
    assert ei.value.reason == "QUERY_TOKENS_INVALID"
    assert ei.value.field == "queries[1].prompt_tokens"
    assert "got -5" in ei.value.message and "np." not in ei.value.message
