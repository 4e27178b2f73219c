"""Evaluate a fitted cost model: runtime(p, o) = overhead + alpha(p) + sum_{i=1}^{o-1} beta(p+i).

Vectorized over numpy arrays; this is the hot path of workload estimation.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from idealrt.core.domain import CostModel

__all__ = ["alpha_at", "beta_at", "decode_sum", "out_of_domain", "predict_runtime"]

FloatArray = npt.NDArray[np.float64]


def alpha_at(cm: CostModel, p: npt.ArrayLike) -> FloatArray:
    """alpha(p): linear between knots, flat below the first knot, tail slope beyond the last."""
    kp = np.asarray(cm.alpha_knots_p, dtype=np.float64)
    ks = np.asarray(cm.alpha_knots_s, dtype=np.float64)
    x = np.asarray(p, dtype=np.float64)
    y = np.interp(x, kp, ks)
    if kp.size >= 2:
        slope = max((ks[-1] - ks[-2]) / (kp[-1] - kp[-2]), 0.0)
        beyond = x > kp[-1]
        if np.any(beyond):
            y = np.where(beyond, ks[-1] + slope * (x - kp[-1]), y)
    return np.asarray(y, dtype=np.float64)


def beta_at(cm: CostModel, c: npt.ArrayLike) -> FloatArray:
    """beta(c) = beta0 + beta1 * c: one decode step at context length c."""
    return np.asarray(cm.beta0_s + cm.beta1_s * np.asarray(c, dtype=np.float64), dtype=np.float64)


def decode_sum(cm: CostModel, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
    """sum_{i=1}^{o-1} (beta0 + beta1 * (p + i)) in closed form."""
    pf = np.asarray(p, dtype=np.float64)
    n = np.maximum(np.asarray(o, dtype=np.float64) - 1.0, 0.0)
    return np.asarray(
        cm.beta0_s * n + cm.beta1_s * (n * pf + n * (n + 1.0) / 2.0), dtype=np.float64
    )


def predict_runtime(cm: CostModel, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
    """Idealized runtime in seconds for prompt sizes p and output lengths o (broadcast)."""
    return cm.overhead_s + alpha_at(cm, p) + decode_sum(cm, p, o)


def out_of_domain(cm: CostModel, p: npt.ArrayLike, o: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """True where (p, o) lies outside the sizes the model was fitted on (its validity
    domain: cm.valid_prompt_tokens, cm.valid_output_tokens, inclusive), i.e. where the
    prediction extrapolates. An axis whose range is (0, 0) is unknown (imported tables) and
    never flags."""
    pa = np.asarray(p)
    oa = np.asarray(o)
    out = np.zeros(np.broadcast(pa, oa).shape, dtype=np.bool_)
    for x, (lo, hi) in ((pa, cm.valid_prompt_tokens), (oa, cm.valid_output_tokens)):
        if (lo, hi) != (0, 0):
            out = out | (x < lo) | (x > hi)
    return out
