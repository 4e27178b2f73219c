"""Denoised runtime: the cost model of a black-box API with contention removed.

Input: repeated measurements of exact-length generations through the API (`Sample`s with
`total_ns`, and `prefill_ns` = time to first token; `decode_ns` may be empty). Contention
only ever *adds* time, so the uncontended runtime sits at the bottom of each configuration's
distribution. Two rules, both returning `CostModel(kind="denoised")` with `overhead_s` set:

`method="min"` -- the paper's rule (Narayanan et al. 2023, after HELM), reproduced exactly:
  1. m(p, o) = min over trials of total time, per configuration (p, o).
  2. beta = the slope of m in (o - 1), pooled over prompt sizes (least squares with one
     intercept per p, i.e. the within-p slope). beta is constant: beta1 = 0.
  3. T(p) = mean over o of m(p, o) - beta * (o - 1): the runtime of a 1-token generation.
  4. overhead = m(1, 1) - beta. The paper's identification: a 1-token prompt producing 1 token
     costs one decode step, so alpha(1) = beta and the rest of m(1, 1) is per-request
     overhead. When (1, 1) was not measured, T(p_min) stands in for m(1, 1) (i.e. the rule
     assumes alpha(p_min) = beta).
  5. alpha(p) = T(p) - overhead at every profiled p (no smoothing, no monotone correction,
     no clipping: faithful to the rule). One lucky-fast trial moves a minimum, and through
     it beta, alpha or the overhead.

`method="quantile"` (default) -- low-quantile regression over *all* samples:
  total_s = overhead + sum_k a_k h_k(p) + beta0 * (o - 1) + beta1 * sum_{i=1}^{o-1} (p + i)
  where h_k are piecewise-linear hat functions at the profiled prompt sizes (so alpha is
  exactly the CostModel's piecewise-linear alpha), fitted by minimising the pinball loss at
  `quantile` (default 0.1) as a linear program (scipy HiGHS). Constraints: overhead, beta0,
  beta1 >= 0; alpha non-decreasing in p. The same identification as the paper:
  alpha(p_min) = beta(p_min) = beta0 + beta1 * p_min (exact when p_min = 1). Every trial
  contributes; a single lucky or unlucky trial cannot move a low quantile by more than its
  share of the data, and huge spikes above it carry no more weight than small ones.
  With positive noise the fit estimates the q-quantile of the contended runtime, which is
  above the uncontended one by the noise's q-quantile. That bias does not shrink with more
  trials, while the minimum's does: on synthetic data (30% of trials contended, 5% spikes),
  the quantile rule has the lower prediction error at 3-5 trials per configuration and the
  lower parameter error at every trial count we tried (3-10); with 10 clean-tailed trials and
  no lucky trial the minimum rule predicts slightly better (0.7% vs 0.8% mean relative
  error). One lucky-fast trial at a large configuration reverses that (the minimum rule's
  error roughly triples); tests/unit/metrics/test_denoise.py pins these cases.

Samples used by both: not warm-ups, not nonconforming, not held out.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.sparse

from idealrt.core.domain import CostModel, FitQuality, Sample, SampleFlag
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.reasons import MIXED_BATCH_SIZES
from idealrt.services.metrics.reasons import (
    DENOISE_FIT_FAILED,
    DENOISE_GRID_INSUFFICIENT,
    DENOISE_METHOD_INVALID,
    DENOISE_NO_SAMPLES,
    QUANTILE_OUT_OF_RANGE,
    SAMPLE_INVALID,
)

__all__ = ["DenoiseMethod", "denoise", "denoise_min", "denoise_quantile", "hat_basis"]

DenoiseMethod = Literal["quantile", "min"]
FloatArray = npt.NDArray[np.float64]

_EXCLUDED = (SampleFlag.WARMUP, SampleFlag.NONCONFORMING)


def _usable(samples: Sequence[Sample]) -> list[Sample]:
    out: list[Sample] = []
    for i, s in enumerate(samples):
        if s.flag in _EXCLUDED or s.heldout:
            continue
        if s.prompt_tokens < 1 or s.output_tokens < 1 or s.total_ns <= 0:
            raise InvalidArgument(
                SAMPLE_INVALID,
                f"samples need prompt_tokens >= 1, output_tokens >= 1 and total_ns > 0; "
                f"got p={s.prompt_tokens}, o={s.output_tokens}, total_ns={s.total_ns}",
                field=f"samples[{i}]",
            )
        if out and s.batch_size != out[0].batch_size:
            raise InvalidArgument(
                MIXED_BATCH_SIZES,
                f"one cost model describes one batch size; samples mix {out[0].batch_size} "
                f"and {s.batch_size}",
                field=f"samples[{i}].batch_size",
            )
        out.append(s)
    if not out:
        raise FailedPrecondition(
            DENOISE_NO_SAMPLES,
            "no usable samples (warm-ups, nonconforming and held-out samples are excluded)",
            field="samples",
        )
    if len({s.output_tokens for s in out}) < 2:
        raise FailedPrecondition(
            DENOISE_GRID_INSUFFICIENT,
            "denoising needs at least two distinct output lengths to separate the per-token "
            "time from the per-request time",
            field="samples",
        )
    return out


def hat_basis(p: npt.ArrayLike, knots: Sequence[int]) -> FloatArray:
    """Piecewise-linear hat functions at `knots` evaluated at p: shape (len(p), len(knots)).

    Row i holds the weights w with alpha(p_i) = sum_k w_k alpha(knot_k) for the CostModel's
    alpha (linear between knots, flat below the first, tail slope beyond the last)."""
    x = np.asarray(p, dtype=np.float64)
    kp = np.asarray(knots, dtype=np.float64)
    k = kp.size
    basis = np.zeros((x.size, k))
    if k == 1:
        basis[:, 0] = 1.0
        return basis
    for j in range(k):
        unit = np.zeros(k)
        unit[j] = 1.0
        basis[:, j] = np.interp(x, kp, unit)
    beyond = x > kp[-1]
    if np.any(beyond):
        t = (x[beyond] - kp[-1]) / (kp[-1] - kp[-2])
        basis[beyond, :] = 0.0
        basis[beyond, -1] = 1.0 + t
        basis[beyond, -2] = -t
    return basis


def _model(
    knots: Sequence[int],
    alphas: Sequence[float],
    beta0: float,
    beta1: float,
    overhead: float,
    samples: Sequence[Sample],
    name: str,
    id: str,
    profile_id: str,
) -> CostModel:
    return CostModel(
        id=id or uuid.uuid4().hex,
        profile_id=profile_id,
        alpha_knots_p=tuple(int(k) for k in knots),
        alpha_knots_s=tuple(float(a) for a in alphas),
        beta0_s=float(beta0),
        beta1_s=float(beta1),
        overhead_s=float(overhead),
        name=name,
        kind="denoised",
        quality=FitQuality(method="none"),
        valid_prompt_tokens=(
            min(s.prompt_tokens for s in samples),
            max(s.prompt_tokens for s in samples),
        ),
        valid_output_tokens=(
            min(s.output_tokens for s in samples),
            max(s.output_tokens for s in samples),
        ),
    )


def denoise_min(samples: Sequence[Sample], *, id: str = "", profile_id: str = "") -> CostModel:
    """The paper's minimum-over-trials rule (see the module docstring, steps 1-5)."""
    used = _usable(samples)
    minima: dict[tuple[int, int], float] = {}
    for s in used:
        key = (s.prompt_tokens, s.output_tokens)
        t = s.total_ns * 1e-9
        minima[key] = min(minima.get(key, math.inf), t)
    by_p: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (p, o), m in sorted(minima.items()):
        by_p[p].append((o, m))

    sxy = sxx = 0.0
    for rows in by_p.values():
        if len(rows) < 2:
            continue
        x = np.array([o - 1 for o, _ in rows], dtype=np.float64)
        y = np.array([m for _, m in rows])
        xc = x - x.mean()
        sxy += float(xc @ (y - y.mean()))
        sxx += float(xc @ xc)
    if sxx == 0.0:
        raise FailedPrecondition(
            DENOISE_GRID_INSUFFICIENT,
            "the minimum rule needs some prompt size measured at two or more output lengths",
            field="samples",
        )
    beta = sxy / sxx
    knots = sorted(by_p)
    t1 = {p: float(np.mean([m - beta * (o - 1) for o, m in by_p[p]])) for p in knots}
    t11 = minima.get((1, 1), t1[knots[0]])
    overhead = t11 - beta
    alphas = [t1[p] - overhead for p in knots]
    return _model(knots, alphas, beta, 0.0, overhead, used, "denoised-min", id, profile_id)


def denoise_quantile(
    samples: Sequence[Sample],
    *,
    quantile: float = 0.1,
    beta_linear: bool = True,
    id: str = "",
    profile_id: str = "",
) -> CostModel:
    """Low-quantile regression of total time on the cost model's linear design (see the
    module docstring). `beta_linear=False` fits a constant beta (beta1 = 0)."""
    if not (0.0 < quantile < 1.0):
        raise InvalidArgument(
            QUANTILE_OUT_OF_RANGE,
            f"quantile must lie strictly between 0 and 1, got {quantile}",
            field="quantile",
        )
    used = _usable(samples)
    p = np.array([s.prompt_tokens for s in used], dtype=np.float64)
    o = np.array([s.output_tokens for s in used], dtype=np.float64)
    y = np.array([s.total_ns for s in used], dtype=np.float64) * 1e-9
    knots = sorted({s.prompt_tokens for s in used})
    k = len(knots)
    n = y.size
    h = hat_basis(p, knots)
    steps = o - 1.0
    ctx_sum = steps * p + steps * o / 2.0  # sum_{i=1}^{o-1} (p + i)

    # theta = [overhead, a_2..a_K, beta0, beta1]; a_1 = beta0 + beta1 * knots[0] (identification)
    cols = [np.ones(n), *(h[:, j] for j in range(1, k)), steps + h[:, 0]]
    if beta_linear:
        cols.append(ctx_sum + knots[0] * h[:, 0])
    x = np.column_stack(cols)
    m = x.shape[1]
    i_b0 = k
    i_b1 = k + 1 if beta_linear else -1

    # Monotone alpha: a_{j+1} - a_j >= 0, written as C theta <= 0.
    cons: list[FloatArray] = []
    for j in range(1, k):
        row = np.zeros(m)
        row[j] = -1.0  # a_{j+1}: column j holds knot j (0-based knot index j)
        if j == 1:
            row[i_b0] += 1.0
            if beta_linear:
                row[i_b1] += knots[0]
        else:
            row[j - 1] += 1.0
        cons.append(row)

    # Scale columns and the response so HiGHS works near unit magnitudes.
    col_scale = np.maximum(np.abs(x).max(axis=0), 1e-300)
    y_scale = float(np.median(y))
    xs = x / col_scale
    ys = y / y_scale
    d = y_scale / col_scale  # theta = d * theta_scaled

    eye = scipy.sparse.identity(n, format="csr")
    a_eq = scipy.sparse.hstack([scipy.sparse.csr_matrix(xs), eye, -eye], format="csr")
    c = np.concatenate([np.zeros(m), np.full(n, quantile), np.full(n, 1.0 - quantile)])
    bounds: list[tuple[float | None, float | None]] = [(0.0, None)] + [(None, None)] * (k - 1)
    bounds += [(0.0, None)] * (2 if beta_linear else 1)
    bounds += [(0.0, None)] * (2 * n)
    a_ub = None
    b_ub = None
    if cons:
        cmat = np.vstack(cons) * d
        a_ub = scipy.sparse.hstack(
            [scipy.sparse.csr_matrix(cmat), scipy.sparse.csr_matrix((len(cons), 2 * n))],
            format="csr",
        )
        b_ub = np.zeros(len(cons))
    res = scipy.optimize.linprog(
        c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=ys, bounds=bounds, method="highs"
    )
    if res.status != 0 or res.x is None:
        raise FailedPrecondition(
            DENOISE_FIT_FAILED,
            f"quantile regression did not converge: {res.message}",
            field="samples",
        )
    theta = res.x[:m] * d
    overhead = float(theta[0])
    beta0 = float(theta[i_b0])
    beta1 = float(theta[i_b1]) if beta_linear else 0.0
    alphas = [beta0 + beta1 * knots[0], *(float(v) for v in theta[1:k])]
    return _model(
        knots, alphas, beta0, beta1, overhead, used, f"denoised-q{quantile:g}", id, profile_id
    )


def denoise(
    samples: Sequence[Sample],
    method: DenoiseMethod = "quantile",
    quantile: float = 0.1,
    *,
    beta_linear: bool = True,
    id: str = "",
    profile_id: str = "",
) -> CostModel:
    """Denoised cost model from repeated contended measurements; see the module docstring."""
    if method == "quantile":
        return denoise_quantile(
            samples, quantile=quantile, beta_linear=beta_linear, id=id, profile_id=profile_id
        )
    if method == "min":
        return denoise_min(samples, id=id, profile_id=profile_id)
    raise InvalidArgument(
        DENOISE_METHOD_INVALID,
        f"method must be 'quantile' or 'min', got {method!r}",
        field="method",
    )
