"""When to stop measuring a configuration.

Fixed mode (`plan.until_ci_rel == 0`): exactly `plan.repeats` accepted samples per
configuration. Precision mode (`until_ci_rel > 0`): at least `plan.repeats`, then more until
the 95% confidence interval of the mean of the configuration's `total_ns` (Student t,
n - 1 degrees of freedom) has a half-width below `until_ci_rel` x mean, capped at
`effective_max_repeats(plan)`. Both modes stop when the wall-clock budget `plan.budget_s`
(> 0) is spent; the runner checks it between samples, never inside one. The budget covers
everything after the warm-ups: the rounds, the waits of a spread schedule (plan validation
keeps spread_s below budget_s) and adaptive planning (its fits and added sizes).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping, Sequence

from scipy import stats

from idealrt.core.domain import ProfilePlan
from idealrt.services.profiler.plan import Config, effective_max_repeats

__all__ = ["CONFIDENCE", "StopReason", "StoppingRule", "ci_half_width", "ci_rel"]

CONFIDENCE = 0.95


class StopReason(enum.StrEnum):
    REPEATS = "repeats"  # fixed repeats done
    PRECISION = "precision"  # every configuration reached the CI target
    MAX_REPEATS = "max_repeats"  # some configuration hit the cap before the CI target
    BUDGET = "budget"  # wall-clock budget spent


def ci_half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided t confidence interval of the mean (inf for n < 2)."""
    n = len(values)
    if n < 2:
        return math.inf
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return t * math.sqrt(var / n)


def ci_rel(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """CI half-width relative to the mean (inf when undefined)."""
    if len(values) < 2:
        return math.inf
    mean = math.fsum(values) / len(values)
    if mean <= 0:
        return math.inf
    return ci_half_width(values, confidence) / mean


class StoppingRule:
    """Decides, per configuration, whether another repeat is needed."""

    def __init__(self, plan: ProfilePlan, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self.min_repeats = plan.repeats
        self.max_repeats = effective_max_repeats(plan)
        self.target_rel = plan.until_ci_rel
        self._clock = clock
        self._start = clock()

    def budget_spent(self) -> bool:
        return self.plan.budget_s > 0 and self._clock() - self._start >= self.plan.budget_s

    def needs_more(self, totals_ns: Sequence[float], slots: int | None = None) -> bool:
        """`slots`: repeats used up so far (accepted samples plus repeats abandoned after
        exhausting their contention retries); defaults to the number of accepted samples."""
        used = len(totals_ns) if slots is None else slots
        if used >= self.max_repeats:
            return False
        if used < self.min_repeats:
            return True
        if self.target_rel <= 0:
            return False
        return ci_rel(totals_ns) >= self.target_rel

    def pending(
        self,
        totals: Mapping[Config, Sequence[float]],
        slots: Mapping[Config, int] | None = None,
    ) -> list[Config]:
        """Configurations (in the mapping's order) that need another repeat."""
        return [
            c for c, v in totals.items() if self.needs_more(v, None if slots is None else slots[c])
        ]

    def reason(self, totals: Mapping[Config, Sequence[float]]) -> StopReason:
        """Why measurement ended once nothing is pending (budget is the caller's call)."""
        if self.target_rel <= 0:
            return StopReason.REPEATS
        if any(ci_rel(v) >= self.target_rel for v in totals.values()):
            return StopReason.MAX_REPEATS
        return StopReason.PRECISION

    def worst_ci_rel(self, totals: Mapping[Config, Sequence[float]]) -> float:
        return max((ci_rel(v) for v in totals.values()), default=math.inf)
