"""Bootstrap confidence intervals for a fitted cost model.

Replicates resample the fit samples with replacement *within each (p, o) configuration*
(so every replicate keeps the profiled grid) and refit everything, knot selection included,
so the intervals also carry the uncertainty of where the curve bends. Intervals are
percentile intervals over the replicates. Keep the replicate models to put intervals on any
estimate: predict_interval(replicates, p, o).

`ReplicateSet` (`prepare_replicates(models)`) is the replicates as arrays, for a service
that puts intervals on many estimates: every replicate's alpha is re-expressed on one
shared grid, the union of all replicates' knots (a replicate's polyline has no bend between
two neighbouring points of that grid, so linear interpolation there is its alpha exactly;
beyond the grid's last point it continues with its own tail slope). One search per query
then serves every replicate, and

- per-query intervals are the same percentiles over the same R predictions as
  `predict_interval` on the models, computed on an (queries x R) array in chunks of at most
  CHUNK_FLOATS values, so memory stays bounded for any workload;
- the workload total under every replicate needs no per-replicate pass over the queries:
  a total is linear in the replicate's parameters, sum_q runtime_r(q) = N*overhead_r +
  W . alpha_r(grid) + T*tail_r + S0*beta0_r + S1*beta1_r, with the weights W, T, S0, S1 of
  the workload computed once (O(N + R x grid)).

Percentiles are numpy's own (`np.percentile`, method "linear"), computed bit for bit as
numpy does with the index work done once per replicate count (`_Quantiles`): for one
query numpy's per-call overhead would be most of the interval's cost. The results equal
the per-model loop up to rounding (tests: 1e-12 relative).
"""

from __future__ import annotations

import dataclasses
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
from idealrt.core.costmodel.predict import alpha_at, prepare
from idealrt.core.domain import CostModel, Sample
from idealrt.core.errors import FailedPrecondition, IdealrtError
from idealrt.core.reasons import NO_BOOTSTRAP_REPLICATES

__all__ = [
    "CHUNK_FLOATS",
    "SUM_QUANTILES",
    "ReplicateSet",
    "bootstrap_models",
    "bootstrap_prepared",
    "intervals",
    "predict_interval",
    "prepare_replicates",
]

FloatArray = npt.NDArray[np.float64]
# the most predictions (queries x replicates) held at once for per-query intervals: 8 MB
CHUNK_FLOATS = 1_000_000
# the interval on a workload's total: these quantiles of the replicates' totals
SUM_QUANTILES = (0.025, 0.975)
_SMALL = 64  # workloads up to this many queries: one (N x R) array serves everything


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


@dataclasses.dataclass(frozen=True, eq=False)
class _Quantiles:
    """np.quantile(values, q, axis=-1) of finite values with n along the last axis
    (method "linear"), shape (len(q), ...), computed as numpy computes it (the same order
    statistics, its virtual indexes and its two-sided lerp, hence the same bits) with the
    index work done once: numpy's per-call overhead dominates the quantiles of one query."""

    kth: npt.NDArray[np.intp]
    prev: npt.NDArray[np.intp]
    next: npt.NDArray[np.intp]
    gamma: FloatArray
    rest: FloatArray  # 1 - gamma
    upper: npt.NDArray[np.bool_]  # gamma >= 0.5: numpy interpolates down from the next

    @classmethod
    def of(cls, n: int, q: FloatArray) -> _Quantiles:
        virtual = (n - 1) * np.asarray(q, dtype=np.float64)
        prev = np.floor(virtual)
        nxt = prev + 1
        top = virtual >= n - 1  # numpy takes the largest value there
        prev[top] = -1
        nxt[top] = -1
        gamma = virtual - prev
        pi, ni = prev.astype(np.intp), nxt.astype(np.intp)
        return cls(
            kth=np.unique(np.concatenate(([0, -1], pi, ni))).astype(np.intp),
            prev=pi,
            next=ni,
            gamma=gamma,
            rest=1 - gamma,
            upper=gamma >= 0.5,
        )

    def __call__(self, values: FloatArray) -> FloatArray:
        part = np.partition(values, self.kth, axis=-1)
        a, b = part[..., self.prev], part[..., self.next]
        diff = b - a
        out = np.where(self.upper, b - diff * self.rest, a + diff * self.gamma)
        if out.ndim == 2:
            return np.asarray(out.T, dtype=np.float64)
        return np.asarray(np.moveaxis(out, -1, 0), dtype=np.float64)


def _band(n: int, confidence: float) -> _Quantiles:
    """The quantiles of `_bounds(values, confidence)`: np.percentile at tail and 100 - tail
    (which divides them by 100 first)."""
    tail = 50.0 * (1.0 - confidence)
    return _Quantiles.of(n, np.true_divide(np.array([tail, 100.0 - tail]), 100))


@dataclasses.dataclass(frozen=True, eq=False)
class ReplicateSet:
    """R bootstrap replicates as arrays (see the module doc): `grid` (G,) the union of their
    knots; `alpha` (G, R) each replicate's alpha at each grid point, `seg_slope` (G-1, R)
    its slope on each grid segment, `tail` (R,) its slope beyond the grid; its `beta0`,
    `beta1` and `overhead` (R,). `models` are the replicates themselves."""

    models: tuple[CostModel, ...]
    grid: FloatArray
    alpha: FloatArray
    seg_slope: FloatArray
    tail: FloatArray
    beta0: FloatArray
    beta1: FloatArray
    overhead: FloatArray
    _band: _Quantiles = dataclasses.field(repr=False)  # at DEFAULT_CONFIDENCE
    _sum: _Quantiles = dataclasses.field(repr=False)  # SUM_QUANTILES

    @property
    def size(self) -> int:
        return len(self.models)

    def _alpha(self, x: FloatArray) -> FloatArray:
        """(len(x), R): every replicate's alpha at every x."""
        g = self.grid
        if g.size == 1:
            out = np.repeat(self.alpha, x.size, axis=0)
        else:
            j = np.minimum(np.maximum(np.searchsorted(g, x, side="right") - 1, 0), g.size - 2)
            xc = np.minimum(np.maximum(x, g[0]), g[-1])
            # np.interp's formula: slope of the segment * (x - its left end) + left value
            out = self.seg_slope[j] * (xc - g[j])[:, None] + self.alpha[j]
        beyond = x > g[-1]
        if np.any(beyond):
            out[beyond] = self.alpha[-1] + (x[beyond] - g[-1])[:, None] * self.tail
        return out

    def runtimes(self, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
        """(N, R): runtime of each query (1-D p, o) under each replicate, as
        predict_runtime computes it."""
        pf = np.asarray(p, dtype=np.float64).ravel()
        n = np.maximum(np.asarray(o, dtype=np.float64).ravel() - 1.0, 0.0)
        steps = n * pf + n * (n + 1.0) / 2.0
        decode = n[:, None] * self.beta0 + steps[:, None] * self.beta1
        out: FloatArray = self.overhead + self._alpha(pf) + decode
        return out

    def totals(self, p: npt.ArrayLike, o: npt.ArrayLike) -> FloatArray:
        """(R,): the workload's total runtime under each replicate, from the workload's
        weights on the grid (module doc), without an (N x R) array."""
        pf = np.asarray(p, dtype=np.float64).ravel()
        n = np.maximum(np.asarray(o, dtype=np.float64).ravel() - 1.0, 0.0)
        g = self.grid
        weights = np.zeros(g.size, dtype=np.float64)
        xc = np.clip(pf, g[0], g[-1])
        if g.size == 1:
            weights[0] = pf.size
        else:
            j = np.clip(np.searchsorted(g, xc, side="right") - 1, 0, g.size - 2)
            t = (xc - g[j]) / (g[j + 1] - g[j])
            weights += np.bincount(j, weights=1.0 - t, minlength=g.size)
            weights += np.bincount(j + 1, weights=t, minlength=g.size)
        beyond = float(np.sum(pf - xc, where=pf > g[-1]))  # of the queries beyond the grid
        s0 = float(np.sum(n))
        s1 = float(np.sum(n * pf + n * (n + 1.0) / 2.0))
        out: FloatArray = (
            pf.size * self.overhead
            + weights @ self.alpha
            + beyond * self.tail
            + s0 * self.beta0
            + s1 * self.beta1
        )
        return out

    def estimate(
        self,
        p: npt.ArrayLike,
        o: npt.ArrayLike,
        *,
        per_query: bool,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> tuple[tuple[FloatArray, FloatArray] | None, tuple[float, float]]:
        """((low, high) per query at `confidence`, None without `per_query`; the sum's
        interval) for the workload of 1-D (p, o): `interval` and `sum_interval` at once.
        A workload of at most _SMALL queries is predicted once for both; a larger one in
        chunks of CHUNK_FLOATS predictions, its totals from the weights."""
        pa = np.asarray(p).ravel()
        oa = np.asarray(o).ravel()
        band = self._band if confidence == DEFAULT_CONFIDENCE else _band(self.size, confidence)
        if pa.size <= _SMALL:
            preds = self.runtimes(pa, oa)
            totals = preds.sum(axis=0)  # a few terms: as exact as the weights
            per = band(preds) if per_query else None
            lo, hi = self._sum(totals)
            return (None if per is None else (per[0], per[1])), (float(lo), float(hi))
        if per_query:
            low = np.empty(pa.size, dtype=np.float64)
            high = np.empty(pa.size, dtype=np.float64)
            step = max(1, CHUNK_FLOATS // max(self.size, 1))
            for i in range(0, pa.size, step):
                chunk = self.runtimes(pa[i : i + step], oa[i : i + step])
                low[i : i + step], high[i : i + step] = band(chunk)
        lo, hi = self._sum(self.totals(pa, oa))
        return ((low, high) if per_query else None), (float(lo), float(hi))

    def interval(
        self, p: npt.ArrayLike, o: npt.ArrayLike, confidence: float = DEFAULT_CONFIDENCE
    ) -> tuple[FloatArray, FloatArray]:
        """Per-query percentile interval (low, high) of the runtime at 1-D (p, o) over the
        replicates: predict_interval's."""
        band = self.estimate(p, o, per_query=True, confidence=confidence)[0]
        assert band is not None
        return band

    def sum_interval(self, p: npt.ArrayLike, o: npt.ArrayLike) -> tuple[float, float]:
        """The SUM_QUANTILES of the replicates' workload totals (np.quantile's)."""
        return self.estimate(p, o, per_query=False)[1]


def prepare_replicates(replicates: Sequence[CostModel]) -> ReplicateSet:
    """The ReplicateSet of `replicates` (an empty one for none)."""
    models = tuple(replicates)
    r = len(models)
    knots = [np.asarray(m.alpha_knots_p, dtype=np.float64) for m in models]
    grid = np.unique(np.concatenate(knots)) if knots else np.zeros(1)
    alpha = np.empty((grid.size, r), dtype=np.float64)
    tail = np.zeros(r, dtype=np.float64)
    for i, m in enumerate(models):
        pm = prepare(m)
        alpha[:, i] = pm.alpha(grid)
        tail[i] = pm.tail_slope
    seg = np.diff(alpha, axis=0) / np.diff(grid)[:, None]
    arrays = {
        "grid": grid,
        "alpha": alpha,
        "seg_slope": np.ascontiguousarray(seg, dtype=np.float64),
        "tail": tail,
        "beta0": np.array([m.beta0_s for m in models], dtype=np.float64),
        "beta1": np.array([m.beta1_s for m in models], dtype=np.float64),
        "overhead": np.array([m.overhead_s for m in models], dtype=np.float64),
    }
    for a in arrays.values():
        a.setflags(write=False)
    return ReplicateSet(
        models=models,
        **arrays,
        _band=_band(r, DEFAULT_CONFIDENCE),
        _sum=_Quantiles.of(r, np.asarray(SUM_QUANTILES)),
    )


def predict_interval(
    replicates: Sequence[CostModel] | ReplicateSet,
    p: npt.ArrayLike,
    o: npt.ArrayLike,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[FloatArray, FloatArray]:
    """Percentile interval (low, high) of the predicted runtime at (p, o), broadcast like
    predict_runtime, over the bootstrap replicates (models, or their ReplicateSet)."""
    rs = replicates if isinstance(replicates, ReplicateSet) else prepare_replicates(replicates)
    if rs.size == 0:
        raise FailedPrecondition(
            NO_BOOTSTRAP_REPLICATES,
            "prediction intervals need bootstrap replicates: fit with options.bootstrap > 0",
            field="options.bootstrap",
        )
    pa, oa = np.broadcast_arrays(np.asarray(p), np.asarray(o))
    low, high = rs.interval(pa.ravel(), oa.ravel(), confidence)
    return low.reshape(pa.shape), high.reshape(pa.shape)
