"""Stopping rules: fixed repeats, CI precision target, caps, budget (pure logic)."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from idealrt.core.domain import ProfilePlan
from idealrt.services.profiler.plan import Config
from idealrt.services.profiler.stopping import StoppingRule, StopReason, ci_half_width, ci_rel

PLAN = ProfilePlan(prompt_tokens=(8,), output_tokens=(4,), repeats=3)


def test_ci_half_width_matches_scipy_t_interval() -> None:
    values = [10.0, 12.0, 11.0, 13.0, 9.5]
    mean = sum(values) / len(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert ci_half_width(values) == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert ci_rel(values) == pytest.approx((hi - lo) / 2 / mean, rel=1e-12)
    assert math.isinf(ci_half_width([1.0]))
    assert ci_half_width([5.0, 5.0, 5.0]) == 0.0


def test_fixed_repeats() -> None:
    rule = StoppingRule(PLAN)
    assert rule.needs_more([1, 2])
    assert not rule.needs_more([1, 2, 3])
    assert not rule.needs_more([1, 100, 10000])  # no precision target: noise is no reason
    assert rule.reason({Config(8, 4): [1, 2, 3]}) is StopReason.REPEATS


def test_precision_target_stops_early_when_quiet() -> None:
    rule = StoppingRule(ProfilePlan((8,), (4,), repeats=3, until_ci_rel=0.01))
    quiet = [1000.0, 1001.0, 999.0]
    assert not rule.needs_more(quiet)
    assert rule.reason({Config(8, 4): quiet}) is StopReason.PRECISION


def test_precision_target_continues_when_noisy_until_the_cap() -> None:
    rule = StoppingRule(ProfilePlan((8,), (4,), repeats=3, until_ci_rel=0.01, max_repeats=6))
    noisy = [1000.0, 1500.0, 700.0]
    assert rule.needs_more(noisy)
    assert rule.needs_more([*noisy, 1200.0, 900.0])
    capped = [*noisy, 1200.0, 900.0, 1100.0]
    assert not rule.needs_more(capped)
    assert rule.reason({Config(8, 4): capped}) is StopReason.MAX_REPEATS


def test_abandoned_slots_count_against_the_cap() -> None:
    rule = StoppingRule(PLAN)
    assert not rule.needs_more([1.0, 2.0], slots=3)  # one repeat abandoned
    totals = {Config(8, 4): [1.0, 2.0], Config(16, 4): [1.0, 2.0]}
    assert rule.pending(totals, {Config(8, 4): 3, Config(16, 4): 2}) == [Config(16, 4)]


def test_budget_uses_the_clock() -> None:
    now = [100.0]
    rule = StoppingRule(ProfilePlan((8,), (4,), budget_s=5.0), clock=lambda: now[0])
    assert not rule.budget_spent()
    now[0] = 105.0
    assert rule.budget_spent()
    unlimited = StoppingRule(PLAN, clock=lambda: now[0])
    now[0] = 1e9
    assert not unlimited.budget_spent()
