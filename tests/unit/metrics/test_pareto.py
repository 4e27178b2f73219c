"""Pareto frontier of a hand example, CSV parsing, and the PNG plot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from idealrt.clients.cli._plots import plot_pareto
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.metrics import pareto as pareto_mod
from idealrt.services.metrics.pareto import pareto_frontier, parse_accuracy_csv

CSV = """model,accuracy,notes
tiny,0.30,fast
small,0.45,
medium,0.44,dominated by small
large,0.60,
twin-a,0.70,same point as twin-b
twin-b,0.70,
huge,0.70,equally accurate but dearer than the twins
cheap-bad,0.20,
no-cost,0.99,
"""
COSTS = {
    "tiny": 1.0,
    "small": 2.0,
    "medium": 3.0,
    "large": 5.0,
    "twin-a": 8.0,
    "twin-b": 8.0,
    "huge": 20.0,
    "cheap-bad": 1.0,  # same cost as tiny, less accurate
    "no-accuracy": 0.5,
}


def test_all_is_what_it_claims() -> None:
    for name in pareto_mod.__all__:
        assert hasattr(pareto_mod, name)


def test_hand_example_frontier() -> None:
    res = pareto_frontier(CSV, COSTS)
    got = {r.model: r.on_frontier for r in res.rows}
    assert got == {
        "tiny": True,
        "cheap-bad": False,
        "small": True,
        "medium": False,
        "large": True,
        "twin-a": True,
        "twin-b": True,
        "huge": False,
    }
    assert [r.model for r in res.rows] == [
        "tiny",
        "cheap-bad",
        "small",
        "medium",
        "large",
        "twin-a",
        "twin-b",
        "huge",
    ]
    assert [r.model for r in res.frontier] == ["tiny", "small", "large", "twin-a", "twin-b"]
    assert res.missing_cost == ("no-cost",)
    assert res.missing_accuracy == ("no-accuracy",)


def test_frontier_matches_brute_force() -> None:
    import random

    rng = random.Random(5)
    for _ in range(50):
        acc = {f"m{i}": rng.choice([0.1, 0.2, 0.3, 0.4]) for i in range(12)}
        costs = {f"m{i}": float(rng.randint(1, 6)) for i in range(12)}
        res = pareto_frontier(acc, costs)
        for r in res.rows:
            dominated = any(
                costs[m] <= r.cost
                and acc[m] >= r.accuracy
                and (costs[m] < r.cost or acc[m] > r.accuracy)
                for m in acc
            )
            assert r.on_frontier is not dominated


def test_csv_parsing() -> None:
    assert parse_accuracy_csv("a,0.5\n\nb,1\n") == {"a": 0.5, "b": 1.0}
    assert parse_accuracy_csv("name,score\na,0.5\n") == {"a": 0.5}
    for text, line in [
        ("a,0.5\nb,high\n", 2),
        ("a\n", 1),
        ("a,0.1\na,0.2\n", 2),
        (",0.3\n", 1),
        ("a,nan\n", 1),
    ]:
        with pytest.raises(InvalidArgument) as ei:
            parse_accuracy_csv(text)
        assert ei.value.reason == "ACCURACY_CSV_INVALID"
        assert ei.value.field == f"accuracy_csv[line {line}]"
    with pytest.raises(InvalidArgument) as ei:
        pareto_frontier({"a": 0.5}, {"a": -1.0})
    assert ei.value.reason == "COST_INVALID"


def test_plot_writes_png(tmp_path: Path) -> None:
    out = plot_pareto(
        pareto_frontier(CSV, COSTS), tmp_path / "pareto.png", title="t", log_cost=True
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(FailedPrecondition) as ei:
        plot_pareto(pareto_frontier(CSV, COSTS), tmp_path / "x.png")
    assert ei.value.reason == "PLOT_EXTRA_MISSING"
    assert "pip install idealrt[plot]" in ei.value.message
    assert not (tmp_path / "x.png").exists()


def test_plot_with_nothing_joined() -> None:
    with pytest.raises(FailedPrecondition) as ei:
        plot_pareto(pareto_frontier({"a": 0.5}, {"b": 1.0}), "unused.png")
    assert ei.value.reason == "NOTHING_TO_PLOT"
