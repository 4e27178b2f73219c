"""Bootstrap confidence intervals for a fitted cost model.

Replicates resample the fit samples with replacement *within each (p, o) configuration*
(so every replicate keeps the profiled grid) and refit everything, knot selection included,
so the intervals also carry the uncertainty of where the curve bends. Intervals are
percentile intervals over the replicates. Keep the replicate models to put intervals on any
estimate: predict_interval(replicates, p, o).
"""

from __future__ import annotations

from collections.abc import Sequence

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
from idealrt.core.costmodel.options import DEFAULT_CONFIDENCE
from idealrt.core.costmodel.predict import alpha_at, predict_runtime
from idealrt.core.domain import CostModel, Sample
from idealrt.core.errors import FailedPrecondition, IdealrtError
from idealrt.core.reasons import NO_BOOTSTRAP_REPLICATES

__all__ = [
    "bootstrap_models",
    "bootstrap_prepared",
    "intervals",
    "predict_interval",
]

FloatArray = npt.NDArray[np.float64]


def bootstrap_prepared(
    data: FitData, options: FitOptions, replicates: int | None = None
) -> list[CostModel]:
    """Refit `replicates` (default options.bootstrap) resamples of data, seeded by
    options.seed. A resample that cannot be fitted is skipped, so fewer may come back."""
    count = options.bootstrap if replicates is None else replicates
    cfg = rb.group(np.column_stack([data.p, data.o]))
    gid = np.repeat(np.arange(cfg.n), cfg.counts)  # group of each position in cfg.order
    starts = cfg.starts[gid]
    sizes = cfg.counts[gid]
    rng = np.random.default_rng(options.seed)
    models: list[CostModel] = []
    for _ in range(count):
        pick = starts + np.floor(rng.random(gid.size) * sizes).astype(np.int64)
        try:
            models.append(fit_prepared(data.take(cfg.order[pick]), options))
        except IdealrtError:
            continue
    return models


def bootstrap_models(
    samples: Sequence[Sample], options: FitOptions = DEFAULT_FIT_OPTIONS
) -> list[CostModel]:
    """Bootstrap replicate models of the fit samples (OK, not held out, conforming)."""
    options.validate()
    fit = usable_samples(samples, heldout=False)
    if not fit:
        return []
    return bootstrap_prepared(FitData.from_samples(fit), options)


def _bounds(values: FloatArray, confidence: float, axis: int = 0) -> tuple[FloatArray, FloatArray]:
    tail = 50.0 * (1.0 - confidence)
    lo, hi = np.percentile(values, [tail, 100.0 - tail], axis=axis)
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def intervals(
    cm: CostModel, replicates: Sequence[CostModel], confidence: float = DEFAULT_CONFIDENCE
) -> dict[str, tuple[float, float]]:
    """Percentile intervals: "beta0", "beta1", "overhead" (denoised models only) and
    "alpha@<p>" at each of cm's knots. Empty with fewer than 2 replicates."""
    if len(replicates) < 2:
        return {}
    cols: dict[str, FloatArray] = {
        "beta0": np.array([r.beta0_s for r in replicates]),
        "beta1": np.array([r.beta1_s for r in replicates]),
    }
    if cm.kind == "denoised" or cm.overhead_s > 0:
        cols["overhead"] = np.array([r.overhead_s for r in replicates])
    knots = np.asarray(cm.alpha_knots_p, dtype=np.float64)
    at_knots = np.stack([alpha_at(r, knots) for r in replicates])
    for j, p in enumerate(cm.alpha_knots_p):
        cols[f"alpha@{p}"] = at_knots[:, j]
    out: dict[str, tuple[float, float]] = {}
    for name, vals in cols.items():
        lo, hi = _bounds(vals, confidence)
        out[name] = (float(lo), float(hi))
    return out


def predict_interval(
    replicates: Sequence[CostModel],
    p: npt.ArrayLike,
    o: npt.ArrayLike,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[FloatArray, FloatArray]:
    """Percentile interval (low, high) of the predicted runtime at (p, o), broadcast like
    predict_runtime, over the bootstrap replicates."""
    if not replicates:
        raise FailedPrecondition(
            NO_BOOTSTRAP_REPLICATES,
            "prediction intervals need bootstrap replicates: fit with options.bootstrap > 0",
            field="options.bootstrap",
        )
    shape = np.broadcast(np.asarray(p), np.asarray(o)).shape
    preds = np.stack([np.broadcast_to(predict_runtime(r, p, o), shape) for r in replicates])
    return _bounds(preds, confidence)
