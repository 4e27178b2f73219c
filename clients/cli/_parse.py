"""Parsers for CLI values: int lists, durations, percentages."""

from __future__ import annotations

import argparse
import re

__all__ = ["duration_s", "int_list", "percent"]


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "ms": 1e-3}


def duration_s(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 10m or 1.5h; got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def percent(text: str) -> float:
    t = text.strip()
    try:
        value = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a percentage like 1% or 0.01; got {text!r}"
        ) from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1) or (0%, 100%); got {text!r}"
        )
    return value
