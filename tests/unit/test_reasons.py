"""Error reasons are constants, one module per area: each constant is its own name, and no
reason is defined in two areas (one used by several lives in idealrt.core.reasons)."""

from __future__ import annotations

import importlib
import re

import pytest

MODULES = [
    "idealrt.core.reasons",
    "idealrt.clients.reasons",
    "idealrt.services.metrics.reasons",
    "idealrt.services.profiler.reasons",
    "idealrt.services.serving.reasons",
    "idealrt.services.store.reasons",
]


def _constants(name: str) -> list[str]:
    """Every public name of the module (it holds nothing but reasons)."""
    mod = importlib.import_module(name)
    names = [n for n in vars(mod) if not n.startswith("_")]
    for n in names:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", n), f"{name}.{n} is not a reason constant"
    return names


@pytest.mark.parametrize("name", MODULES)
def test_each_reason_is_its_own_name(name: str) -> None:
    mod = importlib.import_module(name)
    consts = _constants(name)
    assert consts, name
    for const in consts:
        assert getattr(mod, const) == const


def test_no_reason_lives_in_two_areas() -> None:
    seen: dict[str, str] = {}
    for name in MODULES:
        for const in _constants(name):
            assert const not in seen, f"{const} in {seen.get(const)} and {name}"
            seen[const] = name
