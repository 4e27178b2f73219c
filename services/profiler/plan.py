"""A profile plan: validation, expansion into configurations, and the order of measurement.

Configurations. The fit grid is `prompt_tokens x output_tokens`. The held-out grid is
`holdout_prompt_tokens x holdout_output_tokens`, where an empty axis defaults to the fit
grid's values on that same axis; when both held-out axes are empty there is no held-out grid.
A (p, o) point in both grids is measured once, as a *fit* configuration (never held out:
a point the fit has seen cannot measure held-out error).

Warm-ups. `plan.warmups` generations per configuration run before the measured rounds (and
again when a run is resumed: the process that serves the model may be cold). They are
*stored*, flagged `SampleFlag.WARMUP`, so the cost of a cold start stays visible; every
consumer of samples keeps only `SampleFlag.OK` samples for fitting (the same rule that drops
CONTENDED and NONCONFORMING samples).

Order. Measurement proceeds in rounds: round r measures repeat r of every configuration that
still needs one. With `plan.randomize` each round is an independent shuffle seeded by
(plan.seed, r), so slow drift (thermal, frequency, a neighbour) hits all configurations
alike instead of biasing the ones measured last. The shuffle permutes the *full*
configuration list and is then filtered, so a resumed run (or a round in which some
configurations have converged) keeps the relative order of an uninterrupted run.

Adaptive planning (`plan.adaptive_target_rel > 0`, see adaptive.py) adds prompt sizes to the
fit grid while the run proceeds: each added size p contributes the fit configurations
(p, o) for every o of `plan.output_tokens`, appended after the plan's own configurations in
the order the sizes were added. The plan itself is never changed; `configurations(plan,
added)` and `total_samples(plan, len(added))` take the added sizes as an argument.

Economical plan: `idealrt.core.plans.economical_plan` (the CLI's `profile --economical`).

Spread (`plan.spread_s > 0`, see schedule.py): round r of the plan's grid starts at its offset
of a stratified schedule over `spread_s` seconds; `spread_s` is bounded by `MAX_SPREAD_S`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence

from idealrt.core import catalog
from idealrt.core.domain import LeasePolicy, ModelRef, ProfilePlan, Target, TargetKind
from idealrt.core.errors import invalid
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler.outbound import parse_base_url
from idealrt.services.profiler.reasons import (
    PLAN_ADAPTIVE_GRID_TOO_SMALL,
    PLAN_ADAPTIVE_MAX_SIZES_OUT_OF_RANGE,
    PLAN_ADAPTIVE_TARGET_OUT_OF_RANGE,
    PLAN_AXIS_TOO_LONG,
    PLAN_BATCH_OUT_OF_RANGE,
    PLAN_BUDGET_OUT_OF_RANGE,
    PLAN_CI_OUT_OF_RANGE,
    PLAN_EXCEEDS_CONTEXT,
    PLAN_GRID_EMPTY,
    PLAN_MAX_REPEATS_OUT_OF_RANGE,
    PLAN_REPEATS_OUT_OF_RANGE,
    PLAN_SEED_OUT_OF_RANGE,
    PLAN_SIZE_OUT_OF_RANGE,
    PLAN_SPREAD_EXCEEDS_BUDGET,
    PLAN_SPREAD_OUT_OF_RANGE,
    PLAN_TOO_LARGE,
    PLAN_VALUE_INVALID,
    PLAN_WARMUPS_OUT_OF_RANGE,
    TARGET_FIELD_TOO_LONG,
    TARGET_OPTIONS_TOO_MANY,
)

__all__ = [
    "DEFAULT_ADAPTIVE_MAX_PROMPT_SIZES",
    "MAX_ADAPTIVE_PROMPT_SIZES",
    "MAX_ADAPTIVE_TARGET_REL",
    "MAX_AXIS_SIZES",
    "MAX_BUDGET_S",
    "MAX_REPEATS",
    "MAX_SPREAD_S",
    "MAX_TARGET_OPTIONS",
    "MAX_TARGET_STRING",
    "MAX_TOKENS",
    "MAX_WARMUPS",
    "Config",
    "configurations",
    "effective_max_prompt_sizes",
    "effective_max_repeats",
    "known_spec",
    "planned_samples",
    "round_order",
    "sample_seed",
    "total_samples",
    "validate_plan",
    "validate_target",
    "warmup_order",
]

MAX_REPEATS = 1000
MAX_WARMUPS = 100
MAX_BATCH = 4096
MAX_ADAPTIVE_TARGET_REL = 0.5  # exclusive: a 50% half-width is no accuracy target
MAX_ADAPTIVE_PROMPT_SIZES = 64
DEFAULT_ADAPTIVE_MAX_PROMPT_SIZES = 8  # plan.adaptive_max_prompt_sizes == 0
MAX_SPREAD_S = 7 * 24 * 3600.0
MAX_BUDGET_S = 30 * 24 * 3600.0
MAX_AXIS_SIZES = 1024  # entries of one token axis (prompt_tokens, output_tokens, held-out)
MAX_TOKENS = 1 << 20  # one token count (serving's own default limit of a prompt)
MAX_TARGET_STRING = 4096  # characters of one target field (an address, URL, path, name)
MAX_TARGET_OPTIONS = 64  # entries of target.options (keys and values are target strings)
_INT64 = (-(2**63), 2**63 - 1)  # plan.seed travels as int64


@dataclasses.dataclass(frozen=True, order=True)
class Config:
    """One measured point: p prompt tokens, o output tokens, fit or held-out."""

    prompt_tokens: int
    output_tokens: int
    heldout: bool = False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sizes(
    values: Sequence[int], field: str, *, required: bool, max_tokens: int = MAX_TOKENS
) -> None:
    if not isinstance(values, (tuple, list)):
        raise invalid(field, PLAN_VALUE_INVALID, f"{field} must be a list of token counts")
    if required and not values:
        raise invalid(field, PLAN_GRID_EMPTY, f"{field} must list at least one size (each >= 1)")
    if len(values) > MAX_AXIS_SIZES:
        raise invalid(
            field,
            PLAN_AXIS_TOO_LONG,
            f"{field} lists {len(values)} sizes; at most {MAX_AXIS_SIZES} are allowed",
        )
    for i, v in enumerate(values):
        if not _is_int(v) or not 1 <= v <= max_tokens:
            raise invalid(
                field,
                PLAN_SIZE_OUT_OF_RANGE,
                f"{field}[{i}] = {v!r}: every token count must be an integer in [1, {max_tokens}]"
                + ("" if max_tokens == MAX_TOKENS else " (IDEALRT_MAX_PLAN_TOKENS)"),
            )


def _check_range(value: float, field: str, low: float, high: float, reason: str) -> None:
    """An integer field in [low, high] (NaN, floats and bools are out of range too)."""
    if not _is_int(value) or not (low <= value <= high):
        raise invalid(
            field, reason, f"{field} = {value!r} is outside the allowed range [{low}, {high}]"
        )


def planned_samples(plan: ProfilePlan) -> int:
    """Every generation the plan may ask for: warm-ups of the grid, plus every measured
    configuration (fit, held-out, and the adaptive additions at their cap) at its largest
    number of repeats (`effective_max_repeats`: max repeats under until_ci_rel). Contention
    re-measurements are not counted. Counted without expanding the grid, so that it is
    cheap for any plan whose axes passed `_check_sizes`."""
    p, o = set(plan.prompt_tokens), set(plan.output_tokens)
    grid = len(p) * len(o)
    if plan.holdout_prompt_tokens or plan.holdout_output_tokens:
        hp = set(plan.holdout_prompt_tokens) or p
        ho = set(plan.holdout_output_tokens) or o
        grid += len(hp) * len(ho) - len(hp & p) * len(ho & o)  # points in the fit grid
    added = effective_max_prompt_sizes(plan) * len(o)
    return plan.warmups * grid + (grid + added) * effective_max_repeats(plan)


def validate_plan(
    plan: ProfilePlan,
    spec: ModelSpec | None = None,
    *,
    max_samples: int | None = None,
    max_tokens: int = MAX_TOKENS,
) -> None:
    """Raise InvalidArgument (with `field` = "plan.<name>") unless the plan can be run:
    every field's type and range (finite numbers only), the axes' lengths, and with
    `max_samples` (ProfilerConfig.max_plan_samples) the number of samples it may ask for
    (`planned_samples`, field "plan"); every token count at most `max_tokens`
    (ProfilerConfig.max_plan_tokens: the largest prompt or output length a plan may ask
    for, at most MAX_TOKENS).

    With a resolved spec, every p + o of both grids must fit in `spec.max_positions`.
    """
    top = min(max_tokens, MAX_TOKENS)
    _check_sizes(plan.prompt_tokens, "plan.prompt_tokens", required=True, max_tokens=top)
    _check_sizes(plan.output_tokens, "plan.output_tokens", required=True, max_tokens=top)
    for axis in ("holdout_prompt_tokens", "holdout_output_tokens"):
        _check_sizes(getattr(plan, axis), f"plan.{axis}", required=False, max_tokens=top)
    _check_range(plan.repeats, "plan.repeats", 1, MAX_REPEATS, PLAN_REPEATS_OUT_OF_RANGE)
    _check_range(plan.warmups, "plan.warmups", 0, MAX_WARMUPS, PLAN_WARMUPS_OUT_OF_RANGE)
    _check_range(plan.batch_size, "plan.batch_size", 1, MAX_BATCH, PLAN_BATCH_OUT_OF_RANGE)
    _check_range(plan.seed, "plan.seed", *_INT64, PLAN_SEED_OUT_OF_RANGE)
    if not isinstance(plan.randomize, bool):
        raise invalid(
            "plan.randomize", PLAN_VALUE_INVALID, f"plan.randomize = {plan.randomize!r}: a bool"
        )
    if not isinstance(plan.lease, LeasePolicy):
        raise invalid(
            "plan.lease",
            PLAN_VALUE_INVALID,
            f"plan.lease = {plan.lease!r}: one of {', '.join(p.value for p in LeasePolicy)}",
        )
    if not _is_number(plan.until_ci_rel) or not (0.0 <= plan.until_ci_rel < 1.0):
        raise invalid(
            "plan.until_ci_rel",
            PLAN_CI_OUT_OF_RANGE,
            f"plan.until_ci_rel = {plan.until_ci_rel!r} must be in [0, 1) "
            "(0 disables; 0.01 means a CI half-width of 1% of the mean)",
        )
    if plan.max_repeats != 0:
        _check_range(
            plan.max_repeats,
            "plan.max_repeats",
            plan.repeats,
            MAX_REPEATS,
            PLAN_MAX_REPEATS_OUT_OF_RANGE,
        )
    if not _is_number(plan.budget_s) or not (0.0 <= plan.budget_s <= MAX_BUDGET_S):
        raise invalid(  # NaN and infinity fail the comparison
            "plan.budget_s",
            PLAN_BUDGET_OUT_OF_RANGE,
            f"plan.budget_s = {plan.budget_s!r} must be in [0, {MAX_BUDGET_S:g}] seconds "
            "(0 means unlimited; at most 30 days)",
        )
    _validate_adaptive_and_spread(plan)
    if max_samples is not None:
        planned = planned_samples(plan)
        if planned > max_samples:
            raise invalid(
                "plan",
                PLAN_TOO_LARGE,
                f"the plan asks for up to {planned} samples (warm-ups, every configuration "
                "at its largest number of repeats, adaptive sizes at their cap), more than "
                f"the limit of {max_samples} (ProfilerConfig.max_plan_samples, "
                "IDEALRT_MAX_PLAN_SAMPLES): use fewer sizes, repeats or max_repeats",
            )
    if spec is not None and spec.max_positions > 0:
        worst = max(configurations(plan), key=lambda c: c.prompt_tokens + c.output_tokens)
        if worst.prompt_tokens + worst.output_tokens > spec.max_positions:
            field = "plan.holdout_prompt_tokens" if worst.heldout else "plan.prompt_tokens"
            raise invalid(
                field,
                PLAN_EXCEEDS_CONTEXT,
                f"p + o = {worst.prompt_tokens} + {worst.output_tokens} exceeds the model's "
                f"max_positions {spec.max_positions} ({spec.name}); every prompt + output "
                f"must be in [2, {spec.max_positions}]",
            )


def _validate_adaptive_and_spread(plan: ProfilePlan) -> None:
    target = plan.adaptive_target_rel
    if not _is_number(target) or not (0.0 <= target < MAX_ADAPTIVE_TARGET_REL):  # also NaN
        raise invalid(
            "plan.adaptive_target_rel",
            PLAN_ADAPTIVE_TARGET_OUT_OF_RANGE,
            f"plan.adaptive_target_rel = {target!r} must be in [0, {MAX_ADAPTIVE_TARGET_REL}) "
            "(0 disables adaptive planning; 0.02 asks for a 95% CI half-width of alpha(p) "
            "within 2% everywhere between the profiled prompt sizes)",
        )
    _check_range(
        plan.adaptive_max_prompt_sizes,
        "plan.adaptive_max_prompt_sizes",
        0,
        MAX_ADAPTIVE_PROMPT_SIZES,
        PLAN_ADAPTIVE_MAX_SIZES_OUT_OF_RANGE,
    )
    if target > 0 and len(set(plan.prompt_tokens)) < 2:
        raise invalid(
            "plan.prompt_tokens",
            PLAN_ADAPTIVE_GRID_TOO_SMALL,
            "adaptive planning adds prompt sizes between profiled ones: plan.prompt_tokens "
            "must list at least two different sizes when plan.adaptive_target_rel > 0",
        )
    spread = plan.spread_s
    if not _is_number(spread) or not (0.0 <= spread <= MAX_SPREAD_S):  # also rejects NaN
        raise invalid(
            "plan.spread_s",
            PLAN_SPREAD_OUT_OF_RANGE,
            f"plan.spread_s = {spread!r} is outside the allowed range [0, {MAX_SPREAD_S:g}] "
            "seconds (0 measures rounds back to back; at most 7 days)",
        )
    if spread > 0 and plan.budget_s > 0 and spread >= plan.budget_s:
        raise invalid(
            "plan.spread_s",
            PLAN_SPREAD_EXCEEDS_BUDGET,
            f"plan.spread_s = {spread!r} must be below plan.budget_s = {plan.budget_s!r}: "
            "the budget would end the run before its last rounds are due",
        )


def validate_target(target: Target) -> None:
    """Raise InvalidArgument (field "target.<name>") for a target field that is not a
    string of at most MAX_TARGET_STRING characters, or options beyond MAX_TARGET_OPTIONS
    entries. What the strings mean is checked by the target that uses them (an HTTP
    target's base URL, tokenizer, options)."""
    for name in ("address", "base_url", "api_model", "credential", "tokenizer"):
        _check_string(getattr(target, name), f"target.{name}")
    if target.base_url:
        parse_base_url(target.base_url)  # never stored with user:password@ in it
    if len(target.options) > MAX_TARGET_OPTIONS:
        raise invalid(
            "target.options",
            TARGET_OPTIONS_TOO_MANY,
            f"target.options has {len(target.options)} entries; at most {MAX_TARGET_OPTIONS} "
            "are allowed",
        )
    for key, value in target.options.items():
        _check_string(key, "target.options")
        _check_string(value, f"target.options[{key!r}]")


def _check_string(value: object, field: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_TARGET_STRING:
        size = f"{len(value)} characters" if isinstance(value, str) else repr(type(value))
        raise invalid(
            field,
            TARGET_FIELD_TOO_LONG,
            f"{field} ({size}) must be a string of at most {MAX_TARGET_STRING} characters",
        )


def _dedup_sorted(values: Iterable[int]) -> list[int]:
    return sorted(set(values))


def configurations(plan: ProfilePlan, added_prompt_tokens: Sequence[int] = ()) -> list[Config]:
    """Fit configurations then held-out ones, each sorted by (p, o); then the fit
    configurations of `added_prompt_tokens` (adaptively added sizes, in the order added;
    sizes already in plan.prompt_tokens and repeats are skipped); no duplicates."""
    fit = [
        Config(p, o)
        for p in _dedup_sorted(plan.prompt_tokens)
        for o in _dedup_sorted(plan.output_tokens)
    ]
    held: list[Config] = []
    if plan.holdout_prompt_tokens or plan.holdout_output_tokens:
        hp = _dedup_sorted(plan.holdout_prompt_tokens or plan.prompt_tokens)
        ho = _dedup_sorted(plan.holdout_output_tokens or plan.output_tokens)
        in_fit = {(c.prompt_tokens, c.output_tokens) for c in fit}
        held = [Config(p, o, True) for p in hp for o in ho if (p, o) not in in_fit]
    grid = set(plan.prompt_tokens)
    extra = [
        Config(p, o)
        for p in dict.fromkeys(added_prompt_tokens)
        if p not in grid
        for o in _dedup_sorted(plan.output_tokens)
    ]
    return fit + held + extra


def effective_max_prompt_sizes(plan: ProfilePlan) -> int:
    """How many prompt sizes adaptive planning may add (0 when it is off)."""
    if plan.adaptive_target_rel <= 0:
        return 0
    return plan.adaptive_max_prompt_sizes or DEFAULT_ADAPTIVE_MAX_PROMPT_SIZES


def effective_max_repeats(plan: ProfilePlan) -> int:
    """Repeats per configuration at most: `repeats` unless a CI target asks for more."""
    if plan.until_ci_rel <= 0:
        return plan.repeats
    return plan.max_repeats or min(MAX_REPEATS, 10 * plan.repeats)


def total_samples(plan: ProfilePlan, added_prompt_sizes: int = 0) -> int:
    """Measured (non-warm-up) samples the plan asks for: configs x repeats, or with a CI
    target the upper bound configs x max repeats (the runner lowers it when it stops
    early). Re-measurements of contended samples are not counted. An adaptive run grows
    it as it adds sizes: each added size brings one configuration per output length."""
    configs = len(configurations(plan)) + added_prompt_sizes * len(set(plan.output_tokens))
    return configs * effective_max_repeats(plan)


def _round_rng(seed: int, round_index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes and runs.
    return random.Random(f"idealrt-round:{seed}:{round_index}")


def round_order(
    configs: Sequence[Config],
    plan: ProfilePlan,
    round_index: int,
    include: Iterable[Config] | None = None,
) -> list[Config]:
    """The order of round `round_index`: the full list shuffled (when plan.randomize),
    then restricted to `include` (default: all)."""
    order = list(configs)
    if plan.randomize:
        _round_rng(plan.seed, round_index).shuffle(order)
    if include is None:
        return order
    wanted = set(include)
    return [c for c in order if c in wanted]


def warmup_order(configs: Sequence[Config], plan: ProfilePlan) -> list[tuple[Config, int]]:
    """(config, warm-up index) pairs: `plan.warmups` rounds, each shuffled like a measured
    round (negative round indices keep them independent of the measured rounds)."""
    out: list[tuple[Config, int]] = []
    for w in range(plan.warmups):
        out.extend((c, w) for c in round_order(configs, plan, -1 - w))
    return out


def sample_seed(plan: ProfilePlan, config: Config, repeat: int, attempt: int = 0) -> int:
    """Seed of the synthetic prompt of one generation: deterministic, distinct per
    (config, repeat, attempt), so a re-measurement uses a fresh prompt."""
    rng = random.Random(
        f"idealrt-prompt:{plan.seed}:{config.prompt_tokens}:{config.output_tokens}:"
        f"{int(config.heldout)}:{repeat}:{attempt}"
    )
    return rng.randrange(2**31)


def known_spec(model: ModelRef, kind: TargetKind = TargetKind.SERVING) -> ModelSpec | None:
    """The model's spec when it is known before anything is loaded (an explicit spec, or a
    catalog name of a serving target; InvalidArgument UNKNOWN_MODEL for a name the catalog
    lacks), else None (a black-box API's model name, or a weights directory: the runner
    checks the plan again once the target reports the spec)."""
    if model.spec is not None:
        return model.spec
    if kind == TargetKind.SERVING and model.name and not model.weights_path:
        return catalog.resolve(model.name)
    return None
