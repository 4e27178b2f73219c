"""Plan presets: grids that are known to pin the cost model down for their price.

The economical plan (`economical_plan`) is the cheapest grid that still pins the cost model
down, measured in bench/bench_profiling_cost.py: six prompt sizes where alpha bends (1 and
16: the matrix-vector -> GEMM transition) and evenly spaced above, so linear interpolation
between knots stays close to attention's convex growth; output lengths {1, max}: every sample
measures alpha(p) (its prefill), the long ones add max-1 decode steps at contexts spread
over the whole prompt range (beta0 + beta1 c is fitted from those per-step times); one
repeat, no warm-up per configuration (the backend warms up when it loads; a contended sample
is still re-measured).
"""

from __future__ import annotations

from idealrt.core.domain import ProfilePlan
from idealrt.core.errors import InvalidArgument
from idealrt.core.reasons import OUTPUT_TOKENS_INVALID, PROMPT_TOKENS_INVALID

__all__ = ["ECONOMICAL_FRACTIONS", "economical_plan", "economical_prompt_sizes"]

ECONOMICAL_FRACTIONS = (2 / 15, 0.4, 0.7)  # of the largest prompt, above 1 and 16


def economical_prompt_sizes(max_prompt_tokens: int) -> tuple[int, ...]:
    """1, 16, then 2/15, 0.4, 0.7 and 1 x max_prompt_tokens (for 960: 1, 16, 128, 384, 672,
    960); fewer sizes when max_prompt_tokens is small. InvalidArgument below 1."""
    if max_prompt_tokens < 1:
        raise InvalidArgument(
            PROMPT_TOKENS_INVALID,
            f"the largest prompt size must be >= 1, got {max_prompt_tokens}",
            field="plan.prompt_tokens",
        )
    top = max_prompt_tokens
    sizes = [1, 16, *(round(f * top) for f in ECONOMICAL_FRACTIONS), top]
    return tuple(sorted({x for x in sizes if 1 <= x <= top}))


def economical_plan(
    max_prompt_tokens: int, max_output_tokens: int, *, seed: int = 0
) -> ProfilePlan:
    """The economical plan for prompts up to `max_prompt_tokens` and outputs up to
    `max_output_tokens` (see the module docstring)."""
    if max_output_tokens < 1:
        raise InvalidArgument(
            OUTPUT_TOKENS_INVALID,
            f"the largest output length must be >= 1, got {max_output_tokens}",
            field="plan.output_tokens",
        )
    return ProfilePlan(
        prompt_tokens=economical_prompt_sizes(max_prompt_tokens),
        output_tokens=tuple(sorted({1, max_output_tokens})),
        repeats=1,
        warmups=0,
        seed=seed,
    )
