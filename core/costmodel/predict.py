"""Evaluate a fitted cost model: runtime(p, o) = overhead + alpha(p) + sum_{i=1}^{o-1} beta(p+i).

Vectorized over numpy arrays; this is the hot path of workload estimation. `prepare(cm)`
turns a model into its `PreparedModel` once (knots as float arrays, the tail slope): a
service that evaluates the same model many times keeps that and skips the conversions.
The functions taking a `CostModel` and the prepared form compute with the same operations
in the same order, so their results are identical, not merely close.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from idealrt.core.domain import CostModel

__all__ = [
    "PreparedModel",
    "alpha_at",
    "beta_at",
    "decode_sum",
    "out_of_domain",
    "predict_runtime",
    "prepare",
]

FloatArray = npt.NDArray[np.float64]


def _tail_slope(kp: FloatArray, ks: FloatArray) -> float:
    """alpha's slope beyond the last knot: the last segment's, never negative; 0 with one knot."""
    if kp.size < 2:
        return 0.0
    return float(max((ks[-1] - ks[-2]) / (kp[-1] - kp[-2]), 0.0))


def _alpha(kp: FloatArray, ks: FloatArray, slope: float, p: npt.ArrayLike) -> FloatArray:
    x = np.asarray(p, dtype=np.float64)
    y = np.interp(x, kp, ks)
    if kp.size >= 2:
        beyond = x > kp[-1]
        if np.any(beyond):
            y = np.where(beyond, ks[-1] + slope * (x - kp[-1]), y)
    return np.asarray(y, dtype=np.float64)


def _decode_sum(b0: float, b1: float, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
    pf = np.asarray(p, dtype=np.float64)
    n = np.maximum(np.asarray(o, dtype=np.float64) - 1.0, 0.0)
    return np.asarray(b0 * n + b1 * (n * pf + n * (n + 1.0) / 2.0), dtype=np.float64)


def _out_of_domain(
    valid_p: tuple[int, int], valid_o: tuple[int, int], p: npt.ArrayLike, o: npt.ArrayLike
) -> npt.NDArray[np.bool_]:
    pa = np.asarray(p)
    oa = np.asarray(o)
    shape = pa.shape if pa.shape == oa.shape else np.broadcast_shapes(pa.shape, oa.shape)
    out: npt.NDArray[np.bool_] | None = None
    for x, (lo, hi) in ((pa, valid_p), (oa, valid_o)):
        if (lo, hi) != (0, 0):
            flags = (x < lo) | (x > hi)
            out = flags if out is None else out | flags
    if out is None:
        return np.zeros(shape, dtype=np.bool_)
    if out.shape != shape:
        out = np.broadcast_to(out, shape).copy()
    return np.asarray(out, dtype=np.bool_)


def alpha_at(cm: CostModel, p: npt.ArrayLike) -> FloatArray:
    """alpha(p): linear between knots, flat below the first knot, tail slope beyond the last."""
    kp = np.asarray(cm.alpha_knots_p, dtype=np.float64)
    ks = np.asarray(cm.alpha_knots_s, dtype=np.float64)
    return _alpha(kp, ks, _tail_slope(kp, ks), p)


def beta_at(cm: CostModel, c: npt.ArrayLike) -> FloatArray:
    """beta(c) = beta0 + beta1 * c: one decode step at context length c."""
    return np.asarray(cm.beta0_s + cm.beta1_s * np.asarray(c, dtype=np.float64), dtype=np.float64)


def decode_sum(cm: CostModel, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
    """sum_{i=1}^{o-1} (beta0 + beta1 * (p + i)) in closed form."""
    return _decode_sum(cm.beta0_s, cm.beta1_s, p, o)


def predict_runtime(cm: CostModel, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
    """Idealized runtime in seconds for prompt sizes p and output lengths o (broadcast)."""
    return cm.overhead_s + alpha_at(cm, p) + decode_sum(cm, p, o)


def out_of_domain(cm: CostModel, p: npt.ArrayLike, o: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """True where (p, o) lies outside the sizes the model was fitted on (its validity
    domain: cm.valid_prompt_tokens, cm.valid_output_tokens, inclusive), i.e. where the
    prediction extrapolates. An axis whose range is (0, 0) is unknown (imported tables) and
    never flags."""
    return _out_of_domain(cm.valid_prompt_tokens, cm.valid_output_tokens, p, o)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedModel:
    """`model` ready to evaluate: what `alpha_at` / `predict_runtime` derive from it on
    every call, derived once. The model is shared, never copied: do not change it."""

    model: CostModel
    knots_p: FloatArray
    knots_s: FloatArray
    tail_slope: float

    def alpha(self, p: npt.ArrayLike) -> FloatArray:
        """alpha_at(model, p)."""
        return _alpha(self.knots_p, self.knots_s, self.tail_slope, p)

    def runtime(self, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
        """predict_runtime(model, p, o)."""
        cm = self.model
        return cm.overhead_s + self.alpha(p) + _decode_sum(cm.beta0_s, cm.beta1_s, p, o)

    def out_of_domain(self, p: npt.ArrayLike, o: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """out_of_domain(model, p, o)."""
        return _out_of_domain(self.model.valid_prompt_tokens, self.model.valid_output_tokens, p, o)


def prepare(cm: CostModel | PreparedModel) -> PreparedModel:
    """The prepared form of `cm` (`cm` itself when it is one already)."""
    if isinstance(cm, PreparedModel):
        return cm
    kp = np.asarray(cm.alpha_knots_p, dtype=np.float64)
    ks = np.asarray(cm.alpha_knots_s, dtype=np.float64)
    kp.setflags(write=False)
    ks.setflags(write=False)
    return PreparedModel(model=cm, knots_p=kp, knots_s=ks, tail_slope=_tail_slope(kp, ks))
