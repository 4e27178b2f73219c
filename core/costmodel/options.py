"""How to fit a cost model (`FitOptions`): validated on request, recorded with the model it
produced (`CostModel.fit_options`), read back to re-derive that model's bootstrap
replicates exactly."""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
from collections.abc import Callable, Mapping

from idealrt.core.errors import InvalidArgument
from idealrt.core.reasons import INVALID_FIT_OPTIONS

__all__ = ["CENTRES", "DEFAULT_BOOTSTRAP", "DEFAULT_CONFIDENCE", "KNOT_RULES", "FitOptions"]

CENTRES = ("median", "trimmed")
# "select": the fewest knots the data allow (fit.py); "medians": every profiled size is a
# knot, straight lines through the (isotonic) measured centres -- the baseline a selected
# fit must not lose to on held-out points, and what a fit falls back to when it would
KNOT_RULES = ("select", "medians")
# bootstrap replicates behind every interval (fits, comparisons, adaptive planning), and
# the level of those intervals
DEFAULT_BOOTSTRAP = 200
DEFAULT_CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How to fit. robust_centre: "median" or "trimmed" (mean after cutting `trim` of the
    values at each end) for every per-point centre. fit_overhead: separate a constant
    per-request overhead (APIs; see the module doc). bootstrap: replicate count for the
    confidence intervals (0 disables). beta_linear: fit beta1 (False: beta1 = 0, the paper).
    max_knots: cap on alpha's knots (>= 2). seed: bootstrap resampling. confidence: level of
    the intervals. kfold: folds of the cross-validation used when nothing was held out (0 or
    1 disables). knot_z / knot_rel_tol: a point is "within the noise" of the alpha polyline
    when off by at most max(knot_z standard errors, knot_rel_tol * its value).
    knot_z = 2.5 can merge a size whose bend held-out points then miss by 5-20% (issue 15),
    so a merge survives only when the fit guard of fit.py finds it as good as straight
    lines through the medians on held-out or k-fold points. (A tighter default, sqrt(2): a
    merged curve off by d at a size predicts a fresh measurement there with expected
    squared error E[d^2], its own centre with 2 se^2, was weighed and left for later: the
    profiler's adaptive planner places sizes by these knots.)
    outlier_sigma: before each centre, values further than this many robust sigmas (MAD)
    from their group's median are dropped (0 keeps everything). knots: "select" (fewest
    knots within the noise, then the medians guard of fit.py) or "medians" (every size a
    knot; max_knots does not apply)."""

    robust_centre: str = "median"
    trim: float = 0.1
    fit_overhead: bool = False
    bootstrap: int = DEFAULT_BOOTSTRAP
    beta_linear: bool = True
    max_knots: int = 12
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE
    kfold: int = 5
    knot_z: float = 2.5
    knot_rel_tol: float = 0.002
    outlier_sigma: float = 3.5
    knots: str = "select"

    def validate(self) -> None:
        """Raise InvalidArgument (reason INVALID_FIT_OPTIONS, field options.<name>)."""

        def bad(name: str, what: str) -> InvalidArgument:
            value = getattr(self, name)
            return InvalidArgument(
                INVALID_FIT_OPTIONS,
                f"{name} must be {what}, got {value!r}",
                field=f"options.{name}",
            )

        if self.robust_centre not in CENTRES:
            raise bad("robust_centre", "one of " + ", ".join(CENTRES))
        if not 0.0 <= self.trim < 0.5:
            raise bad("trim", "in [0, 0.5)")
        if self.bootstrap < 0:
            raise bad("bootstrap", ">= 0 (0 disables)")
        if self.max_knots < 2:
            raise bad("max_knots", ">= 2")
        if not 0.0 < self.confidence < 1.0:
            raise bad("confidence", "in (0, 1)")
        if self.kfold < 0:
            raise bad("kfold", ">= 0 (0 or 1 disables)")
        if not 0.0 < self.knot_z < math.inf:
            raise bad("knot_z", "a finite number > 0")
        if not 0.0 <= self.knot_rel_tol < 1.0:
            raise bad("knot_rel_tol", "in [0, 1)")
        if self.knots not in KNOT_RULES:
            raise bad("knots", "one of " + ", ".join(KNOT_RULES))
        if not 0.0 <= self.outlier_sigma < math.inf:
            raise bad("outlier_sigma", "a finite number >= 0 (0 disables)")
        try:
            seed = -1 if isinstance(self.seed, bool) else operator.index(self.seed)
        except TypeError:
            seed = -1
        if seed < 0:  # numpy's generators take no negative seed
            raise bad("seed", "an integer >= 0")

    def to_record(self) -> dict[str, str]:
        """Every option as text (`CostModel.fit_options`): floats in repr, exact on reload."""
        return {f.name: repr(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> FitOptions:
        """The options `to_record` wrote; names it does not know are ignored (a record from
        a newer idealrt), names it lacks keep their defaults. ValueError on a malformed
        value."""
        parse: dict[str, Callable[[str], object]] = {
            "str": lambda v: str(ast.literal_eval(v)),
            "float": lambda v: float(ast.literal_eval(v)),
            "int": lambda v: int(ast.literal_eval(v)),
            "bool": lambda v: bool(ast.literal_eval(v)),
        }
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if f.name in record:
                try:
                    values[f.name] = parse[str(f.type)](record[f.name])
                # literal_eval of hostile text: deep nesting recurses, huge literals fill memory
                except (SyntaxError, TypeError, ValueError, RecursionError, MemoryError) as e:
                    raise ValueError(f"fit option {f.name}={record[f.name]!r}: {e}") from e
        return cls(**values)  # type: ignore[arg-type]
