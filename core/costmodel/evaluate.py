"""How good is a fitted cost model: held-out error, k-fold cross-validation, and the same
error for straight lines through the measured medians and HELM's proportional-table rule on
the same data.

Every error is relative, |predicted - measured| / measured, with one point per (p, o)
configuration: the measured runtime of a configuration is the robust centre (median by
default) of its samples' total_ns, so repeats do not count as independent points. p95 is
numpy's linear-interpolated 95th percentile over the configurations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from idealrt.core.costmodel import robust as rb
from idealrt.core.costmodel.fit import (
    DEFAULT_FIT_OPTIONS,
    FitData,
    FitOptions,
    fit_prepared,
    usable_samples,
)
from idealrt.core.costmodel.predict import predict_runtime
from idealrt.core.domain import CostModel, FitQuality, Sample
from idealrt.core.errors import FailedPrecondition, IdealrtError
from idealrt.core.reasons import NO_HELDOUT_SAMPLES, NOT_ENOUGH_SAMPLES

__all__ = [
    "compare_to_helm",
    "config_runtimes",
    "heldout_quality",
    "helm_proportional_predict",
    "helm_table",
    "kfold_quality",
    "quality_for",
    "relative_quality",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def config_runtimes(
    samples: Sequence[Sample], *, centre: str = "median", trim: float = 0.1
) -> tuple[IntArray, IntArray, FloatArray]:
    """(p, o, measured seconds) per configuration: the robust centre of total_ns."""
    if not samples:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    data = FitData.from_samples(samples)
    g = rb.group(np.column_stack([data.p, data.o]))
    meas = rb.group_centre(data.total_s, g, centre, trim)
    return g.keys[:, 0], g.keys[:, 1], meas


def relative_quality(method: str, pred: FloatArray, meas: FloatArray) -> FitQuality:
    """Relative errors of predictions `pred` against measurements `meas` as a FitQuality
    labelled `method` ("none" with no points)."""
    if pred.size == 0:
        return FitQuality(method="none")
    rel = np.abs(pred - meas) / meas
    return FitQuality(
        method=method,
        points=int(rel.size),
        mean_rel=float(rel.mean()),
        p95_rel=float(np.percentile(rel, 95.0)),
        max_rel=float(rel.max()),
    )


def heldout_quality(
    cm: CostModel, samples: Sequence[Sample], *, centre: str = "median", trim: float = 0.1
) -> FitQuality:
    """Error of cm on the held-out samples (OK, heldout, conforming) among `samples`."""
    held = usable_samples(samples, heldout=True)
    if not held:
        raise FailedPrecondition(
            NO_HELDOUT_SAMPLES,
            "held-out error needs samples measured with heldout=True (a holdout grid in the"
            " profile plan); use k-fold cross-validation otherwise",
            field="samples",
        )
    p, o, meas = config_runtimes(held, centre=centre, trim=trim)
    return relative_quality("heldout", predict_runtime(cm, p, o), meas)


def kfold_quality(
    samples: Sequence[Sample], options: FitOptions = DEFAULT_FIT_OPTIONS, k: int | None = None
) -> FitQuality:
    """Cross-validated error over prompt-size groups of the fit samples.

    The interior profiled prompt sizes (all but the smallest and largest, which stay in
    every training set so that, like the held-out grid, the test measures interpolation)
    are dealt round-robin into k folds (default options.kfold, capped at their number);
    each fold is predicted by a model fitted without its sizes. Method "none" when there
    are fewer than 3 prompt sizes or k < 2."""
    k = options.kfold if k is None else k
    fit = usable_samples(samples, heldout=False)
    if not fit or k < 2:
        return FitQuality(method="none")
    data = FitData.from_samples(fit)
    interior = np.unique(data.p)[1:-1]
    if interior.size == 0:
        return FitQuality(method="none")
    preds: list[FloatArray] = []
    meas: list[FloatArray] = []
    for f in range(min(k, interior.size)):
        test = np.isin(data.p, interior[f :: min(k, interior.size)])
        try:
            cm = fit_prepared(data.take(np.flatnonzero(~test)), options)
        except IdealrtError:
            continue
        held = [s for s, t in zip(fit, test.tolist(), strict=True) if t]
        p, o, m = config_runtimes(held, centre=options.robust_centre, trim=options.trim)
        preds.append(predict_runtime(cm, p, o))
        meas.append(m)
    if not preds:
        return FitQuality(method="none")
    return relative_quality("kfold", np.concatenate(preds), np.concatenate(meas))


def quality_for(samples: Sequence[Sample], cm: CostModel, options: FitOptions) -> FitQuality:
    """Held-out error when any held-out samples exist, else k-fold (options.kfold >= 2),
    else method "none"."""
    if usable_samples(samples, heldout=True):
        return heldout_quality(cm, samples, centre=options.robust_centre, trim=options.trim)
    return kfold_quality(samples, options)


def helm_proportional_predict(
    table: Mapping[int, float],
    beta: float,
    p: npt.ArrayLike,
    o: npt.ArrayLike,
    *,
    overhead: float = 0.0,
) -> FloatArray:
    """HELM's estimate: alpha(p) + beta*(o-1) + overhead, with alpha(p) = table[k] * p / k
    for k the smallest key >= p (the largest key when p exceeds them all)."""
    keys = np.asarray(sorted(table), dtype=np.float64)
    vals = np.asarray([table[int(k)] for k in keys], dtype=np.float64)
    pa = np.asarray(p, dtype=np.float64)
    idx = np.minimum(np.searchsorted(keys, pa, side="left"), keys.size - 1)
    alpha = vals[idx] * pa / keys[idx]
    n = np.maximum(np.asarray(o, dtype=np.float64) - 1.0, 0.0)
    return np.asarray(overhead + alpha + beta * n, dtype=np.float64)


def helm_table(
    samples: Sequence[Sample], *, centre: str = "median", trim: float = 0.1
) -> tuple[dict[int, float], float]:
    """The table HELM would publish from these measurements: beta = robust centre of all
    decode steps (or of (total - prefill)/(o-1) per sample without per-step times);
    table[p] = robust centre of prefill at each profiled p (or, without prefill times, of
    total - beta*(o-1))."""
    data = FitData.from_samples(samples)
    if data.step_s.size:
        beta = float(np.median(data.step_s)) if centre == "median" else _trimmed(data.step_s, trim)
    else:
        m = data.o >= 2
        per = (
            (data.total_s[m] - data.prefill_s[m]) / (data.o[m] - 1.0) if data.has_prefill else None
        )
        if per is None or per.size == 0:
            raise FailedPrecondition(
                NOT_ENOUGH_SAMPLES,
                "a HELM table needs decode-step or prefill times and samples with o >= 2",
                field="samples",
            )
        beta = float(np.median(per)) if centre == "median" else _trimmed(per, trim)
    obs = data.prefill_s if data.has_prefill else data.total_s - beta * (data.o - 1.0)
    g = rb.group(data.p)
    vals = rb.group_centre(obs, g, centre, trim)
    return {int(k): float(v) for k, v in zip(g.keys, vals, strict=True)}, beta


def _trimmed(x: FloatArray, trim: float) -> float:
    return float(rb.group_trimmed_mean(x, rb.group(np.zeros(x.size, dtype=np.int64)), trim)[0])


def compare_to_helm(
    samples_fit: Sequence[Sample],
    samples_eval: Sequence[Sample],
    *,
    options: FitOptions = DEFAULT_FIT_OPTIONS,
) -> dict[str, float]:
    """Our cost model vs straight lines through the measured medians and HELM's proportional
    rule, all built from samples_fit and scored on samples_eval (the split is the caller's:
    heldout flags are ignored; only OK, conforming samples count). "ours" is what
    fit_cost_model returns with samples_eval held out: the selected knots, or the medians
    when those score better on samples_eval (ours_fell_back = 1). Keys: points,
    {ours,medians,helm}_{mean,p95,max}_rel, ours_fell_back."""
    fit = usable_samples(samples_fit, heldout=None)
    ev = usable_samples(samples_eval, heldout=None)
    if not fit or not ev:
        raise FailedPrecondition(
            NOT_ENOUGH_SAMPLES,
            f"comparison needs usable fit and evaluation samples (got {len(fit)} and {len(ev)})",
            field="samples",
        )
    opts = dataclasses.replace(options, bootstrap=0, kfold=0)
    data = FitData.from_samples(fit)
    cm = fit_prepared(data, opts)
    base = fit_prepared(data, dataclasses.replace(opts, knots="medians"))
    table, beta = helm_table(fit, centre=options.robust_centre, trim=options.trim)
    p, o, meas = config_runtimes(ev, centre=options.robust_centre, trim=options.trim)
    ours = relative_quality("heldout", predict_runtime(cm, p, o), meas)
    medians = relative_quality("heldout", predict_runtime(base, p, o), meas)
    helm = relative_quality("helm", helm_proportional_predict(table, beta, p, o), meas)
    fell_back = options.knots == "select" and ours.mean_rel > medians.mean_rel * (1.0 + 1e-9)
    if fell_back:  # the guard of fit_with_replicates
        ours = medians
    out = {"points": float(ours.points), "ours_fell_back": float(fell_back)}
    for name, q in (("ours", ours), ("medians", medians), ("helm", helm)):
        out.update(
            {
                f"{name}_mean_rel": q.mean_rel,
                f"{name}_p95_rel": q.p95_rel,
                f"{name}_max_rel": q.max_rel,
            }
        )
    return out
