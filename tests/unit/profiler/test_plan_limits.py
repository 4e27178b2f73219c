"""Plan and target limits: the number of samples a plan may ask for (ProfilerConfig.
max_plan_samples), finite numbers, ranges, and the sizes of lists and strings; in plan.py,
through the manager, and over a real profiler server (CreateProfile)."""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.core import convert as cv
from idealrt.core.config import ProfilerConfig, StoreConfig
from idealrt.core.domain import LeasePolicy, ModelRef, Profile, ProfilePlan, StackSpec, Target
from idealrt.core.errors import InvalidArgument
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg
from idealrt.services.profiler import plan as P
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.server import build_server
from idealrt.services.store import server as store_server
from idealrt.services.store.repository import open_store

BASE = ProfilePlan(prompt_tokens=(8, 64), output_tokens=(2, 16), repeats=3, warmups=1)
HUGE = ProfilePlan(
    prompt_tokens=tuple(range(1, 129)), output_tokens=tuple(range(1, 129)), repeats=1000
)


def test_planned_samples_counts_warmups_heldout_ci_cap_and_adaptive_cap() -> None:
    assert P.planned_samples(BASE) == 4 * 1 + 4 * 3
    held = dataclasses.replace(BASE, holdout_prompt_tokens=(8, 16, 32))
    assert len(P.configurations(held)) == 8  # (8, *) is in the fit grid: fit only
    assert P.planned_samples(held) == 8 * 1 + 8 * 3
    ci = dataclasses.replace(BASE, until_ci_rel=0.02, max_repeats=9)
    assert P.planned_samples(ci) == 4 + 4 * 9
    adaptive = dataclasses.replace(BASE, adaptive_target_rel=0.05, adaptive_max_prompt_sizes=5)
    assert P.planned_samples(adaptive) == 4 + (4 + 5 * 2) * 3
    for plan in (BASE, held, ci, adaptive, HUGE):
        cap = P.effective_max_prompt_sizes(plan)
        expected = plan.warmups * len(P.configurations(plan)) + P.total_samples(plan, cap)
        assert P.planned_samples(plan) == expected
    assert P.planned_samples(HUGE) == 128 * 128 * 1001  # 16.4 M with the warm-ups


def test_a_plan_beyond_the_limit_is_refused_naming_the_count_and_the_limit() -> None:
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(HUGE, max_samples=200_000)
    assert (info.value.field, info.value.reason) == ("plan", "PLAN_TOO_LARGE")
    assert str(P.planned_samples(HUGE)) in info.value.message
    assert "200000" in info.value.message
    exact = P.planned_samples(BASE)
    P.validate_plan(BASE, max_samples=exact)  # at the limit: accepted
    with pytest.raises(InvalidArgument):
        P.validate_plan(BASE, max_samples=exact - 1)
    P.validate_plan(HUGE)  # no limit given (the runner re-checking a stored plan)


def test_the_largest_token_count_of_a_plan_is_configured() -> None:
    """ProfilerConfig.max_plan_tokens (IDEALRT_MAX_PLAN_TOKENS): every prompt and output
    length of both grids at most that, refused naming the entry and the limit."""
    plan = dataclasses.replace(BASE, holdout_output_tokens=(300,))
    P.validate_plan(plan, max_tokens=300)
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(plan, max_tokens=299)
    assert (info.value.field, info.value.reason) == (
        "plan.holdout_output_tokens",
        "PLAN_SIZE_OUT_OF_RANGE",
    )
    assert "[1, 299]" in info.value.message and "IDEALRT_MAX_PLAN_TOKENS" in info.value.message
    # never above the built-in bound, whatever is configured
    with pytest.raises(InvalidArgument):
        P.validate_plan(
            dataclasses.replace(BASE, prompt_tokens=(P.MAX_TOKENS + 1,)), max_tokens=2**40
        )


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"budget_s": math.nan}, "plan.budget_s", "PLAN_BUDGET_OUT_OF_RANGE"),
        ({"budget_s": math.inf}, "plan.budget_s", "PLAN_BUDGET_OUT_OF_RANGE"),
        ({"budget_s": 31 * 24 * 3600.0}, "plan.budget_s", "PLAN_BUDGET_OUT_OF_RANGE"),
        ({"spread_s": math.nan}, "plan.spread_s", "PLAN_SPREAD_OUT_OF_RANGE"),
        ({"spread_s": math.inf}, "plan.spread_s", "PLAN_SPREAD_OUT_OF_RANGE"),
        ({"until_ci_rel": math.nan}, "plan.until_ci_rel", "PLAN_CI_OUT_OF_RANGE"),
        (
            {"adaptive_target_rel": math.inf},
            "plan.adaptive_target_rel",
            "PLAN_ADAPTIVE_TARGET_OUT_OF_RANGE",
        ),
        ({"repeats": 2.5}, "plan.repeats", "PLAN_REPEATS_OUT_OF_RANGE"),
        ({"warmups": True}, "plan.warmups", "PLAN_WARMUPS_OUT_OF_RANGE"),
        ({"batch_size": 4097}, "plan.batch_size", "PLAN_BATCH_OUT_OF_RANGE"),
        ({"seed": 2**63}, "plan.seed", "PLAN_SEED_OUT_OF_RANGE"),
        (
            {"adaptive_max_prompt_sizes": 65},
            "plan.adaptive_max_prompt_sizes",
            "PLAN_ADAPTIVE_MAX_SIZES_OUT_OF_RANGE",
        ),
        ({"randomize": "yes"}, "plan.randomize", "PLAN_VALUE_INVALID"),
        ({"lease": "sometimes"}, "plan.lease", "PLAN_VALUE_INVALID"),
        ({"prompt_tokens": (8, 1 << 21)}, "plan.prompt_tokens", "PLAN_SIZE_OUT_OF_RANGE"),
        (
            {"output_tokens": tuple(range(1, 1026))},
            "plan.output_tokens",
            "PLAN_AXIS_TOO_LONG",
        ),
        (
            {"holdout_prompt_tokens": tuple(range(1, 1026))},
            "plan.holdout_prompt_tokens",
            "PLAN_AXIS_TOO_LONG",
        ),
    ],
)
def test_every_plan_field_is_checked(changes: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(BASE, **changes))
    assert (info.value.field, info.value.reason) == (field, reason)


def test_plans_inside_the_ranges_pass() -> None:
    P.validate_plan(dataclasses.replace(BASE, lease=LeasePolicy.FAIL, seed=-(2**63), budget_s=5))
    P.validate_plan(dataclasses.replace(BASE, prompt_tokens=tuple(range(1, 1025))))


@pytest.mark.parametrize(
    ("target", "field", "reason"),
    [
        (Target(address="h" * 5000), "target.address", "TARGET_FIELD_TOO_LONG"),
        (Target(base_url="http://x/" + "a" * 5000), "target.base_url", "TARGET_FIELD_TOO_LONG"),
        (Target(tokenizer="t" * 5000), "target.tokenizer", "TARGET_FIELD_TOO_LONG"),
        (
            Target(options={f"k{i}": "v" for i in range(65)}),
            "target.options",
            "TARGET_OPTIONS_TOO_MANY",
        ),
        (
            Target(options={"stream": "1" * 5000}),
            "target.options['stream']",
            "TARGET_FIELD_TOO_LONG",
        ),
    ],
)
def test_target_fields_are_bounded(target: Target, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        P.validate_target(target)
    assert (info.value.field, info.value.reason) == (field, reason)
    P.validate_target(Target(address="127.0.0.1:50052", options={"stream": "1"}))


def test_the_manager_refuses_a_plan_beyond_its_limit_before_storing(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    m = ProfileManager(store, lambda p: kit.SyntheticTarget(), lease_dir, max_plan_samples=15)
    try:
        with pytest.raises(InvalidArgument) as info:
            m.create(kit.make_profile())  # 4 warm-ups + 12 measured = 16
        assert (info.value.field, info.value.reason) == ("plan", "PLAN_TOO_LARGE")
        with pytest.raises(InvalidArgument) as info:
            m.create(dataclasses.replace(kit.make_profile(), target=Target(address="a" * 5000)))
        assert info.value.reason == "TARGET_FIELD_TOO_LONG"
        assert store.list_profiles(10, "")[0] == []
    finally:
        m.shutdown()


@pytest.fixture
def profiler(tmp_path: Path) -> Iterator[pbg.ProfilerServiceStub]:
    """A store and a profiler with the default limits, on loopback."""
    repo = open_store("sqlite://")
    store, store_port = store_server.build_server(StoreConfig(), repo)
    cfg = ProfilerConfig(store_target=f"127.0.0.1:{store_port}", data_dir=tmp_path, resume=False)
    server, port = build_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pbg.ProfilerServiceStub(channel)
    finally:
        channel.close()
        server.stop(1.0)
        store.stop(1.0)
        repo.close()


def test_create_profile_refuses_a_16m_sample_plan_over_grpc(profiler) -> None:  # type: ignore[no-untyped-def]
    profile = Profile(id="", model=ModelRef(name="tiny-gpt2"), stack=StackSpec(), plan=HUGE)
    request = pb.CreateProfileRequest(
        request_id=uuid.uuid4().hex, profile=cv.profile_to_pb(profile)
    )
    with pytest.raises(grpc.RpcError) as info:
        profiler.CreateProfile(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    details = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(details)
    assert (details.reason, details.metadata["field"]) == ("PLAN_TOO_LARGE", "plan")
    listed = profiler.ListProfiles(pb.ListProfilesRequest(page_size=10), timeout=10)
    assert list(listed.profiles) == []
