"""Robust statistics behind the cost-model fit (private to the metrics service).

Everything is vectorized numpy over small arrays: grouped medians / trimmed means,
MAD spreads, Huber regression by iteratively reweighted least squares, weighted isotonic
regression (pool adjacent violators) and knot selection for a piecewise-linear curve.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAD_TO_SIGMA",
    "Groups",
    "centre_se_factor",
    "group",
    "group_centre",
    "group_median",
    "group_sigma",
    "huber_fit",
    "isotonic",
    "select_knots",
    "weighted_median",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# sigma = MAD_TO_SIGMA * MAD for normal data.
MAD_TO_SIGMA = 1.482602218505602


def centre_se_factor(method: str) -> float:
    """Standard error of the centre relative to sigma/sqrt(n), under normal noise:
    sqrt(pi/2) for the median; ~1.06 for a 10%-trimmed mean."""
    return 1.2533141373155001 if method == "median" else 1.06


class Groups:
    """Rows grouped by an integer key (one column or several). `keys[g]` is group g's key,
    `inverse[i]` the group of row i, `counts[g]` its size; `order` sorts rows by group and
    `starts[g]` is where group g begins in that order."""

    def __init__(self, keys: npt.ArrayLike) -> None:
        k = np.asarray(keys, dtype=np.int64)
        if k.ndim == 1:
            uk, inv, cnt = np.unique(k, return_inverse=True, return_counts=True)
        else:
            uk, inv, cnt = np.unique(k, axis=0, return_inverse=True, return_counts=True)
        self.keys: IntArray = np.asarray(uk, dtype=np.int64)
        self.inverse: IntArray = np.asarray(inv, dtype=np.int64).reshape(-1)
        self.counts: IntArray = np.asarray(cnt, dtype=np.int64)
        self.order: IntArray = np.argsort(self.inverse, kind="stable").astype(np.int64)
        self.starts: IntArray = (np.cumsum(self.counts) - self.counts).astype(np.int64)

    @property
    def n(self) -> int:
        return int(self.counts.size)


def group(keys: npt.ArrayLike) -> Groups:
    return Groups(keys)


def _sorted_within(values: FloatArray, g: Groups) -> FloatArray:
    """values sorted by (group, value)."""
    idx = np.lexsort((values, g.inverse))
    return np.asarray(values[idx], dtype=np.float64)


def group_median(values: npt.ArrayLike, g: Groups) -> FloatArray:
    v = _sorted_within(np.asarray(values, dtype=np.float64), g)
    lo = g.starts + (g.counts - 1) // 2
    hi = g.starts + g.counts // 2
    return np.asarray(0.5 * (v[lo] + v[hi]), dtype=np.float64)


def group_trimmed_mean(values: npt.ArrayLike, g: Groups, trim: float) -> FloatArray:
    """Mean of each group after dropping floor(trim*n) values at each end."""
    v = _sorted_within(np.asarray(values, dtype=np.float64), g)
    gid = np.repeat(np.arange(g.n), g.counts)
    rank = np.arange(v.size) - g.starts[gid]
    cut = np.floor(trim * g.counts).astype(np.int64)
    keep = (rank >= cut[gid]) & (rank < (g.counts - cut)[gid])
    sums = np.bincount(gid[keep], weights=v[keep], minlength=g.n)
    kept = np.bincount(gid[keep], minlength=g.n)
    return np.asarray(sums / kept, dtype=np.float64)


def group_centre(
    values: npt.ArrayLike, g: Groups, method: str, trim: float, reject: float = 3.5
) -> FloatArray:
    """Robust centre per group: "median" or "trimmed" (trim fraction cut at each end), after
    rejecting values more than `reject` robust sigmas (MAD) from their group's median
    (0 disables). The rejection step makes one-sided gross outliers (a contended 5x sample)
    cost nothing: a median alone would still be pulled a little towards them."""
    v = np.asarray(values, dtype=np.float64)
    if reject > 0:
        med = group_median(v, g)
        sigma = MAD_TO_SIGMA * group_median(np.abs(v - med[g.inverse]), g)
        keep = np.abs(v - med[g.inverse]) <= reject * sigma[g.inverse]
        if not np.all(keep):  # at least half of every group is kept: no group empties
            g = Groups(g.inverse[keep])
            v = v[keep]
    if method == "median":
        return group_median(v, g)
    return group_trimmed_mean(v, g, trim)


def group_sigma(values: npt.ArrayLike, g: Groups) -> FloatArray:
    """Robust spread per group: MAD_TO_SIGMA * median |x - median| (0 for single values)."""
    v = np.asarray(values, dtype=np.float64)
    med = group_median(v, g)
    return MAD_TO_SIGMA * group_median(np.abs(v - med[g.inverse]), g)


def weighted_median(values: npt.ArrayLike, weights: npt.ArrayLike) -> float:
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    idx = np.argsort(v)
    cw = np.cumsum(w[idx])
    return float(v[idx][int(np.searchsorted(cw, 0.5 * cw[-1]))])


def _wls(x: FloatArray, y: FloatArray, w: FloatArray) -> FloatArray:
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)
    return np.asarray(coef, dtype=np.float64)


def huber_fit(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    w: npt.ArrayLike | None = None,
    *,
    k: float = 1.345,
    max_iter: int = 200,
) -> FloatArray:
    """Huber M-estimate of y ~ x @ coef with prior weights w, by IRLS.

    The scale is re-estimated every iteration as MAD_TO_SIGMA times the weighted median
    absolute residual, floored at 1e-9 of the typical |y| so that exact data (a clean
    majority of zero residuals) still converges, to the L1 fit, instead of stopping early.
    Columns are normalized internally; coefficients are returned in the original units.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    wa = np.ones_like(ya) if w is None else np.asarray(w, dtype=np.float64)
    norms = np.linalg.norm(xa, axis=0)
    norms[norms == 0] = 1.0
    xs = xa / norms
    coef = _wls(xs, ya, wa)
    floor = 1e-9 * max(float(np.median(np.abs(ya))), 1e-30)
    for _ in range(max_iter):
        r = ya - xs @ coef
        s = max(MAD_TO_SIGMA * weighted_median(np.abs(r), wa), floor)
        u = np.abs(r) / (k * s)
        hw = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300))
        new = _wls(xs, ya, wa * hw)
        done = np.allclose(new, coef, rtol=1e-12, atol=1e-15 * max(1.0, float(np.abs(coef).max())))
        coef = new
        if done:
            break
    return np.asarray(coef / norms, dtype=np.float64)


def isotonic(y: npt.ArrayLike, w: npt.ArrayLike | None = None) -> FloatArray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    ya = np.asarray(y, dtype=np.float64)
    wa = np.ones_like(ya) if w is None else np.asarray(w, dtype=np.float64)
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for yi, wi in zip(ya.tolist(), wa.tolist(), strict=True):
        vals.append(yi)
        wts.append(wi)
        lens.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            wts[-2] = wsum
            lens[-2] += lens[-1]
            del vals[-1], wts[-1], lens[-1]
    return np.repeat(np.asarray(vals, dtype=np.float64), lens)


def select_knots(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    tol: npt.ArrayLike,
    w: npt.ArrayLike,
    max_knots: int,
) -> IntArray:
    """Indices of the fewest knots among the points (first and last always kept) such that
    the polyline through (x[k], y[k]) at the knots stays within tol[i] of every y[i].

    Among knot sets of that minimal size the one with the least weighted squared residual
    sum(w * r^2) wins. If even the minimal set exceeds max_knots, the max_knots-knot set
    with the least weighted squared residual is returned instead (tolerance relaxed).
    Exact dynamic programming over the O(n^2) segments, so the choice is global, not greedy.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    ta = np.asarray(tol, dtype=np.float64)
    wa = np.asarray(w, dtype=np.float64)
    n = xa.size
    if n <= 2:
        return np.arange(n, dtype=np.int64)
    i = np.arange(n)[:, None, None]
    j = np.arange(n)[None, :, None]
    kk = np.arange(n)[None, None, :]
    dx = xa[None, :] - xa[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(dx > 0, (ya[None, :] - ya[:, None]) / np.where(dx > 0, dx, 1.0), 0.0)
    line = ya[:, None, None] + slope[:, :, None] * (xa[None, None, :] - xa[:, None, None])
    r = ya[None, None, :] - line
    interior = (kk > i) & (kk < j)
    cost = np.where(interior, wa[None, None, :] * r * r, 0.0).sum(axis=2)
    ok = np.asarray(np.where(interior, np.abs(r) <= ta[None, None, :], True).all(axis=2))
    upper = np.arange(n)[:, None] < np.arange(n)[None, :]

    def best_path(edges: BoolArray, m_max: int, first: bool) -> list[IntArray] | None:
        """Back-pointers of the least-cost path 0 -> n-1 through m knots: the smallest
        feasible m when `first`, else exactly m_max."""
        c = np.where(edges & upper, cost, np.inf)
        best = np.full(n, np.inf)
        best[0] = 0.0
        back: list[IntArray] = []
        for _m in range(2, m_max + 1):  # _m knots including both ends
            tot = best[:, None] + c
            arg = np.argmin(tot, axis=0)
            best = tot[arg, np.arange(n)]
            back.append(arg.astype(np.int64))
            if first and np.isfinite(best[n - 1]):
                return back
        return back if np.isfinite(best[n - 1]) else None

    def trace(back: list[IntArray]) -> IntArray:
        idx = [n - 1]
        for arg in reversed(back):
            idx.append(int(arg[idx[-1]]))
        return np.asarray(idx[::-1], dtype=np.int64)

    back = best_path(ok, n, first=True)
    assert back is not None  # consecutive points always form a feasible path
    if len(back) + 1 <= max_knots:
        return trace(back)
    relaxed = best_path(np.ones((n, n), dtype=np.bool_), max(max_knots, 2), first=False)
    assert relaxed is not None
    return trace(relaxed)
