"""FitOptions refuse what no fit can use: non-finite floats, negative seeds; a hostile
record is a ValueError (an unreadable record), never a RecursionError."""

from __future__ import annotations

import math

import pytest

from idealrt.core.costmodel.options import FitOptions
from idealrt.core.errors import InvalidArgument


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"trim": math.nan}, "options.trim"),
        ({"confidence": math.nan}, "options.confidence"),
        ({"knot_z": math.inf}, "options.knot_z"),
        ({"knot_z": math.nan}, "options.knot_z"),
        ({"knot_rel_tol": math.nan}, "options.knot_rel_tol"),
        ({"outlier_sigma": math.inf}, "options.outlier_sigma"),
        ({"outlier_sigma": math.nan}, "options.outlier_sigma"),
        ({"seed": -1}, "options.seed"),
        ({"seed": True}, "options.seed"),
    ],
)
def test_validate_refuses(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        FitOptions(**changes).validate()  # type: ignore[arg-type]
    assert (info.value.reason, info.value.field) == ("INVALID_FIT_OPTIONS", field)


def test_large_seeds_are_fine() -> None:
    FitOptions(seed=2**63 - 1).validate()


@pytest.mark.parametrize(
    "text", ["-" * 100_000 + "1", "(" * 10_000 + ")" * 10_000, "[" * 100_000, "9" * 5000]
)
def test_hostile_records_are_unreadable(text: str) -> None:
    with pytest.raises(ValueError):
        FitOptions.from_record({"seed": text})
