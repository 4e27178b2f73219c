"""Plan presets (core/plans.py)."""

from __future__ import annotations

import pytest

from idealrt.core.errors import InvalidArgument
from idealrt.core.plans import economical_plan, economical_prompt_sizes
from idealrt.services.profiler.plan import total_samples, validate_plan


def test_economical_sizes_for_gpt2_range() -> None:
    assert economical_prompt_sizes(960) == (1, 16, 128, 384, 672, 960)


@pytest.mark.parametrize("top", [1, 2, 15, 16, 17, 100, 4096])
def test_economical_sizes_are_sorted_unique_and_span_the_range(top: int) -> None:
    sizes = economical_prompt_sizes(top)
    assert sizes[0] == 1 and sizes[-1] == top
    assert list(sizes) == sorted(set(sizes)) and len(sizes) <= 6


def test_economical_plan_is_one_repeat_without_warmups() -> None:
    plan = economical_plan(960, 64, seed=3)
    validate_plan(plan)
    assert plan.output_tokens == (1, 64)
    assert (plan.repeats, plan.warmups, plan.seed) == (1, 0, 3)
    assert total_samples(plan) == 12
    assert economical_plan(100, 1).output_tokens == (1,)


@pytest.mark.parametrize(
    ("p", "o", "field"), [(0, 8, "plan.prompt_tokens"), (8, 0, "plan.output_tokens")]
)
def test_bad_ranges_name_the_field(p: int, o: int, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        economical_plan(p, o)
    assert err.value.field == field
