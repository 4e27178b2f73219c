"""Fit the cost model runtime(p, o) = overhead + alpha(p) + sum_{i=1}^{o-1} beta(p + i).

Which samples are used: flag OK, `heldout` False, and conforming counts (p >= 1, o >= 1,
`decode_ns` empty or exactly o-1 entries, no negative times, total_ns > 0). What each time
is worth is the sample's `timing` (SampleTiming): decode steps are taken only from samples
whose timing has per-step times (server_steps, stream_tokens), a prefill only where it was
measured (prefill_ns > 0 and timing not totals_only: 0 is "unknown", never a time). The
model records the evidence it rests on (`timing_record`: fit_options "timing", the fit
samples by timing, and "timing_used", which data fitted beta and alpha). Held-out samples
never touch a fitted value; they are only evaluated (`idealrt.core.costmodel.evaluate`), and
choose between the selected knots and the medians (below).

beta(c) = beta0 + beta1*c, from the best data the samples carry:
  1. per-step decode times (Sample.decode_ns; step j, 0-based, runs at context p+j+1): a robust
     centre of all steps at each context c, then a Huber line through those centres weighted
     by the number of steps behind each;
  2. else, when every sample has a prefill time: per sample, the mean decode step
     (total - prefill)/(o-1), which sits at the mean context p + o/2, centred per (p, o)
     configuration, then the same Huber line (weights: samples x steps);
  3. else (totals only, e.g. a non-streaming API): a Huber regression of the per-config
     total on [one alpha per prompt size, o-1, sum_{i=1}^{o-1}(p+i)]; this needs at least
     two output lengths at some prompt size.
A negative fitted slope is not physical (attention work grows with context): it is then
refitted as a constant (beta1 = 0). `beta_linear=False` forces beta1 = 0 (the paper's model).

alpha: per prompt size, a robust centre of the prefill times (or, without prefill times, of
total - fitted decode sum), weighted by its standard error from the observed spread (MAD,
pooled across sizes when a size has fewer than 3 samples); isotonic (non-decreasing)
regression over the sizes; then knots where the data say the curve bends: the fewest
profiled sizes (first and last always) such that the polyline through them stays within
the noise of every size (`knot_z` standard errors, at least `knot_rel_tol` relative), up to
`max_knots`; finally the knot values are refitted by weighted least squares to all sizes and
kept monotone. Below the first knot alpha is flat; beyond the last it follows the tail slope.
Measured information is never lost silently: when sizes were merged, `fit_with_replicates`
also fits straight lines through the measured (isotonic) centres, every size a knot
(`knots="medians"`), and scores both on the same points (held-out when samples were held
out, else k-fold). If the merged model is worse, the medians model is returned instead; its
recorded fit_options say knots='medians' and, under KNOT_FALLBACK, why. (With held-out
samples this is a choice between two models on the held-out points, so their reported error
is that of the better of two; k-fold has no such selection.)

overhead (`fit_overhead`, for black-box APIs): the times of an API include a constant
per-request cost (network, queueing, tokenization) in both time-to-first-token and the total,
so the curve fitted above is overhead + alpha(p). The two are separated with HELM's
convention: prefill of the smallest profiled prompt costs one decode step,
alpha(p_min) = beta(p_min), so overhead = max(0, curve(p_min) - beta(p_min)) and the knots
are shifted down by it. Profile a 1-token prompt for this to mean what it says.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from idealrt.core.costmodel import robust as rb
from idealrt.core.costmodel.options import FitOptions
from idealrt.core.domain import CostModel, FitQuality, Sample, SampleFlag, SampleTiming
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.reasons import MIXED_BATCH_SIZES, NOT_ENOUGH_SAMPLES

__all__ = [
    "DEFAULT_FIT_OPTIONS",
    "KNOT_FALLBACK",
    "FitData",
    "FitOptions",
    "fit_cost_model",
    "fit_prepared",
    "fit_with_replicates",
    "timing_record",
    "usable_samples",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_FIT_OPTIONS = FitOptions()
# the fit_options key that records why a fit fell back to straight lines through the
# medians (FitOptions.from_record ignores it; the record's knots="medians" re-derives it)
KNOT_FALLBACK = "knot_fallback"


def _conforming(s: Sample) -> bool:
    return (
        s.prompt_tokens >= 1
        and s.output_tokens >= 1
        and s.prefill_ns >= 0
        and s.total_ns > 0
        and (not s.decode_ns or (len(s.decode_ns) == s.output_tokens - 1 and min(s.decode_ns) >= 0))
    )


def usable_samples(samples: Sequence[Sample], *, heldout: bool | None = False) -> list[Sample]:
    """Samples flagged OK with conforming counts; `heldout` selects the fit set (False), the
    held-out set (True) or both (None)."""
    return [
        s
        for s in samples
        if s.flag is SampleFlag.OK and (heldout is None or s.heldout is heldout) and _conforming(s)
    ]


def _not_enough(message: str) -> FailedPrecondition:
    return FailedPrecondition(NOT_ENOUGH_SAMPLES, message, field="profile_id")


@dataclasses.dataclass(frozen=True)
class FitData:
    """Fit samples as arrays (seconds). Steps of sample i are
    step_*[step_start[i] : step_start[i] + step_len[i]]; step_ctx is the context p+j+1."""

    p: IntArray
    o: IntArray
    prefill_s: FloatArray
    total_s: FloatArray
    step_start: IntArray
    step_len: IntArray
    step_ctx: IntArray
    step_s: FloatArray

    @property
    def n(self) -> int:
        return int(self.p.size)

    @property
    def has_prefill(self) -> bool:
        return bool(self.n > 0 and np.all(self.prefill_s > 0))

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> FitData:
        """Arrays of already-filtered samples (see usable_samples); one batch size only."""
        batches = {s.batch_size for s in samples}
        if len(batches) > 1:
            raise InvalidArgument(
                MIXED_BATCH_SIZES,
                f"a cost model is fitted at one batch size; samples have {sorted(batches)}",
                field="samples",
            )
        p = np.fromiter((s.prompt_tokens for s in samples), np.int64, len(samples))
        decode = [s.measured_decode_ns for s in samples]  # steps only where measured
        lens = np.fromiter((len(d) for d in decode), np.int64, len(samples))
        starts = np.cumsum(lens) - lens
        total = int(lens.sum())
        steps = np.fromiter(itertools.chain.from_iterable(decode), np.float64, total)
        ctx = np.repeat(p - starts + 1, lens) + np.arange(total, dtype=np.int64)
        return cls(
            p=p,
            o=np.fromiter((s.output_tokens for s in samples), np.int64, len(samples)),
            prefill_s=np.fromiter(
                (s.measured_prefill_ns for s in samples), np.float64, len(samples)
            )
            * 1e-9,
            total_s=np.fromiter((s.total_ns for s in samples), np.float64, len(samples)) * 1e-9,
            step_start=starts.astype(np.int64),
            step_len=lens,
            step_ctx=ctx.astype(np.int64),
            step_s=steps * 1e-9,
        )

    def take(self, idx: npt.ArrayLike) -> FitData:
        """The samples at idx (repeats allowed: bootstrap resamples)."""
        i = np.asarray(idx, dtype=np.int64)
        lens = self.step_len[i]
        new_starts = np.cumsum(lens) - lens
        flat = np.repeat(self.step_start[i] - new_starts, lens) + np.arange(int(lens.sum()))
        return FitData(
            p=self.p[i],
            o=self.o[i],
            prefill_s=self.prefill_s[i],
            total_s=self.total_s[i],
            step_start=new_starts.astype(np.int64),
            step_len=lens,
            step_ctx=self.step_ctx[flat],
            step_s=self.step_s[flat],
        )


def _decode_sum(b0: float, b1: float, p: FloatArray, o: FloatArray) -> FloatArray:
    n = np.maximum(o - 1.0, 0.0)
    return np.asarray(b0 * n + b1 * (n * p + n * (n + 1.0) / 2.0), dtype=np.float64)


def _line(c: FloatArray, y: FloatArray, w: FloatArray, linear: bool) -> tuple[float, float]:
    """Huber line y ~ b0 + b1*c; a constant when not linear, c does not vary or b1 < 0."""
    if linear and np.unique(c).size >= 2:
        b0, b1 = rb.huber_fit(np.column_stack([np.ones_like(c), c]), y, w)
        if b1 >= 0.0:
            return float(b0), float(b1)
    return float(rb.huber_fit(np.ones((y.size, 1)), y, w)[0]), 0.0


def _joint_beta(data: FitData, options: FitOptions) -> tuple[float, float]:
    """Totals only: Huber fit of config totals on [alpha per prompt size, o-1, sum of p+i]."""
    cfg = rb.group(np.column_stack([data.p, data.o]))
    tot = rb.group_centre(
        data.total_s, cfg, options.robust_centre, options.trim, options.outlier_sigma
    )
    pk = cfg.keys[:, 0].astype(np.float64)
    n = cfg.keys[:, 1].astype(np.float64) - 1.0
    psz = rb.group(cfg.keys[:, 0])
    dummies = (psz.inverse[:, None] == np.arange(psz.n)[None, :]).astype(np.float64)
    cols = [dummies, n[:, None]]
    if options.beta_linear:
        cols.append((n * pk + n * (n + 1.0) / 2.0)[:, None])
    for ncols in (len(cols), 2):
        x = np.hstack(cols[:ncols])
        xn = x / np.maximum(np.linalg.norm(x, axis=0), 1e-300)
        if np.linalg.matrix_rank(xn) < x.shape[1]:
            continue
        coef = rb.huber_fit(x, tot, cfg.counts.astype(np.float64))
        b1 = float(coef[psz.n + 1]) if ncols == 3 else 0.0
        if b1 >= 0.0:
            return float(coef[psz.n]), b1
    raise _not_enough(
        "samples without prefill or per-step decode times are fitted from totals, which needs"
        " at least two different output lengths at one prompt size"
    )


def _fit_beta(data: FitData, options: FitOptions) -> tuple[float, float]:
    if data.step_s.size > 0:
        g = rb.group(data.step_ctx)
        y = rb.group_centre(
            data.step_s, g, options.robust_centre, options.trim, options.outlier_sigma
        )
        return _line(g.keys.astype(np.float64), y, g.counts.astype(np.float64), options.beta_linear)
    if not np.any(data.o >= 2):
        raise _not_enough("beta needs samples with output_tokens >= 2 (at least one decode step)")
    if not data.has_prefill:
        return _joint_beta(data, options)
    m = data.o >= 2
    n = data.o[m] - 1.0
    y = (data.total_s[m] - data.prefill_s[m]) / n
    cfg = rb.group(np.column_stack([data.p[m], data.o[m]]))
    yc = rb.group_centre(y, cfg, options.robust_centre, options.trim, options.outlier_sigma)
    ctx = cfg.keys[:, 0] + cfg.keys[:, 1] / 2.0
    w = cfg.counts * (cfg.keys[:, 1] - 1.0)
    return _line(ctx.astype(np.float64), yc, w.astype(np.float64), options.beta_linear)


def _fit_alpha(p: IntArray, obs: FloatArray, options: FitOptions) -> tuple[IntArray, FloatArray]:
    g = rb.group(p)
    x = g.keys.astype(np.float64)
    c = rb.group_centre(obs, g, options.robust_centre, options.trim, options.outlier_sigma)
    if g.n == 1:
        return g.keys, np.maximum(c, 0.0)
    sigma = rb.group_sigma(obs, g)
    mag = np.maximum(np.abs(c), 1e-12)
    many = g.counts >= 3
    pooled = float(np.median(sigma[many] / mag[many])) if np.any(many) else 0.0
    sigma = np.where(many, np.maximum(sigma, 0.5 * pooled * mag), pooled * mag)
    se = rb.centre_se_factor(options.robust_centre) * sigma / np.sqrt(g.counts)
    tol = np.maximum.reduce([options.knot_z * se, options.knot_rel_tol * mag, np.full(g.n, 1e-9)])
    w = (options.knot_z / tol) ** 2
    iso = rb.isotonic(c, w)
    if options.knots == "medians":
        return g.keys, np.maximum(iso, 0.0)
    kidx = rb.select_knots(x, iso, tol, w, options.max_knots)
    kx = x[kidx]
    basis = np.column_stack([np.interp(x, kx, e) for e in np.eye(kx.size)])
    sw = np.sqrt(w)
    values, *_ = np.linalg.lstsq(basis * sw[:, None], c * sw, rcond=None)
    if np.any(np.diff(values) < 0):
        values = rb.isotonic(values, (basis * w[:, None]).sum(axis=0))
    # The refit averages the noise at the knots away, but it must keep the promise the
    # knots were chosen by: no point further outside its tolerance than the polyline
    # through the (isotonic) centres themselves.
    worst_refit = float(np.max(np.abs(c - basis @ values) / tol))
    worst_interp = float(np.max(np.abs(c - basis @ iso[kidx]) / tol))
    if worst_refit > max(1.0, worst_interp):
        values = iso[kidx]
    return g.keys[kidx], np.maximum(values, 0.0)


def fit_prepared(data: FitData, options: FitOptions) -> CostModel:
    """The point fit of already-filtered arrays: no intervals, no quality, no ids."""
    if data.n == 0:
        raise _not_enough("no usable samples: need OK, not held-out samples with valid counts")
    b0, b1 = _fit_beta(data, options)
    pf = data.p.astype(np.float64)
    obs = (
        data.prefill_s
        if data.has_prefill
        else data.total_s - _decode_sum(b0, b1, pf, data.o.astype(np.float64))
    )
    kp, ks = _fit_alpha(data.p, obs, options)
    overhead = 0.0
    if options.fit_overhead:
        overhead = max(0.0, float(ks[0]) - (b0 + b1 * float(kp[0])))
        ks = np.maximum(ks - overhead, 0.0)
    return CostModel(
        id="",
        profile_id="",
        alpha_knots_p=tuple(int(v) for v in kp),
        alpha_knots_s=tuple(float(v) for v in ks),
        beta0_s=b0,
        beta1_s=b1,
        overhead_s=overhead,
        kind="denoised" if options.fit_overhead else "idealized",
        valid_prompt_tokens=(int(data.p.min()), int(data.p.max())),
        valid_output_tokens=(int(data.o.min()), int(data.o.max())),
    )


def fit_with_replicates(
    samples: Sequence[Sample],
    *,
    options: FitOptions = DEFAULT_FIT_OPTIONS,
    id: str = "",
    profile_id: str = "",
) -> tuple[CostModel, list[CostModel]]:
    """fit_cost_model, also returning the bootstrap replicate models (empty when
    options.bootstrap == 0) for prediction intervals (bootstrap.predict_interval)."""
    # bootstrap and evaluate refit through this module, hence the imports here.
    from idealrt.core.costmodel import bootstrap, evaluate

    options.validate()
    fit = usable_samples(samples, heldout=False)
    if not fit:
        raise _not_enough(
            f"no usable samples among {len(samples)}: a fit needs samples flagged OK, not"
            " held out, with exactly the planned token counts"
        )
    data = FitData.from_samples(fit)
    cm = fit_prepared(data, options)
    quality = evaluate.quality_for(samples, cm, options)
    record = options.to_record()
    merged = len(cm.alpha_knots_p) < np.unique(data.p).size
    if options.knots == "select" and merged and quality.method != "none":
        # Knots were merged: keep the merge only if it is as good as straight lines through
        # the measured medians on the evaluation points (held-out, else k-fold).
        base_options = dataclasses.replace(options, knots="medians")
        base = fit_prepared(data, base_options)
        base_quality = evaluate.quality_for(samples, base, base_options)
        if _worse(quality, base_quality):
            record = base_options.to_record()
            record[KNOT_FALLBACK] = repr(  # bounded length: a record value is <= 256 chars
                f"{quality.method} mean error: {len(cm.alpha_knots_p)} selected knots"
                f" {quality.mean_rel:.4g} > medians at {len(base.alpha_knots_p)} sizes"
                f" {base_quality.mean_rel:.4g}"
            )
            cm, quality, options = base, base_quality, base_options
    cm.id = id
    cm.profile_id = profile_id
    replicates = bootstrap.bootstrap_prepared(data, options) if options.bootstrap > 0 else []
    cm.intervals = bootstrap.intervals(cm, replicates, options.confidence)
    cm.quality = quality
    cm.fit_options = {**record, **timing_record(fit, data)}
    return cm, replicates


def timing_record(samples: Sequence[Sample], data: FitData | None = None) -> dict[str, str]:
    """The timing evidence of a fit, as fit_options entries (FitOptions.from_record ignores
    them): "timing" = the fit samples by timing, "server_steps:120,stream_chunks:3" (in
    SampleTiming's order); with `data` (what fit_prepared fitted), "timing_used" = which
    data fitted beta ("decode_steps:<samples with steps>", "total_minus_prefill" or
    "totals") and alpha ("prefill" or "totals")."""
    counts = {t: 0 for t in SampleTiming}
    for s in samples:
        counts[s.timing] += 1
    record = {"timing": ",".join(f"{t.value}:{n}" for t, n in counts.items() if n)}
    if data is not None:
        if data.step_s.size:
            beta = f"decode_steps:{int(np.count_nonzero(data.step_len))}"
        else:
            beta = "total_minus_prefill" if data.has_prefill else "totals"
        alpha = "prefill" if data.has_prefill else "totals"
        record["timing_used"] = f"beta={beta} alpha={alpha}"
    return record


def _worse(ours: FitQuality, base: FitQuality) -> bool:
    """ours is worse than the baseline on the same evaluation points (a tie is not)."""
    if ours.method == "none" or base.method != ours.method or base.points != ours.points:
        return False
    return ours.mean_rel > base.mean_rel * (1.0 + 1e-9) + 1e-15


def fit_cost_model(
    samples: Sequence[Sample],
    *,
    options: FitOptions = DEFAULT_FIT_OPTIONS,
    id: str = "",
    profile_id: str = "",
) -> CostModel:
    """Fit a cost model (see the module doc) with bootstrap intervals and its quality:
    held-out error when samples were held out, else k-fold cross-validation.

    Raises InvalidArgument (bad options, mixed batch sizes) and FailedPrecondition
    (NOT_ENOUGH_SAMPLES, field profile_id) when the samples cannot determine the model."""
    return fit_with_replicates(samples, options=options, id=id, profile_id=profile_id)[0]
