"""Compare two stacks (or two models) on one workload, with a bootstrap confidence interval.

ratio = total runtime of the workload under A / the same under B (> 1: A is slower).

The interval comes from the two fits' bootstrap replicates: every replicate of A against
every replicate of B (the replicates are independent, so all n_a x n_b pairs are draws of
the ratio), and the percentile interval of those ratios at `confidence`. The difference is
significant when the interval excludes 1.

`compare` fits both sample sets itself (fit.fit_with_replicates: resampling within each
(p, o) configuration and refitting everything); `compare_fits` takes fitted models and their
replicate lists as they are (e.g. loaded from the store).

The workload is collapsed to its distinct (p, o) pairs with counts first, so a replicate
costs one prediction per distinct pair, not per query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from idealrt.core.costmodel.estimate import validate_queries
from idealrt.core.costmodel.fit import FitOptions, fit_with_replicates
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE
from idealrt.core.costmodel.predict import predict_runtime
from idealrt.core.domain import CostModel, Sample
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.reasons import WORKLOAD_EMPTY
from idealrt.services.metrics.reasons import (
    CONFIDENCE_INVALID,
    COST_MODEL_DEGENERATE,
    N_BOOT_INVALID,
    NOT_ENOUGH_REPLICATES,
)

__all__ = ["MIN_REPLICATES", "Comparison", "compare", "compare_fits"]

FloatArray = npt.NDArray[np.float64]
MIN_REPLICATES = 20


@dataclasses.dataclass(frozen=True)
class Comparison:
    ratio: float  # a_total_s / b_total_s
    low: float
    high: float
    significant: bool  # the interval excludes 1
    a_total_s: float
    b_total_s: float
    confidence: float = DEFAULT_CONFIDENCE
    a_replicates: int = 0
    b_replicates: int = 0


class _Workload:
    """Distinct (p, o) pairs of a workload and how often each occurs."""

    def __init__(self, p: npt.ArrayLike, o: npt.ArrayLike) -> None:
        pa, oa = validate_queries(p, o)
        if pa.size == 0:
            raise InvalidArgument(
                WORKLOAD_EMPTY, "a workload needs at least one query", field="queries"
            )
        key = pa * (int(oa.max()) + 1) + oa
        _, idx, counts = np.unique(key, return_index=True, return_counts=True)
        self.p = pa[idx]
        self.o = oa[idx]
        self.counts = counts.astype(np.float64)

    def total(self, cm: CostModel) -> float:
        return float(self.counts @ predict_runtime(cm, self.p, self.o))


def compare_fits(
    a: CostModel,
    b: CostModel,
    a_replicates: Sequence[CostModel],
    b_replicates: Sequence[CostModel],
    workload_p: npt.ArrayLike,
    workload_o: npt.ArrayLike,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Comparison:
    """Ratio of A's to B's total workload runtime, with the bootstrap percentile interval."""
    if not 0.0 < confidence < 1.0:
        raise InvalidArgument(
            CONFIDENCE_INVALID,
            f"confidence must be in (0, 1), got {confidence}",
            field="confidence",
        )
    for name, reps in (("a", a_replicates), ("b", b_replicates)):
        if len(reps) < MIN_REPLICATES:
            raise FailedPrecondition(
                NOT_ENOUGH_REPLICATES,
                f"{name} has {len(reps)} bootstrap replicates; a comparison interval needs "
                f"at least {MIN_REPLICATES} (fit with options.bootstrap >= {MIN_REPLICATES})",
                field=f"{name}_replicates",
            )
    wl = _Workload(workload_p, workload_o)
    a_total, b_total = wl.total(a), wl.total(b)
    if not (a_total > 0.0 and b_total > 0.0):
        raise FailedPrecondition(
            COST_MODEL_DEGENERATE,
            f"workload totals must be positive, got A {a_total} s and B {b_total} s",
            field="cost_model",
        )
    ta = np.array([wl.total(r) for r in a_replicates])
    tb = np.array([wl.total(r) for r in b_replicates])
    ratios = np.divide.outer(ta, tb).ravel()
    tail = 50.0 * (1.0 - confidence)
    low, high = (float(v) for v in np.percentile(ratios, [tail, 100.0 - tail]))
    return Comparison(
        ratio=a_total / b_total,
        low=low,
        high=high,
        significant=bool(low > 1.0 or high < 1.0),
        a_total_s=a_total,
        b_total_s=b_total,
        confidence=confidence,
        a_replicates=len(a_replicates),
        b_replicates=len(b_replicates),
    )


def compare(
    a_samples: Sequence[Sample],
    b_samples: Sequence[Sample],
    workload_p: npt.ArrayLike,
    workload_o: npt.ArrayLike,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    options: FitOptions | None = None,
) -> Comparison:
    """Fit A and B (with `n_boot` bootstrap replicates each, independent seeds derived from
    `seed`) and compare their total runtimes on the workload."""
    if n_boot < MIN_REPLICATES:
        raise InvalidArgument(
            N_BOOT_INVALID,
            f"n_boot must be >= {MIN_REPLICATES}, got {n_boot}",
            field="n_boot",
        )
    base = options or FitOptions()
    seeds = np.random.SeedSequence(seed).generate_state(2)
    # kfold=0: a comparison needs the replicates, not each fit's cross-validated quality.
    a_cm, a_reps = fit_with_replicates(
        a_samples,
        options=dataclasses.replace(base, bootstrap=n_boot, seed=int(seeds[0]), kfold=0),
    )
    b_cm, b_reps = fit_with_replicates(
        b_samples,
        options=dataclasses.replace(base, bootstrap=n_boot, seed=int(seeds[1]), kfold=0),
    )
    return compare_fits(a_cm, b_cm, a_reps, b_reps, workload_p, workload_o, confidence=confidence)
