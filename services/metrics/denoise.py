"""Denoised runtime: the cost model of a black-box API with contention removed.

Input: repeated measurements of exact-length generations through the API (`Sample`s with
`total_ns`, and `prefill_ns` = time to first token (TTFT), 0 when not measured; `decode_ns`
may be empty). Contention only ever *adds* time, so the uncontended runtime sits at the
bottom of each configuration's distribution. Two rules, both returning
`CostModel(kind="denoised")` with `overhead_s` set; n = o - 1 decode steps and
S(p, o) = sum_{i=1}^{o-1} (p + i) below.

alpha, when TTFT is measured (every used sample has prefill_ns > 0): alpha(p) is what the
design defines it to be, the time from request start to the first output token, so it is
observed, and bounded below by its measured floor: at every profiled p, alpha(p) >= the
fastest TTFT measured at p (the minimum is the floor of what was achieved; a model may not
claim a first token faster than every trial delivered it). overhead is then what a total
carries beyond TTFT and the decode steps. When TTFT is not measured (totals only) alpha is
not observed: the paper's identification alpha(p_min) = beta(p_min) separates it from the
overhead (exact for p_min = 1), and there is no alpha floor to hold.

`method="min"` -- the paper's rule (Narayanan et al. 2023, after HELM), minimum over trials:
  1. m(p, o) = min over trials of total time, per configuration (p, o).
  2. beta(c) = beta0 + beta1*c from the minima: least squares of m on [n, S] with one
     intercept per prompt size (the within-p slopes). beta1 is fitted (beta_linear, the
     default) when the grid determines it and it comes out >= 0 (else refitted constant,
     beta1 = 0, the paper's model exactly); beta_linear=False forces the constant.
  3. T(p) = mean over o of m(p, o) - beta0*n - beta1*S: the runtime of a 1-token generation.
  4. With TTFT: alpha(p) = min TTFT at p (its floor, exactly) and overhead = mean over p of
     T(p) - alpha(p). Totals only: overhead = m(1, 1) - beta(1) (T(p_min) - beta(p_min) when
     (1, 1) was not measured) and alpha(p) = T(p) - overhead.
  No smoothing, no monotone correction: faithful to the rule. One lucky-fast trial moves a
  minimum, and through it beta, alpha or the overhead.

`method="quantile"` (default) -- low-quantile regression over *all* samples:
  total_s = overhead + sum_k a_k h_k(p) + beta0 * n + beta1 * S   (every sample)
  ttft_s  = sum_k a_k h_k(p)                                       (every sample, with TTFT)
  where h_k are piecewise-linear hat functions at the profiled prompt sizes (so alpha is
  exactly the CostModel's piecewise-linear alpha), fitted by minimising the pinball loss at
  `quantile` (default 0.1) as a linear program (scipy HiGHS). Constraints: overhead, beta0,
  beta1 >= 0; alpha non-decreasing in p; with TTFT, a_k >= the TTFT floor at p_k; without,
  the identification a_1 = beta0 + beta1 * p_min. Every trial contributes; a single lucky or
  unlucky trial cannot move a low quantile by more than its share of the data, and huge
  spikes above it carry no more weight than small ones.
  With positive noise the fit estimates the q-quantile of the contended runtime, which is
  above the uncontended one by the noise's q-quantile. That bias does not shrink with more
  trials, while the minimum's does: on synthetic data (30% of trials contended, 5% spikes),
  the quantile rule has the lower prediction error at 3-5 trials per configuration and the
  lower parameter error at every trial count we tried (3-10); with 10 clean-tailed trials and
  no lucky trial the minimum rule predicts slightly better (0.7% vs 0.8% mean relative
  error). One lucky-fast trial at a large configuration reverses that (the minimum rule's
  error roughly triples); tests/unit/metrics/test_denoise.py pins these cases.

Stored with the model (`CostModel.fit_options`, text as FitOptions.to_record writes it):
denoise_method, denoise_quantile (quantile rule), beta_linear, kfold, denoise_alpha_floor
("ttft_min" or "none"), and the timing evidence: "timing" (the fit samples by
Sample.timing) and "timing_used" (alpha from "prefill" or "totals"; TTFT is measured only
where Sample.measured_prefill_ns is: a totals-only sample's never is); FitOptions.from_record
reads beta_linear and kfold and ignores the rest. Quality, like any fit's: held-out error
when held-out samples exist, else k-fold over the interior prompt sizes (each fold refitted
by the same rule without its sizes), else "none". The measured value of a configuration is
the statistic the rule estimates from contended trials -- their minimum (min rule) or
their `quantile` (quantile rule) of total_ns -- since a median of contended trials is not
what a denoised model predicts.

Samples used by both: not warm-ups, not nonconforming, not held out (held-out samples are
only evaluated).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.sparse

from idealrt.core.costmodel.evaluate import relative_quality
from idealrt.core.costmodel.fit import timing_record
from idealrt.core.costmodel.predict import predict_runtime
from idealrt.core.domain import CostModel, FitQuality, Sample, SampleFlag
from idealrt.core.errors import FailedPrecondition, IdealrtError, InvalidArgument
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


def _valid(samples: Sequence[Sample], heldout: bool) -> list[Sample]:
    """The samples of one set (fit: heldout False; evaluation: True), checked."""
    out: list[Sample] = []
    for i, s in enumerate(samples):
        if s.flag in _EXCLUDED or s.heldout is not heldout:
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
    return out


def _usable(samples: Sequence[Sample]) -> list[Sample]:
    out = _valid(samples, heldout=False)
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


@dataclasses.dataclass(frozen=True)
class _Data:
    """Fit samples as arrays (seconds); ttft_s is None when TTFT was not measured."""

    p: FloatArray
    o: FloatArray
    total_s: FloatArray
    ttft_s: FloatArray | None
    knots: tuple[int, ...]

    @classmethod
    def of(cls, used: Sequence[Sample]) -> _Data:
        # measured TTFT only (0, or a totals-only sample's: unknown)
        ttft = np.array([s.measured_prefill_ns for s in used], dtype=np.float64) * 1e-9
        return cls(
            p=np.array([s.prompt_tokens for s in used], dtype=np.float64),
            o=np.array([s.output_tokens for s in used], dtype=np.float64),
            total_s=np.array([s.total_ns for s in used], dtype=np.float64) * 1e-9,
            ttft_s=ttft if bool(np.all(ttft > 0)) else None,
            knots=tuple(sorted({s.prompt_tokens for s in used})),
        )

    @property
    def steps(self) -> FloatArray:
        return self.o - 1.0

    @property
    def ctx_sum(self) -> FloatArray:  # sum_{i=1}^{o-1} (p + i)
        return np.asarray(self.steps * self.p + self.steps * self.o / 2.0, dtype=np.float64)

    def floors(self) -> FloatArray | None:
        """The fastest measured TTFT at each knot (None without TTFT)."""
        if self.ttft_s is None:
            return None
        return np.array([self.ttft_s[self.p == k].min() for k in self.knots])


def _model(
    data: _Data,
    alphas: Sequence[float] | FloatArray,
    beta0: float,
    beta1: float,
    overhead: float,
    name: str,
    id: str,
    profile_id: str,
) -> CostModel:
    return CostModel(
        id=id or uuid.uuid4().hex,
        profile_id=profile_id,
        alpha_knots_p=data.knots,
        alpha_knots_s=tuple(float(a) for a in alphas),
        beta0_s=float(beta0),
        beta1_s=float(beta1),
        overhead_s=float(overhead),
        name=name,
        kind="denoised",
        quality=FitQuality(method="none"),
        valid_prompt_tokens=(int(data.p.min()), int(data.p.max())),
        valid_output_tokens=(int(data.o.min()), int(data.o.max())),
    )


def _min_beta(keys: FloatArray, m: FloatArray, beta_linear: bool) -> tuple[float, float]:
    """Within-p least squares of the minima m on [n, S] (one intercept per prompt size)."""
    p, o = keys[:, 0], keys[:, 1]
    n = o - 1.0
    cols = [n, n * p + n * o / 2.0] if beta_linear else [n]
    x = np.column_stack(cols)
    y = m.copy()
    multi = np.zeros(p.size, dtype=bool)
    for pv in np.unique(p):
        at = p == pv
        if at.sum() >= 2:
            multi |= at
        x[at] -= x[at].mean(axis=0)
        y[at] -= y[at].mean()
    x, y = x[multi], y[multi]
    if x.shape[0] == 0 or not np.any(x[:, 0] != 0.0):
        raise FailedPrecondition(
            DENOISE_GRID_INSUFFICIENT,
            "the minimum rule needs some prompt size measured at two or more output lengths",
            field="samples",
        )
    if beta_linear:
        xn = x / np.maximum(np.abs(x).max(axis=0), 1e-300)
        if np.linalg.matrix_rank(xn, tol=1e-9) == 2:
            (b0, b1), *_ = np.linalg.lstsq(x, y, rcond=None)
            if b1 >= 0.0 and b0 >= 0.0:
                return float(b0), float(b1)
        x = x[:, :1]
    return float((x[:, 0] @ y) / (x[:, 0] @ x[:, 0])), 0.0


def denoise_min(
    samples: Sequence[Sample],
    *,
    beta_linear: bool = True,
    id: str = "",
    profile_id: str = "",
) -> CostModel:
    """The paper's minimum-over-trials rule, beta1 fitted (see the module docstring)."""
    return _min_fit(_Data.of(_usable(samples)), beta_linear, id, profile_id)


def _min_fit(data: _Data, beta_linear: bool, id: str, profile_id: str) -> CostModel:
    keys, inverse = np.unique(np.column_stack([data.p, data.o]), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    m = np.full(keys.shape[0], np.inf)
    np.minimum.at(m, inverse, data.total_s)
    b0, b1 = _min_beta(keys, m, beta_linear)
    n = keys[:, 1] - 1.0
    rest = m - b0 * n - b1 * (n * keys[:, 0] + n * keys[:, 1] / 2.0)
    t1 = np.array([rest[keys[:, 0] == k].mean() for k in data.knots])
    floors = data.floors()
    if floors is not None:
        alphas = floors
        overhead = float(np.mean(t1 - floors))
    else:
        at11 = (keys[:, 0] == 1) & (keys[:, 1] == 1)
        t11 = float(m[at11][0]) if np.any(at11) else float(t1[0])
        overhead = t11 - (b0 + b1 * data.knots[0])
        alphas = t1 - overhead
    return _model(data, alphas, b0, b1, overhead, "denoised-min", id, profile_id)


def denoise_quantile(
    samples: Sequence[Sample],
    *,
    quantile: float = 0.1,
    beta_linear: bool = True,
    id: str = "",
    profile_id: str = "",
) -> CostModel:
    """Low-quantile regression of total time (and TTFT, when measured) on the cost model's
    linear design (see the module docstring). `beta_linear=False`: beta1 = 0."""
    _check_quantile(quantile)
    return _quantile_fit(_Data.of(_usable(samples)), quantile, beta_linear, id, profile_id)


def _check_quantile(quantile: float) -> None:
    if not (0.0 < quantile < 1.0):
        raise InvalidArgument(
            QUANTILE_OUT_OF_RANGE,
            f"quantile must lie strictly between 0 and 1, got {quantile}",
            field="quantile",
        )


def _quantile_fit(
    data: _Data, quantile: float, beta_linear: bool, id: str, profile_id: str
) -> CostModel:
    knots = data.knots
    k = len(knots)
    n_tot = data.total_s.size
    h = hat_basis(data.p, knots)
    # theta = [overhead, a_1..a_K, beta0, beta1]
    m = k + 3
    i_b0, i_b1 = k + 1, k + 2
    x_tot = np.column_stack([np.ones(n_tot), h, data.steps, data.ctx_sum])
    rows, ys = [x_tot], [data.total_s]
    if data.ttft_s is not None:
        rows.append(np.column_stack([np.zeros(n_tot), h, np.zeros((n_tot, 2))]))
        ys.append(data.ttft_s)
    x = np.vstack(rows)
    y = np.concatenate(ys)
    n = y.size

    # Monotone alpha: a_j - a_{j+1} <= 0.
    cons = np.zeros((max(k - 1, 0), m))
    for j in range(k - 1):
        cons[j, 1 + j] = 1.0
        cons[j, 2 + j] = -1.0

    # Scale columns and the response so HiGHS works near unit magnitudes.
    col_scale = np.maximum(np.abs(x).max(axis=0), 1e-300)
    y_scale = float(np.median(y))
    d = y_scale / col_scale  # theta = d * theta_scaled

    eye = scipy.sparse.identity(n, format="csr")
    eq = [scipy.sparse.hstack([scipy.sparse.csr_matrix(x / col_scale), eye, -eye])]
    b_eq = [y / y_scale]
    floors = data.floors()
    if floors is None:  # identification: a_1 = beta0 + beta1 * p_min
        ident = np.zeros(m)
        ident[1], ident[i_b0], ident[i_b1] = -1.0, 1.0, float(knots[0])
        eq.append(
            scipy.sparse.hstack(
                [scipy.sparse.csr_matrix(ident * d), scipy.sparse.csr_matrix((1, 2 * n))]
            )
        )
        b_eq.append(np.zeros(1))
    c = np.concatenate([np.zeros(m), np.full(n, quantile), np.full(n, 1.0 - quantile)])
    bounds: list[tuple[float | None, float | None]] = [(0.0, None)]
    for j in range(k):
        bounds.append((None, None) if floors is None else (float(floors[j] / d[1 + j]), None))
    bounds += [(0.0, None), (0.0, None) if beta_linear else (0.0, 0.0)]
    bounds += [(0.0, None)] * (2 * n)
    a_ub = b_ub = None
    if k > 1:
        a_ub = scipy.sparse.hstack(
            [scipy.sparse.csr_matrix(cons * d), scipy.sparse.csr_matrix((k - 1, 2 * n))],
            format="csr",
        )
        b_ub = np.zeros(k - 1)
    res = scipy.optimize.linprog(
        c,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=scipy.sparse.vstack(eq, format="csr"),
        b_eq=np.concatenate(b_eq),
        bounds=bounds,
        method="highs",
    )
    if res.status != 0 or res.x is None:
        raise FailedPrecondition(
            DENOISE_FIT_FAILED,
            f"quantile regression did not converge: {res.message}",
            field="samples",
        )
    theta = res.x[:m] * d
    beta0 = float(theta[i_b0])
    beta1 = float(theta[i_b1]) if beta_linear else 0.0
    alphas = theta[1 : 1 + k]
    if floors is None:
        alphas[0] = beta0 + beta1 * knots[0]
    else:  # the LP's tolerance aside, the floor holds exactly
        alphas = np.maximum(alphas, floors)
    return _model(
        data, alphas, beta0, beta1, float(theta[0]), f"denoised-q{quantile:g}", id, profile_id
    )


def _measured(
    p: FloatArray, o: FloatArray, total_s: FloatArray, method: str, quantile: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per configuration: the rule's own statistic of its contended trials' totals."""
    keys, inverse = np.unique(np.column_stack([p, o]), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    stat = np.array(
        [
            total_s[inverse == g].min()
            if method == "min"
            else np.quantile(total_s[inverse == g], quantile)
            for g in range(keys.shape[0])
        ]
    )
    return keys[:, 0], keys[:, 1], stat


def _quality(
    cm: CostModel,
    data: _Data,
    held: Sequence[Sample],
    method: str,
    quantile: float,
    beta_linear: bool,
    kfold: int,
) -> FitQuality:
    """Held-out error, else k-fold over the interior prompt sizes, else "none"."""
    if held:
        hd = _Data.of(held)
        p, o, meas = _measured(hd.p, hd.o, hd.total_s, method, quantile)
        return relative_quality("heldout", predict_runtime(cm, p, o), meas)
    interior = np.asarray(data.knots[1:-1], dtype=np.float64)
    if kfold < 2 or interior.size == 0:
        return FitQuality(method="none")
    folds = min(kfold, interior.size)
    preds: list[FloatArray] = []
    meas_all: list[FloatArray] = []
    for f in range(folds):
        test = np.isin(data.p, interior[f::folds])
        train = _Data(
            p=data.p[~test],
            o=data.o[~test],
            total_s=data.total_s[~test],
            ttft_s=None if data.ttft_s is None else data.ttft_s[~test],
            knots=tuple(k for k in data.knots if k not in set(interior[f::folds].tolist())),
        )
        try:
            fold_cm = _fit(train, method, quantile, beta_linear)
        except IdealrtError:
            continue
        p, o, meas = _measured(data.p[test], data.o[test], data.total_s[test], method, quantile)
        preds.append(predict_runtime(fold_cm, p, o))
        meas_all.append(meas)
    if not preds:
        return FitQuality(method="none")
    return relative_quality("kfold", np.concatenate(preds), np.concatenate(meas_all))


def _fit(
    data: _Data, method: str, quantile: float, beta_linear: bool, id: str = "", pid: str = ""
) -> CostModel:
    if method == "quantile":
        return _quantile_fit(data, quantile, beta_linear, id, pid)
    return _min_fit(data, beta_linear, id, pid)


def denoise(
    samples: Sequence[Sample],
    method: DenoiseMethod = "quantile",
    quantile: float = 0.1,
    *,
    beta_linear: bool = True,
    kfold: int = 5,
    id: str = "",
    profile_id: str = "",
) -> CostModel:
    """Denoised cost model from repeated contended measurements, with its quality and the
    options it was made with (see the module docstring)."""
    if method not in ("quantile", "min"):
        raise InvalidArgument(
            DENOISE_METHOD_INVALID,
            f"method must be 'quantile' or 'min', got {method!r}",
            field="method",
        )
    if method == "quantile":
        _check_quantile(quantile)
    used = _usable(samples)
    data = _Data.of(used)
    held = _valid(samples, heldout=True)
    cm = _fit(data, method, quantile, beta_linear, id, profile_id)
    cm.quality = _quality(cm, data, held, method, quantile, beta_linear, kfold)
    record = {
        "denoise_method": repr(method),
        "beta_linear": repr(beta_linear),
        "kfold": repr(kfold),
        "denoise_alpha_floor": repr("ttft_min" if data.ttft_s is not None else "none"),
    }
    if method == "quantile":
        record["denoise_quantile"] = repr(float(quantile))
    record.update(timing_record(used))
    record["timing_used"] = "alpha=" + ("prefill" if data.ttft_s is not None else "totals")
    cm.fit_options = record
    return cm
