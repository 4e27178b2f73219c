"""Stack-vs-stack comparison: significance both ways, and no false alarm on equal stacks."""

from __future__ import annotations

import numpy as np
import pytest

from idealrt.core.costmodel.fit import FitOptions
from idealrt.core.domain import CostModel, Sample
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.metrics import compare as compare_mod
from idealrt.services.metrics.compare import compare, compare_fits

P_GRID = (1, 64, 256, 512)
O_GRID = (2, 8, 16)


def _samples(beta: float, alpha_per_token: float, seed: int, noise: float = 0.03) -> list[Sample]:
    """Exact-length generations of a stack with alpha(p) = 0.01 + a*p and constant beta,
    each time multiplied by lognormal noise (sigma = `noise`)."""
    rng = np.random.default_rng(seed)
    out = []
    for rep in range(3):
        for p in P_GRID:
            for o in O_GRID:
                pre = (0.01 + alpha_per_token * p) * rng.lognormal(0.0, noise)
                steps = beta * rng.lognormal(0.0, noise, size=o - 1)
                pre_ns = round(pre * 1e9)
                dec_ns = tuple(round(s * 1e9) for s in steps)
                out.append(
                    Sample(
                        prompt_tokens=p,
                        output_tokens=o,
                        prefill_ns=pre_ns,
                        decode_ns=dec_ns,
                        total_ns=pre_ns + sum(dec_ns),
                        repeat=rep,
                    )
                )
    return out


WL_P = np.array([1, 100, 300, 500, 500, 40])
WL_O = np.array([16, 4, 8, 2, 10, 12])
OPTS = FitOptions(robust_centre="median")


def test_all_is_what_it_claims() -> None:
    for name in compare_mod.__all__:
        assert hasattr(compare_mod, name)


def test_slower_stack_is_significant_both_ways() -> None:
    slow = _samples(beta=0.012, alpha_per_token=1e-4, seed=1)
    fast = _samples(beta=0.010, alpha_per_token=1e-4, seed=2)
    ab = compare(slow, fast, WL_P, WL_O, n_boot=60, seed=0, options=OPTS)
    assert ab.ratio > 1.05
    assert ab.low > 1.0
    assert ab.low <= ab.ratio <= ab.high
    assert ab.significant
    ba = compare(fast, slow, WL_P, WL_O, n_boot=60, seed=0, options=OPTS)
    assert ba.high < 1.0
    assert ba.significant
    assert ba.ratio == pytest.approx(1.0 / ab.ratio, rel=1e-9)
    assert ab.a_total_s == pytest.approx(ba.b_total_s)


def test_equal_stacks_are_not_significant() -> None:
    a = _samples(beta=0.01, alpha_per_token=1e-4, seed=3)
    b = _samples(beta=0.01, alpha_per_token=1e-4, seed=4)
    c = compare(a, b, WL_P, WL_O, n_boot=60, seed=0, options=OPTS)
    assert c.low < 1.0 < c.high
    assert not c.significant
    assert c.ratio == pytest.approx(1.0, abs=0.03)
    assert c.a_replicates == c.b_replicates == 60


def _cm(beta: float) -> CostModel:
    return CostModel(id="", profile_id="", alpha_knots_p=(1,), alpha_knots_s=(1.0,), beta0_s=beta)


def test_compare_fits_with_given_replicates_is_exact_arithmetic() -> None:
    # workload: one query (1, 3): runtime 1 + 2*beta. A: beta 1 -> 3 s; B: beta 0.5 -> 2 s.
    a_reps = [_cm(b) for b in np.linspace(0.9, 1.1, 21)]
    b_reps = [_cm(b) for b in np.linspace(0.45, 0.55, 21)]
    c = compare_fits(_cm(1.0), _cm(0.5), a_reps, b_reps, [1, 1], [3, 3])
    assert c.a_total_s == pytest.approx(6.0)
    assert c.b_total_s == pytest.approx(4.0)
    assert c.ratio == pytest.approx(1.5)
    ratios = np.divide.outer(1 + 2 * np.linspace(0.9, 1.1, 21), 1 + 2 * np.linspace(0.45, 0.55, 21))
    assert c.low == pytest.approx(np.percentile(ratios, 2.5))
    assert c.high == pytest.approx(np.percentile(ratios, 97.5))
    assert c.significant


def test_errors() -> None:
    reps = [_cm(1.0)] * 25
    with pytest.raises(FailedPrecondition) as ei:
        compare_fits(_cm(1.0), _cm(1.0), reps[:5], reps, [1], [1])
    assert ei.value.reason == "NOT_ENOUGH_REPLICATES"
    with pytest.raises(InvalidArgument) as ei2:
        compare_fits(_cm(1.0), _cm(1.0), reps, reps, [1, 0], [1, 1])
    assert ei2.value.field == "queries[1].prompt_tokens"
    with pytest.raises(InvalidArgument) as ei2:
        compare_fits(_cm(1.0), _cm(1.0), reps, reps, [], [])
    assert ei2.value.reason == "WORKLOAD_EMPTY"
    with pytest.raises(InvalidArgument) as ei2:
        compare_fits(_cm(1.0), _cm(1.0), reps, reps, [1], [1], confidence=1.0)
    assert ei2.value.reason == "CONFIDENCE_INVALID"
    with pytest.raises(InvalidArgument) as ei2:
        compare([], [], [1], [1], n_boot=5)
    assert ei2.value.reason == "N_BOOT_INVALID"
