"""Efficiency-capability trade-off: join accuracies with runtimes/costs, find the frontier.

A model is on the Pareto frontier when no other model is at least as cheap *and* at least
as accurate, and strictly better in one of the two (minimise cost, maximise accuracy).
Models with identical (cost, accuracy) do not dominate each other, so ties are all kept.

Accuracies arrive as CSV text `model,accuracy[,more columns...]`; a first row whose accuracy
column is not a number is a header. Costs arrive as {model: cost} (idealized runtime,
dollars, accelerator-seconds -- whatever the caller is trading off). Only models present in
both are joined; the others are reported, not silently dropped.

The plot uses matplotlib's object API with the Agg canvas (no pyplot, no global backend
state) and is imported only when a plot is asked for.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping
from pathlib import Path

from idealrt.core.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "ParetoResult",
    "ParetoRow",
    "pareto_frontier",
    "parse_accuracy_csv",
    "plot_pareto",
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
    out: dict[str, float] = {}
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        field = f"accuracy_csv[line {lineno}]"
        if len(row) < 2:
            raise InvalidArgument(
                "ACCURACY_CSV_INVALID", f"line {lineno}: need model,accuracy", field=field
            )
        model, raw = row[0].strip(), row[1].strip()
        acc = _number(raw)
        if acc is None and lineno == 1:
            continue  # header
        if acc is None or not math.isfinite(acc):
            raise InvalidArgument(
                "ACCURACY_CSV_INVALID",
                f"line {lineno}: accuracy must be a finite number, got {raw!r}",
                field=field,
            )
        if not model:
            raise InvalidArgument(
                "ACCURACY_CSV_INVALID", f"line {lineno}: model name is empty", field=field
            )
        if model in out:
            raise InvalidArgument(
                "ACCURACY_CSV_INVALID", f"line {lineno}: model {model!r} repeated", field=field
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
                "COST_INVALID",
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


def plot_pareto(
    result: ParetoResult,
    path: str | Path,
    *,
    cost_label: str = "idealized runtime (s)",
    accuracy_label: str = "accuracy",
    title: str = "",
    log_cost: bool = False,
) -> Path:
    """Scatter every model, draw the frontier as a step line, write a PNG; returns the path.
    FailedPrecondition (PLOT_EXTRA_MISSING) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FailedPrecondition(
            "PLOT_EXTRA_MISSING",
            "plotting needs matplotlib: pip install idealrt[plot]",
            field="plot",
        ) from None
    if not result.rows:
        raise FailedPrecondition(
            "NOTHING_TO_PLOT", "no model has both an accuracy and a cost", field="accuracy_csv"
        )
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    off = [r for r in result.rows if not r.on_frontier]
    on = list(result.frontier)
    ax.scatter([r.cost for r in off], [r.accuracy for r in off], color="0.6", label="dominated")
    ax.scatter([r.cost for r in on], [r.accuracy for r in on], color="C0", label="frontier")
    ax.step([r.cost for r in on], [r.accuracy for r in on], where="post", color="C0")
    for r in result.rows:
        ax.annotate(
            r.model, (r.cost, r.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    if log_cost:
        ax.set_xscale("log")
    ax.set_xlabel(cost_label)
    ax.set_ylabel(accuracy_label)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(True, alpha=0.3)
    out = Path(path)
    fig.savefig(out, format="png")
    return out
