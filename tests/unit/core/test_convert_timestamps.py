"""Timestamps and Durations from clients: out of range is INVALID_ARGUMENT naming the
field (with its path in the request), never a ValueError that ends as INTERNAL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from idealrt.common.v1 import common_pb2 as cpb
from idealrt.common.v1 import resources_pb2 as rpb
from idealrt.core import convert as cv
from idealrt.core.errors import InvalidArgument

MIN_S, MAX_S = -62_135_596_800, 253_402_300_799


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, -1), (0, 1_000_000_000), (MIN_S - 1, 0), (MAX_S + 1, 0), (2**62, 0), (-(2**62), 0)],
)
def test_timestamp_out_of_range(seconds: int, nanos: int) -> None:
    msg = cpb.Sample()
    msg.start_time.seconds, msg.start_time.nanos = seconds, nanos
    with pytest.raises(InvalidArgument) as info:
        cv.sample_from_pb(msg, "samples[3]")
    assert (info.value.reason, info.value.field) == ("TIMESTAMP_INVALID", "samples[3].start_time")


def test_timestamp_range_ends_and_unset() -> None:
    msg = cpb.Sample(flag=cpb.SAMPLE_FLAG_OK)
    assert cv.ts_from_pb(msg, "start_time") is None
    msg.start_time.seconds = MIN_S
    assert cv.ts_from_pb(msg, "start_time") == datetime(1, 1, 1, tzinfo=UTC)
    msg.start_time.seconds, msg.start_time.nanos = MAX_S, 999_999_999
    got = cv.ts_from_pb(msg, "start_time")
    assert got is not None and (got.year, got.microsecond) == (9999, 999_999)


def test_profile_and_cost_model_times_name_their_path() -> None:
    prof = rpb.Profile()
    prof.end_time.nanos = -1
    with pytest.raises(InvalidArgument) as info:
        cv.ts_from_pb(prof, "end_time", "profile")
    assert (info.value.reason, info.value.field) == ("TIMESTAMP_INVALID", "profile.end_time")
    cm = rpb.CostModel(alpha_knots_p=[1], alpha_knots_seconds=[0.1])
    cm.create_time.seconds = MAX_S + 1
    with pytest.raises(InvalidArgument) as info:
        cv.cost_model_from_pb(cm)
    assert (info.value.reason, info.value.field) == ("TIMESTAMP_INVALID", "cost_model.create_time")


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(315_576_000_001, 0), (-315_576_000_001, 0), (0, 1_000_000_000), (0, -1_000_000_000),
     (1, -1), (-1, 1)],
)  # fmt: skip
def test_duration_out_of_range_or_mixed_signs(seconds: int, nanos: int) -> None:
    plan = rpb.ProfilePlan(lease=rpb.LEASE_POLICY_WAIT)
    plan.spread.seconds, plan.spread.nanos = seconds, nanos
    with pytest.raises(InvalidArgument) as info:
        cv.plan_from_pb(plan, "profile.plan")
    assert (info.value.reason, info.value.field) == ("DURATION_INVALID", "profile.plan.spread")


def test_durations_in_range_convert_to_seconds() -> None:
    plan = rpb.ProfilePlan(lease=rpb.LEASE_POLICY_WAIT)
    plan.budget.seconds, plan.budget.nanos = 90, 500_000_000
    assert cv.plan_from_pb(plan).budget_s == 90.5
    assert cv.plan_from_pb(plan).spread_s == 0.0  # unset
    plan.budget.seconds, plan.budget.nanos = -2, -500_000_000  # well-formed; the domain judges
    assert cv.duration_from_pb(plan, "budget") == -2.5
