"""The CLI's plots. matplotlib's object API with the Agg canvas (no pyplot, no global
backend state), imported only when a plot is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from idealrt.clients.reasons import NOTHING_TO_PLOT, PLOT_EXTRA_MISSING
from idealrt.core.errors import FailedPrecondition

__all__ = ["plot_pareto"]


class _ParetoRow(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def cost(self) -> float: ...
    @property
    def accuracy(self) -> float: ...
    @property
    def on_frontier(self) -> bool: ...


class _Pareto(Protocol):
    @property
    def rows(self) -> Sequence[_ParetoRow]: ...


def plot_pareto(
    result: _Pareto,
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
            PLOT_EXTRA_MISSING,
            "plotting needs matplotlib: pip install idealrt[plot]",
            field="plot",
        ) from None
    if not result.rows:
        raise FailedPrecondition(
            NOTHING_TO_PLOT, "no model has both an accuracy and a cost", field="accuracy_csv"
        )
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    off = [r for r in result.rows if not r.on_frontier]
    on = [r for r in result.rows if r.on_frontier]
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
