"""Adaptive planning: add prompt sizes where the fitted alpha(p) is least certain.

With `plan.adaptive_target_rel > 0` the runner first measures the plan's whole grid, then
repeats: fit the cost model to the samples so far, judge every gap between adjacent
measured prompt sizes, measure one more size in the worst gap (with every output length of
the plan, for `plan.repeats` rounds, or more under `until_ci_rel`), until every gap is within
the target, `effective_max_prompt_sizes(plan)` sizes were added, or the budget is spent.

The fit is the metrics service's own: `fit_with_replicates` (what MetricsService.FitCostModel
runs) on the OK, not held-out samples, in-process, with the same defaults except that the
bootstrap is seeded by `plan.seed` and no cross-validation is computed (its quality figure is
not used here). The profiler therefore judges precision with exactly the model a user will
fit afterwards.

Why alpha(p). Between two measured prompt sizes a and b the fitted alpha is the straight
chord from alpha(a) to alpha(b); beta is a line fitted to every decode step of every size,
so the prompt sizes profiled matter for alpha. The uncertainty of a gap (a, b) is two terms,
each relative to the fitted alpha at the candidate size c of the gap, combined in
quadrature (`Gap.rel_halfwidth`):

- noise (`bootstrap_rel`): half the width of the 95% percentile interval of alpha(c) over
  the bootstrap replicates (each replicate resamples within every (p, o) configuration and
  refits, knots included).
- bend (`bend_rel`): the bootstrap cannot see a bend the chord cuts across, so the gap is
  also bounded by its neighbours. The fitted curve bends only at its knots; if the curve
  inside (a, b) bends once, continuing the neighbouring segments' slopes (s_L left of a,
  s_R right of b) into the gap bounds how far the true curve can be from the chord (slope
  s_C). With dL = |s_L - s_C| and dR = |s_R - s_C| the largest possible chord error is
  dL*dR*(b - a)/(dL + dR), at x* = (dL*a + dR*b)/(dL + dR), where the extended segments
  meet; exact for a single kink between a and b (x* is then the kink itself). An end gap
  has one neighbour: the bound is then d*(b - a) (the curve could hug the extended
  segment up to the far end). Both are zero where the fit is straight across the gap.

Where to measure in a gap: where the larger term points. Bend: at x*, kept within the
middle half of the gap (so the gap at least shrinks by a quarter). Noise: at the geometric
midpoint sqrt(a*b) (grids are usually log-spaced). Rounded to an integer strictly inside
the gap that has not been measured and is not a held-out prompt size, the nearest one when
taken; a gap without such an integer is complete and not judged.

Limits: measuring a new size shrinks the bend term quickly (one size per kink when the kink
is sharp), but the noise term only where the curve is straight (a line through more points).
Where noise at the measured sizes alone exceeds the target, more sizes do not help; more
repeats do (`plan.until_ci_rel`), and the run stops at the size cap.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Collection, Sequence

import numpy as np

from idealrt.core.costmodel.fit import FitOptions, fit_with_replicates, usable_samples
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE
from idealrt.core.costmodel.predict import alpha_at
from idealrt.core.domain import CostModel, ProfilePlan, Sample, SampleFlag
from idealrt.core.errors import IdealrtError, InvalidArgument
from idealrt.services.profiler.plan import effective_max_prompt_sizes
from idealrt.services.profiler.reasons import INVALID_ADAPTIVE_OPTIONS

__all__ = [
    "AdaptiveOptions",
    "AdaptivePlanner",
    "AdaptiveStop",
    "Assessment",
    "Gap",
    "added_prompt_sizes",
    "assess",
]

CONFIDENCE = DEFAULT_CONFIDENCE


@dataclasses.dataclass(frozen=True)
class AdaptiveOptions:
    """bootstrap: replicates behind the noise term (the metrics service's default count)."""

    bootstrap: int = DEFAULT_BOOTSTRAP

    def validate(self) -> None:
        if self.bootstrap < 2:
            raise InvalidArgument(
                INVALID_ADAPTIVE_OPTIONS,
                f"bootstrap must be >= 2 replicates, got {self.bootstrap!r}",
                field="adaptive.bootstrap",
            )


class AdaptiveStop(enum.StrEnum):
    TARGET_MET = "target_met"  # every gap's relative half-width is within the target
    MAX_SIZES = "max_sizes"  # effective_max_prompt_sizes(plan) sizes were added
    BUDGET = "budget"  # plan.budget_s was spent
    NO_CANDIDATES = "no_candidates"  # every integer between the measured sizes is measured
    FIT_FAILED = "fit_failed"  # the samples could not be fitted (e.g. all contended)


@dataclasses.dataclass(frozen=True)
class Gap:
    """Two adjacent measured prompt sizes and the size to measure between them."""

    low: int
    high: int
    candidate: int
    alpha_s: float  # fitted alpha at the candidate
    bootstrap_rel: float  # 95% bootstrap half-width of alpha(candidate) / alpha(candidate)
    bend_rel: float  # largest chord error a single bend allows / alpha(candidate)

    @property
    def rel_halfwidth(self) -> float:
        return math.hypot(self.bootstrap_rel, self.bend_rel)


@dataclasses.dataclass(frozen=True)
class Assessment:
    """One fit and its gaps (only gaps that have a candidate), ordered by prompt size."""

    model: CostModel
    gaps: tuple[Gap, ...]

    @property
    def worst(self) -> Gap | None:
        """The most uncertain gap (the smaller prompt size on a tie)."""
        return max(self.gaps, key=lambda g: (g.rel_halfwidth, -g.low), default=None)

    @property
    def max_rel_halfwidth(self) -> float:
        worst = self.worst
        return 0.0 if worst is None else worst.rel_halfwidth


def added_prompt_sizes(plan: ProfilePlan, samples: Sequence[Sample]) -> list[int]:
    """The sizes an adaptive run added, in the order added, recognised from stored samples
    (in stored order): a fit (not held-out) sample, OK or CONTENDED (both have exactly the
    requested counts), whose prompt size is not in plan.prompt_tokens. Empty when adaptive
    planning is off."""
    if plan.adaptive_target_rel <= 0:
        return []
    grid = set(plan.prompt_tokens)
    found: dict[int, None] = {}
    for s in samples:
        if (
            not s.heldout
            and s.flag in (SampleFlag.OK, SampleFlag.CONTENDED)
            and s.prompt_tokens not in grid
        ):
            found.setdefault(s.prompt_tokens, None)
    return list(found)


def _bend(sizes: Sequence[int], values: Sequence[float], i: int) -> tuple[float, float]:
    """(largest chord error in seconds, where) for the gap sizes[i]..sizes[i+1]."""
    a, b = sizes[i], sizes[i + 1]

    def slope(j: int) -> float:
        return (values[j + 1] - values[j]) / (sizes[j + 1] - sizes[j])

    sc = slope(i)
    dl = abs(slope(i - 1) - sc) if i > 0 else None
    dr = abs(slope(i + 1) - sc) if i + 2 < len(sizes) else None
    if dl is None and dr is None:
        return 0.0, (a + b) / 2
    if dl is None:
        assert dr is not None
        return dr * (b - a), float(a)
    if dr is None:
        return dl * (b - a), float(b)
    if dl + dr <= 0.0:
        return 0.0, (a + b) / 2
    return dl * dr * (b - a) / (dl + dr), (dl * a + dr * b) / (dl + dr)


def _nearest_free(x: float, a: int, b: int, taken: Collection[int]) -> int | None:
    """The integer strictly inside (a, b) nearest to x that is not taken (None if none)."""
    lo, hi = a + 1, b - 1
    if lo > hi:
        return None
    start = min(max(round(x), lo), hi)
    for d in range(hi - lo + 1):
        for c in (start - d, start + d):
            if lo <= c <= hi and c not in taken:
                return c
    return None


def _place(a: int, b: int, x_bend: float, bend_dominates: bool) -> float:
    if bend_dominates:
        quarter = (b - a) / 4
        return min(max(x_bend, a + quarter), b - quarter)
    return math.sqrt(a * b)


def _rel(value: float, alpha: float) -> float:
    return value / alpha if alpha > 0 else math.inf


def assess(
    samples: Sequence[Sample],
    *,
    taken: Collection[int] = (),
    options: AdaptiveOptions | None = None,
    seed: int = 0,
) -> Assessment:
    """Fit (see the module doc) and judge every gap between adjacent measured prompt sizes.
    `taken`: prompt sizes never to propose (measured in any way, or held out). Raises what
    the fit raises (FailedPrecondition NOT_ENOUGH_SAMPLES, ...)."""
    opts = options or AdaptiveOptions()
    opts.validate()
    fit_opts = FitOptions(bootstrap=opts.bootstrap, seed=seed, kfold=0)
    cm, replicates = fit_with_replicates(samples, options=fit_opts)
    sizes = sorted({s.prompt_tokens for s in usable_samples(samples, heldout=False)})
    values = [float(v) for v in alpha_at(cm, sizes)]
    avoid = set(taken) | set(sizes)
    # The bend term does not depend on where the gap is measured; the noise term does
    # (through alpha and the replicates there), and the place depends on which term
    # dominates, so each gap is evaluated at both places, in one pass over the replicates.
    # (Both places exist or neither: they are the nearest free integers of the same gap.)
    spots: list[tuple[int, int, float, int, int]] = []
    for i in range(len(sizes) - 1):
        a, b = sizes[i], sizes[i + 1]
        bend, x_bend = _bend(sizes, values, i)
        at_bend = _nearest_free(_place(a, b, x_bend, True), a, b, avoid)
        at_mid = _nearest_free(_place(a, b, x_bend, False), a, b, avoid)
        if at_bend is not None and at_mid is not None:
            spots.append((a, b, bend, at_bend, at_mid))
    points = sorted({c for *_, x, y in spots for c in (x, y)})
    alpha = dict(zip(points, (float(v) for v in alpha_at(cm, points)), strict=True))
    half: dict[int, float] = dict.fromkeys(points, math.inf)
    if len(replicates) >= 2 and points:
        reps = np.stack([alpha_at(r, points) for r in replicates])
        tail = 50.0 * (1.0 - CONFIDENCE)
        lo, hi = np.percentile(reps, [tail, 100.0 - tail], axis=0)
        half = {c: float(h - low) / 2 for c, low, h in zip(points, lo, hi, strict=True)}
    gaps: list[Gap] = []
    for a, b, bend, at_bend, at_mid in spots:
        bend_dominates = _rel(bend, alpha[at_bend]) >= _rel(half[at_mid], alpha[at_mid])
        c = at_bend if bend_dominates else at_mid
        gaps.append(
            Gap(
                low=a,
                high=b,
                candidate=c,
                alpha_s=alpha[c],
                bootstrap_rel=_rel(half[c], alpha[c]),
                bend_rel=_rel(bend, alpha[c]),
            )
        )
    return Assessment(model=cm, gaps=tuple(gaps))


class AdaptivePlanner:
    """The adaptive loop's state: sizes added (resumed ones first), why it stopped, and the
    provenance entries that record it ("adaptive.*")."""

    def __init__(
        self,
        plan: ProfilePlan,
        *,
        added: Sequence[int] = (),
        options: AdaptiveOptions | None = None,
    ) -> None:
        self.plan = plan
        self.options = options or AdaptiveOptions()
        self.options.validate()
        self.target = plan.adaptive_target_rel
        self.max_sizes = effective_max_prompt_sizes(plan)
        self.added: list[int] = list(added)
        self.added_rel: list[float] = [math.nan] * len(self.added)  # unknown when resumed
        self.unmeasured: list[int] = []
        self.fits = 0
        self.stop: AdaptiveStop | None = None
        self.stop_detail = ""
        self.last: Assessment | None = None

    def _halt(self, reason: AdaptiveStop, detail: str = "") -> None:
        if self.stop is None:
            self.stop, self.stop_detail = reason, detail

    def halt_budget(self) -> None:
        """The budget ran out (while measuring an added size, or before adaptive began)."""
        self._halt(AdaptiveStop.BUDGET)

    def drop_unmeasured(self, sizes: Collection[int]) -> None:
        """Forget added sizes that got no sample (the budget ran out first); they are
        recorded as "adaptive.unmeasured"."""
        keep = [i for i, p in enumerate(self.added) if p not in sizes]
        self.unmeasured.extend(p for p in self.added if p in sizes)
        self.added = [self.added[i] for i in keep]
        self.added_rel = [self.added_rel[i] for i in keep]

    def next_size(self, samples: Sequence[Sample], *, budget_spent: bool = False) -> int | None:
        """The next prompt size to measure, or None once stopped (see `stop`). `samples`:
        everything stored for the profile so far."""
        if self.stop is not None:
            return None
        if budget_spent:
            self.halt_budget()
            return None
        taken = {s.prompt_tokens for s in samples} | set(self.plan.holdout_prompt_tokens)
        taken |= set(self.plan.prompt_tokens) | set(self.added)
        try:
            assessment = assess(samples, taken=taken, options=self.options, seed=self.plan.seed)
        except IdealrtError as exc:
            self._halt(AdaptiveStop.FIT_FAILED, f"{exc.reason}: {exc.message}")
            return None
        self.fits += 1
        self.last = assessment
        worst = assessment.worst
        if worst is None:
            self._halt(AdaptiveStop.NO_CANDIDATES)
            return None
        if worst.rel_halfwidth <= self.target:
            self._halt(AdaptiveStop.TARGET_MET)
            return None
        if len(self.added) >= self.max_sizes:
            self._halt(AdaptiveStop.MAX_SIZES)
            return None
        self.added.append(worst.candidate)
        self.added_rel.append(worst.rel_halfwidth)
        return worst.candidate

    def provenance(self) -> dict[str, str]:
        """The "adaptive.*" entries: target, cap, sizes added (and the relative half-width of
        the gap each was chosen in), the latest fit's largest relative half-width, the
        number of fits and why the loop stopped ("" while it runs)."""
        last = "nan" if self.last is None else f"{self.last.max_rel_halfwidth:.6g}"
        stop = "" if self.stop is None else self.stop.value
        if self.stop_detail:
            stop += f": {self.stop_detail}"
        return {
            "adaptive.method": (
                "fit_with_replicates (as MetricsService.FitCostModel), "
                f"bootstrap {self.options.bootstrap}, seed {self.plan.seed}; "
                "gap half-width = hypot(bootstrap, single-bend bound) of alpha(p)"
            ),
            "adaptive.target_rel": f"{self.target:.6g}",
            "adaptive.max_prompt_sizes": str(self.max_sizes),
            "adaptive.added": ",".join(str(p) for p in self.added),
            "adaptive.added_rel_halfwidth": ",".join(f"{r:.6g}" for r in self.added_rel),
            "adaptive.unmeasured": ",".join(str(p) for p in self.unmeasured),
            "adaptive.max_rel_halfwidth": last,
            "adaptive.fits": str(self.fits),
            "adaptive.stop": stop,
        }
