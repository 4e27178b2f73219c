"""Cost-model evaluation: closed forms against explicit sums, interpolation, validity domain."""

from __future__ import annotations

import numpy as np
import pytest

from idealrt.core.costmodel import predict
from idealrt.core.costmodel.predict import (
    alpha_at,
    beta_at,
    decode_sum,
    out_of_domain,
    predict_runtime,
)
from idealrt.core.domain import CostModel


def model(**kw: object) -> CostModel:
    base: dict[str, object] = {
        "id": "m",
        "profile_id": "p",
        "alpha_knots_p": (16, 256, 1024),
        "alpha_knots_s": (0.02, 0.02, 0.1),
        "beta0_s": 0.01,
        "beta1_s": 3e-6,
        "overhead_s": 0.0,
        "valid_prompt_tokens": (16, 1024),
        "valid_output_tokens": (1, 128),
    }
    base.update(kw)
    return CostModel(**base)


def test_all_is_what_it_claims() -> None:
    assert sorted(predict.__all__) == sorted(
        [
            "PreparedModel",
            "alpha_at",
            "beta_at",
            "decode_sum",
            "out_of_domain",
            "predict_runtime",
            "prepare",
        ]
    )
    for name in predict.__all__:
        assert callable(getattr(predict, name))


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_equals_explicit_sum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cm = model(
        beta0_s=float(rng.uniform(1e-3, 5e-2)),
        beta1_s=float(rng.uniform(0, 1e-5)),
        overhead_s=float(rng.uniform(0, 0.3)),
    )
    ps = rng.integers(1, 3000, size=20)
    os_ = rng.integers(1, 300, size=20)
    got = predict_runtime(cm, ps, os_)
    for k, (p, o) in enumerate(zip(ps.tolist(), os_.tolist(), strict=True)):
        steps = sum(cm.beta0_s + cm.beta1_s * (p + i) for i in range(1, o))
        want = cm.overhead_s + float(alpha_at(cm, p)) + steps
        assert got[k] == pytest.approx(want, rel=1e-12)
        assert decode_sum(cm, p, o) == pytest.approx(steps, rel=1e-12, abs=1e-15)


def test_one_output_token_is_alpha_plus_overhead() -> None:
    cm = model(overhead_s=0.05)
    assert predict_runtime(cm, 256, 1) == pytest.approx(0.07)
    assert decode_sum(cm, 256, 1) == 0.0


def test_alpha_interpolates_flat_below_and_tail_slope_beyond() -> None:
    cm = model()
    assert alpha_at(cm, 1) == pytest.approx(0.02)  # flat below the first knot
    assert alpha_at(cm, 100) == pytest.approx(0.02)
    assert alpha_at(cm, 640) == pytest.approx(0.06)  # halfway between 256 and 1024
    slope = (0.1 - 0.02) / (1024 - 256)
    assert alpha_at(cm, 2048) == pytest.approx(0.1 + slope * 1024)


def test_single_knot_is_constant() -> None:
    cm = model(alpha_knots_p=(128,), alpha_knots_s=(0.03,))
    np.testing.assert_allclose(alpha_at(cm, [1, 128, 4096]), [0.03, 0.03, 0.03])


def test_broadcasting_shapes() -> None:
    cm = model()
    out = predict_runtime(cm, np.array([[1], [512]]), np.array([1, 8, 64]))
    assert out.shape == (2, 3)
    assert np.all(np.diff(out, axis=1) > 0)
    assert beta_at(cm, [0, 1000]).tolist() == pytest.approx([0.01, 0.013])


def test_out_of_domain_flags_each_axis() -> None:
    cm = model()
    p = np.array([16, 1024, 15, 1025, 500, 500])
    o = np.array([1, 128, 10, 10, 0, 129])
    assert out_of_domain(cm, p, o).tolist() == [False, False, True, True, True, True]


def test_unknown_domain_axis_never_flags() -> None:
    cm = model(valid_output_tokens=(0, 0))
    assert out_of_domain(cm, [500, 2000], 10_000).tolist() == [False, True]
