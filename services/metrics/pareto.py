"""Efficiency-capability trade-off: join accuracies with runtimes/costs, find the frontier.

A model is on the Pareto frontier when no other model is at least as cheap *and* at least
as accurate, and strictly better in one of the two (minimise cost, maximise accuracy).
Models with identical (cost, accuracy) do not dominate each other, so ties are all kept.

Accuracies arrive as CSV text `model,accuracy[,more columns...]`; a first row whose accuracy
column is not a number is a header. Costs arrive as {model: cost} (idealized runtime,
dollars, accelerator-seconds -- whatever the caller is trading off). Only models present in
both are joined; the others are reported, not silently dropped.
(The plot is the CLI's: `idealrt.clients.cli._plots.plot_pareto`.)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping

from idealrt.core.errors import InvalidArgument
from idealrt.services.metrics.reasons import ACCURACY_CSV_INVALID, COST_INVALID

__all__ = [
    "ParetoResult",
    "ParetoRow",
    "pareto_frontier",
    "parse_accuracy_csv",
]


@dataclasses.dataclass(frozen=True)
class ParetoRow:
    model: str
    cost: float
    accuracy: float
    on_frontier: bool


@dataclasses.dataclass(frozen=True)
class ParetoResult:
    """Joined rows sorted by cost (then accuracy, best first), and the unjoined models."""

    rows: tuple[ParetoRow, ...]
    missing_cost: tuple[str, ...] = ()  # have an accuracy, no cost
    missing_accuracy: tuple[str, ...] = ()  # have a cost, no accuracy

    @property
    def frontier(self) -> tuple[ParetoRow, ...]:
        return tuple(r for r in self.rows if r.on_frontier)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_accuracy_csv(text: str) -> dict[str, float]:
    """{model: accuracy} from `model,accuracy[,...]` lines (optional header, blank lines
    ignored). Errors name the line: field `accuracy_csv[line N]`."""
    try:
        return _parse_rows(text)
    except csv.Error as err:  # a field beyond csv's size limit, a stray quote, ...
        raise InvalidArgument(
            ACCURACY_CSV_INVALID, f"accuracy_csv is not readable CSV: {err}", field="accuracy_csv"
        ) from None


def _parse_rows(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        field = f"accuracy_csv[line {lineno}]"
        if len(row) < 2:
            raise InvalidArgument(
                ACCURACY_CSV_INVALID, f"line {lineno}: need model,accuracy", field=field
            )
        model, raw = row[0].strip(), row[1].strip()
        acc = _number(raw)
        if acc is None and lineno == 1:
            continue  # header
        if acc is None or not math.isfinite(acc):
            raise InvalidArgument(
                ACCURACY_CSV_INVALID,
                f"line {lineno}: accuracy must be a finite number, got {raw!r}",
                field=field,
            )
        if not model:
            raise InvalidArgument(
                ACCURACY_CSV_INVALID, f"line {lineno}: model name is empty", field=field
            )
        if model in out:
            raise InvalidArgument(
                ACCURACY_CSV_INVALID, f"line {lineno}: model {model!r} repeated", field=field
            )
        out[model] = acc
    return out


def pareto_frontier(
    accuracies: Mapping[str, float] | str, costs: Mapping[str, float]
) -> ParetoResult:
    """Join accuracies (a mapping, or CSV text) with costs and flag the frontier."""
    acc = parse_accuracy_csv(accuracies) if isinstance(accuracies, str) else dict(accuracies)
    for model, c in costs.items():
        if not (math.isfinite(c) and c >= 0.0):
            raise InvalidArgument(
                COST_INVALID,
                f"cost of {model!r} must be finite and >= 0, got {c}",
                field=f"costs[{model}]",
            )
    joined = sorted(
        ((m, float(costs[m]), float(a)) for m, a in acc.items() if m in costs),
        key=lambda r: (r[1], -r[2], r[0]),
    )
    rows = []
    best = -math.inf  # best accuracy among strictly cheaper models
    i = 0
    while i < len(joined):
        j = i
        while j < len(joined) and joined[j][1] == joined[i][1]:
            j += 1
        top = joined[i][2]  # the group is sorted best accuracy first
        for m, c, a in joined[i:j]:
            rows.append(ParetoRow(m, c, a, on_frontier=(a == top and a > best)))
        best = max(best, top)
        i = j
    return ParetoResult(
        rows=tuple(rows),
        missing_cost=tuple(sorted(m for m in acc if m not in costs)),
        missing_accuracy=tuple(sorted(m for m in costs if m not in acc)),
    )
