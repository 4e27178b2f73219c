"""Plan validation, expansion, order: pure functions, no target needed."""

from __future__ import annotations

import dataclasses

import pytest

from idealrt.core.domain import ProfilePlan
from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler import plan as P

BASE = ProfilePlan(prompt_tokens=(8, 64), output_tokens=(1, 16), repeats=3, warmups=1)
SPEC = ModelSpec(name="t", layers=1, d_model=8, heads=1, d_ff=16, vocab=10, max_positions=128)


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"prompt_tokens": ()}, "plan.prompt_tokens", "PLAN_GRID_EMPTY"),
        ({"output_tokens": ()}, "plan.output_tokens", "PLAN_GRID_EMPTY"),
        ({"prompt_tokens": (8, 0)}, "plan.prompt_tokens", "PLAN_SIZE_OUT_OF_RANGE"),
        ({"output_tokens": (-1,)}, "plan.output_tokens", "PLAN_SIZE_OUT_OF_RANGE"),
        ({"output_tokens": (True,)}, "plan.output_tokens", "PLAN_SIZE_OUT_OF_RANGE"),
        ({"holdout_prompt_tokens": (0,)}, "plan.holdout_prompt_tokens", "PLAN_SIZE_OUT_OF_RANGE"),
        ({"holdout_output_tokens": (0,)}, "plan.holdout_output_tokens", "PLAN_SIZE_OUT_OF_RANGE"),
        ({"repeats": 0}, "plan.repeats", "PLAN_REPEATS_OUT_OF_RANGE"),
        ({"repeats": 1001}, "plan.repeats", "PLAN_REPEATS_OUT_OF_RANGE"),
        ({"warmups": -1}, "plan.warmups", "PLAN_WARMUPS_OUT_OF_RANGE"),
        ({"warmups": 101}, "plan.warmups", "PLAN_WARMUPS_OUT_OF_RANGE"),
        ({"batch_size": 0}, "plan.batch_size", "PLAN_BATCH_OUT_OF_RANGE"),
        ({"until_ci_rel": 1.0}, "plan.until_ci_rel", "PLAN_CI_OUT_OF_RANGE"),
        ({"until_ci_rel": -0.1}, "plan.until_ci_rel", "PLAN_CI_OUT_OF_RANGE"),
        ({"max_repeats": 2}, "plan.max_repeats", "PLAN_MAX_REPEATS_OUT_OF_RANGE"),
        ({"budget_s": -1.0}, "plan.budget_s", "PLAN_BUDGET_OUT_OF_RANGE"),
    ],
)
def test_invalid_plans_name_field_and_reason(changes: dict, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(BASE, **changes))
    assert info.value.field == field
    assert info.value.reason == reason


def test_range_errors_state_the_allowed_range() -> None:
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(BASE, repeats=0))
    assert "[1, 1000]" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(BASE, warmups=101))
    assert "[0, 100]" in info.value.message


def test_context_limit_needs_the_spec() -> None:
    too_long = dataclasses.replace(BASE, prompt_tokens=(8, 120), output_tokens=(1, 16))
    P.validate_plan(too_long)  # unknown spec: cannot judge yet
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(too_long, SPEC)
    assert (info.value.reason, info.value.field) == ("PLAN_EXCEEDS_CONTEXT", "plan.prompt_tokens")
    P.validate_plan(dataclasses.replace(BASE, prompt_tokens=(112,)), SPEC)  # 112+16 == 128


def test_context_limit_of_the_heldout_grid_names_its_field() -> None:
    plan = dataclasses.replace(BASE, holdout_prompt_tokens=(200,))
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(plan, SPEC)
    assert info.value.field == "plan.holdout_prompt_tokens"


def test_valid_plan_passes() -> None:
    P.validate_plan(BASE, SPEC)
    P.validate_plan(dataclasses.replace(BASE, until_ci_rel=0.02, max_repeats=3, budget_s=5))


def test_configurations_dedup_and_heldout_defaults() -> None:
    plan = dataclasses.replace(BASE, prompt_tokens=(64, 8, 8), holdout_prompt_tokens=(8, 16, 32))
    configs = P.configurations(plan)
    fit = [c for c in configs if not c.heldout]
    held = [c for c in configs if c.heldout]
    assert [(c.prompt_tokens, c.output_tokens) for c in fit] == [(8, 1), (8, 16), (64, 1), (64, 16)]
    # the held-out output axis defaults to the fit one; (8, *) is in the fit grid: fit-only
    assert [(c.prompt_tokens, c.output_tokens) for c in held] == [
        (16, 1),
        (16, 16),
        (32, 1),
        (32, 16),
    ]
    assert len(set(configs)) == len(configs)


def test_no_heldout_grid_when_both_axes_empty() -> None:
    assert all(not c.heldout for c in P.configurations(BASE))
    assert len(P.configurations(BASE)) == 4


def test_heldout_fully_inside_fit_grid_is_dropped() -> None:
    plan = dataclasses.replace(BASE, holdout_prompt_tokens=(8,), holdout_output_tokens=(16,))
    assert all(not c.heldout for c in P.configurations(plan))


def test_total_samples() -> None:
    assert P.total_samples(BASE) == 4 * 3
    ci = dataclasses.replace(BASE, until_ci_rel=0.05)
    assert P.total_samples(ci) == 4 * 30  # default cap: 10 x repeats
    assert P.total_samples(dataclasses.replace(ci, max_repeats=7)) == 4 * 7


def test_round_order_is_deterministic_and_reshuffled_per_round() -> None:
    plan = dataclasses.replace(
        BASE, prompt_tokens=(1, 2, 3, 4, 5, 6), output_tokens=(1, 2, 3), seed=11
    )
    configs = P.configurations(plan)
    rounds = [P.round_order(configs, plan, r) for r in range(5)]
    assert rounds == [P.round_order(configs, plan, r) for r in range(5)]
    for order in rounds:
        assert sorted(order) == sorted(configs)  # each round is a permutation
    assert len({tuple(o) for o in rounds}) > 1  # rounds differ
    other_seed = dataclasses.replace(plan, seed=12)
    assert [P.round_order(configs, other_seed, r) for r in range(5)] != rounds


def test_round_order_without_randomize_is_grid_order() -> None:
    plan = dataclasses.replace(BASE, randomize=False)
    configs = P.configurations(plan)
    assert P.round_order(configs, plan, 3) == configs


def test_round_order_filtered_keeps_relative_order() -> None:
    plan = dataclasses.replace(BASE, prompt_tokens=(1, 2, 3, 4, 5), seed=3)
    configs = P.configurations(plan)
    full = P.round_order(configs, plan, 2)
    some = set(full[1::2])
    assert P.round_order(configs, plan, 2, some) == [c for c in full if c in some]


def test_warmup_order() -> None:
    plan = dataclasses.replace(BASE, warmups=2)
    configs = P.configurations(plan)
    order = P.warmup_order(configs, plan)
    assert len(order) == 2 * len(configs)
    assert sorted(c for c, w in order if w == 0) == sorted(configs)
    assert P.warmup_order(configs, dataclasses.replace(BASE, warmups=0)) == []


def test_sample_seeds_are_stable_and_distinct() -> None:
    c = P.Config(8, 4)
    a = P.sample_seed(BASE, c, 0)
    assert a == P.sample_seed(BASE, c, 0)
    assert len({a, P.sample_seed(BASE, c, 1), P.sample_seed(BASE, c, 0, 1)}) == 3


def test_known_spec_before_loading() -> None:
    from idealrt.core.domain import ModelRef, TargetKind

    assert P.known_spec(ModelRef(spec=SPEC)) is SPEC
    assert P.known_spec(ModelRef(name="tiny-gpt2")).max_positions == 256
    assert P.known_spec(ModelRef(name="gpt-4o"), TargetKind.HTTP) is None  # an API's name
    assert P.known_spec(ModelRef(name="x", weights_path="/some/dir")) is None
    with pytest.raises(InvalidArgument) as info:
        P.known_spec(ModelRef(name="no-such-model"))
    assert (info.value.reason, info.value.field) == ("UNKNOWN_MODEL", "model.name")
