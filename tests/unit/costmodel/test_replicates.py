"""Prepared models and replicate sets against the plain per-model computations they
replace: the same predictions, intervals and workload totals (a prepared model bit for
bit; a replicate set to 1e-12 relative, on fitted and on random replicates whose knots
differ), and numpy's own percentiles bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from idealrt.core.costmodel import bootstrap
from idealrt.core.costmodel.bootstrap import (
    ReplicateSet,
    predict_interval,
    prepare_replicates,
)
from idealrt.core.costmodel.estimate import estimate_workload, validate_queries
from idealrt.core.costmodel.fit import FitOptions, fit_with_replicates
from idealrt.core.costmodel.predict import alpha_at, predict_runtime, prepare
from idealrt.core.domain import CostModel
from idealrt.core.errors import FailedPrecondition, InvalidArgument

from .test_fit import Truth, make_samples

REL = 1e-12


def _old_interval(
    reps: list[CostModel], p: np.ndarray, o: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """predict_interval as it was: one predict_runtime per replicate, np.percentile."""
    preds = np.stack([predict_runtime(r, p, o) for r in reps])
    tail = 50.0 * (1.0 - confidence)
    lo, hi = np.percentile(preds, [tail, 100.0 - tail], axis=0)
    return lo, hi


def _old_sum_interval(reps: list[CostModel], p: np.ndarray, o: np.ndarray) -> tuple[float, ...]:
    """The engine's interval on a workload's total as it was: one estimate per replicate."""
    totals = np.array([estimate_workload(r, p, o).total_s for r in reps])
    return float(np.quantile(totals, 0.025)), float(np.quantile(totals, 0.975))


def _random_replicates(rng: np.random.Generator, r: int) -> list[CostModel]:
    """Replicates with knots drawn from a grid (as bootstrap refits choose them), some
    with one knot, denoised-style overheads, and slopes of both signs between knots."""
    grid = np.array([1, 16, 64, 128, 256, 512, 1024, 2048])
    out = []
    for _ in range(r):
        k = int(rng.integers(1, grid.size + 1))
        kp = np.sort(rng.choice(grid, size=k, replace=False))
        ks = np.cumsum(rng.uniform(0.0, 0.05, size=k)) + rng.uniform(0.0, 0.02)
        if rng.random() < 0.2 and k >= 2:  # a record from elsewhere: not monotone
            ks[-1] = ks[-2] * 0.9
        out.append(
            CostModel(
                id="",
                profile_id="",
                alpha_knots_p=tuple(int(x) for x in kp),
                alpha_knots_s=tuple(float(x) for x in ks),
                beta0_s=float(rng.uniform(1e-3, 3e-2)),
                beta1_s=float(rng.uniform(0.0, 1e-5)),
                overhead_s=float(rng.uniform(0.0, 0.2)) if rng.random() < 0.5 else 0.0,
            )
        )
    return out


def _workload(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries below, on, between and beyond every knot."""
    p = rng.integers(1, 5000, size=n)
    p[: min(n, 8)] = [1, 16, 64, 128, 2048, 2049, 3, 1024][: min(n, 8)]
    o = rng.integers(1, 700, size=n)
    return p, o


@pytest.fixture(scope="module")
def fitted() -> list[CostModel]:
    # kfold=0: no evaluation, so no fallback to the medians (whose knots never vary)
    opts = FitOptions(bootstrap=120, max_knots=6, seed=5, kfold=0)
    _, reps = fit_with_replicates(
        make_samples(Truth(), noise=0.05, outliers=0.05, seed=9), options=opts
    )
    assert len({r.alpha_knots_p for r in reps}) > 1  # the knots do differ by replicate
    return reps


def test_all_is_what_it_claims() -> None:
    for name in bootstrap.__all__:
        assert hasattr(bootstrap, name), name


@pytest.mark.parametrize("seed", range(4))
def test_a_prepared_model_predicts_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for cm in _random_replicates(rng, 20):
        p, o = _workload(rng, 500)
        pm = prepare(cm)
        assert prepare(pm) is pm
        np.testing.assert_array_equal(pm.runtime(p, o), predict_runtime(cm, p, o))
        np.testing.assert_array_equal(pm.alpha(p), alpha_at(cm, p))
        a, b = estimate_workload(pm, p, o), estimate_workload(cm, p, o)
        assert (a.total_s, a.percentiles, a.out_of_domain) == (
            b.total_s,
            b.percentiles,
            b.out_of_domain,
        )


def test_intervals_equal_the_per_model_loop_on_fitted_replicates(fitted: list[CostModel]) -> None:
    rng = np.random.default_rng(1)
    p, o = _workload(rng, 3000)
    rs = prepare_replicates(fitted)
    lo, hi = rs.interval(p, o)
    want_lo, want_hi = _old_interval(fitted, p, o)
    np.testing.assert_allclose(lo, want_lo, rtol=REL, atol=0)
    np.testing.assert_allclose(hi, want_hi, rtol=REL, atol=0)
    got = rs.sum_interval(p, o)
    assert got == pytest.approx(_old_sum_interval(fitted, p, o), rel=REL, abs=0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 777])
def test_intervals_equal_the_per_model_loop_on_random_replicates(seed: int, n: int) -> None:
    rng = np.random.default_rng(100 + seed)
    reps = _random_replicates(rng, int(rng.integers(1, 60)))
    p, o = _workload(rng, n)
    rs = prepare_replicates(reps)
    for per_query in (True, False):
        band, total = rs.estimate(p, o, per_query=per_query)
        assert total == pytest.approx(_old_sum_interval(reps, p, o), rel=REL, abs=0)
        if per_query:
            assert band is not None
            want = _old_interval(reps, p, o)
            np.testing.assert_allclose(band[0], want[0], rtol=REL, atol=0)
            np.testing.assert_allclose(band[1], want[1], rtol=REL, atol=0)
        else:
            assert band is None
    totals = np.array([estimate_workload(r, p, o).total_s for r in reps])
    np.testing.assert_allclose(rs.totals(p, o), totals, rtol=REL, atol=0)


def test_chunks_do_not_change_the_answer(
    fitted: list[CostModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    p, o = _workload(rng, 1000)
    rs = prepare_replicates(fitted)
    whole = rs.interval(p, o)
    monkeypatch.setattr(bootstrap, "CHUNK_FLOATS", 7 * rs.size + 3)  # 7 queries a chunk
    chunked = rs.interval(p, o)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


def test_other_confidences_and_the_public_helper(fitted: list[CostModel]) -> None:
    rng = np.random.default_rng(3)
    p, o = _workload(rng, 200)
    rs = prepare_replicates(fitted)
    for confidence in (0.5, 0.8, 0.99):
        got = predict_interval(rs, p, o, confidence)
        want = _old_interval(fitted, p, o, confidence)
        np.testing.assert_allclose(got[0], want[0], rtol=REL, atol=0)
        np.testing.assert_allclose(got[1], want[1], rtol=REL, atol=0)
    # broadcast like predict_runtime; models or their set
    lo, hi = predict_interval(fitted, np.array([[300], [900]]), np.array([10, 50, 90]))
    assert lo.shape == hi.shape == (2, 3)
    want_lo, _ = _old_interval(fitted, np.array([[300], [900]]), np.array([10, 50, 90]))
    np.testing.assert_allclose(lo, want_lo, rtol=REL, atol=0)
    scalar = predict_interval(fitted, 300, 20)
    assert np.shape(scalar[0]) == ()
    with pytest.raises(FailedPrecondition):
        predict_interval([], p, o)


def test_one_knot_everywhere() -> None:
    reps = [
        CostModel(id="", profile_id="", alpha_knots_p=(64,), alpha_knots_s=(0.01 * (i + 1),),
                  beta0_s=0.01, beta1_s=1e-6 * i)
        for i in range(9)
    ]  # fmt: skip
    p, o = np.array([1, 64, 65, 4000]), np.array([1, 2, 30, 500])
    rs = prepare_replicates(reps)
    np.testing.assert_allclose(rs.interval(p, o), _old_interval(reps, p, o), rtol=REL, atol=0)
    assert rs.sum_interval(p, o) == pytest.approx(_old_sum_interval(reps, p, o), rel=REL)


def test_the_arrays_are_read_only(fitted: list[CostModel]) -> None:
    rs = prepare_replicates(fitted)
    assert isinstance(rs, ReplicateSet) and rs.size == len(fitted)
    with pytest.raises(ValueError):
        rs.alpha[0, 0] = 1.0
    assert prepare_replicates([]).size == 0


def test_quantiles_are_numpys_bit_for_bit() -> None:
    """The interval code computes np.percentile / np.quantile itself (their per-call
    overhead is most of an interval on one query); on this numpy it must agree exactly."""
    rng = np.random.default_rng(4)
    for n in [*range(1, 40), 199, 200, 201, 1000]:
        for ties in (False, True):
            x = rng.integers(0, 4, (5, n)).astype(float) if ties else rng.random((5, n))
            for pcts in ([2.5, 97.5], [0.0, 100.0], [50.0], [12.3, 99.9]):
                q = bootstrap._Quantiles.of(n, np.true_divide(np.array(pcts), 100))
                np.testing.assert_array_equal(q(x), np.percentile(x, pcts, axis=1))
            q = bootstrap._Quantiles.of(n, np.asarray(bootstrap.SUM_QUANTILES))
            np.testing.assert_array_equal(q(x[0]), np.quantile(x[0], bootstrap.SUM_QUANTILES))


def test_errors_name_the_column_when_the_queries_came_as_columns() -> None:
    cm = _random_replicates(np.random.default_rng(0), 1)[0]
    with pytest.raises(InvalidArgument) as e:
        estimate_workload(cm, [3, 0], [1, 1], columns=True)
    assert (e.value.reason, e.value.field) == ("QUERY_TOKENS_INVALID", "prompt_tokens[1]")
    with pytest.raises(InvalidArgument) as e:
        validate_queries([3, 1], [1, -1], columns=True)
    assert e.value.field == "output_tokens[1]"
    with pytest.raises(InvalidArgument) as e:
        validate_queries([3, 1], [1], columns=True)
    assert (e.value.reason, e.value.field) == ("QUERIES_SHAPE_INVALID", "output_tokens")
    with pytest.raises(InvalidArgument) as e:
        validate_queries([3, 0], [1, 1])
    assert e.value.field == "queries[1].prompt_tokens"
