"""Hostile input over a real store server (`build_server` on 127.0.0.1:0, SQLite in
tmp_path): malformed timestamps and durations, poisoned cost models and forged page tokens
are INVALID_ARGUMENT naming the field (never INTERNAL), the server keeps answering, and the
stored data are what they were before the refused request."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.clients.store import StoreClient
from idealrt.common.v1 import common_pb2 as cpb
from idealrt.common.v1 import resources_pb2 as rpb
from idealrt.core import convert as cv
from idealrt.core.config import StoreConfig
from idealrt.core.domain import (
    Backend,
    CostModel,
    FitQuality,
    ModelRef,
    Profile,
    ProfilePlan,
    Sample,
    StackSpec,
)
from idealrt.services.store.server import build_server
from idealrt.store.v1 import store_service_pb2 as pb
from idealrt.store.v1 import store_service_pb2_grpc as pbg

INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Served:
    def __init__(self, stub: pbg.StoreServiceStub, client: StoreClient, profile_id: str) -> None:
        self.stub = stub
        self.client = client
        self.profile_id = profile_id

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a refused request could have touched."""
        profile = self.client.get_profile(self.profile_id)
        return (
            profile,
            self.client.all_samples(self.profile_id),
            self.client.list_cost_models(1000, "")[0],
            self.client.list_profiles(1000, "")[0],
        )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    cfg = StoreConfig(address="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/store.db")
    server, port = build_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = StoreClient(channel)
    profile, _ = client.create_profile(
        Profile(
            id="",
            model=ModelRef(name="gpt2"),
            stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
            plan=ProfilePlan(prompt_tokens=(1, 16), output_tokens=(1, 4)),
        )
    )
    client.append_samples(
        profile.id,
        "b0",
        [
            Sample(
                prompt_tokens=16, output_tokens=4, prefill_ns=10, decode_ns=(1, 2, 3), total_ns=16
            )
        ],
    )
    client.create_cost_model(_cost_model(profile.id))
    try:
        yield Served(pbg.StoreServiceStub(channel), client, profile.id)
    finally:
        channel.close()
        server.stop(0)


def _cost_model(profile_id: str = "") -> CostModel:
    return CostModel(
        id="",
        profile_id=profile_id,
        alpha_knots_p=(1, 64, 512),
        alpha_knots_s=(0.02, 0.03, 0.07),
        beta0_s=0.02,
        beta1_s=1e-7,
        kind="idealized",
        quality=FitQuality("kfold", 9, 0.01, 0.02, 0.03),
        intervals={"beta0": (0.019, 0.021)},
        valid_prompt_tokens=(1, 512),
        valid_output_tokens=(1, 64),
        fit_options={"bootstrap": "20"},
    )


def _refused(served: Served, call: Callable[[], object], reason: str, field: str) -> grpc.RpcError:
    """`call` fails INVALID_ARGUMENT with ErrorInfo(reason, field); nothing stored changed;
    the server still answers."""
    before = served.snapshot()
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    assert (err.code(), detail.reason, detail.metadata["field"]) == (INVALID, reason, field)
    assert served.snapshot() == before
    return err


def _sample_pb(**changes: Any) -> cpb.Sample:
    msg = cv.sample_to_pb(
        Sample(prompt_tokens=16, output_tokens=2, prefill_ns=5, decode_ns=(3,), total_ns=8)
    )
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


# ---- 1. timestamps and durations ------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, -1), (0, 1_000_000_000), (2**62, 0), (-62_135_596_801, 0), (253_402_300_800, 0)],
)
def test_append_samples_with_a_timestamp_out_of_range(
    served: Served, seconds: int, nanos: int
) -> None:
    bad = _sample_pb()
    bad.start_time.seconds, bad.start_time.nanos = seconds, nanos
    req = pb.AppendSamplesRequest(
        profile_id=served.profile_id, batch_id="b1", samples=[_sample_pb(), bad]
    )
    _refused(
        served,
        lambda: served.stub.AppendSamples(req, timeout=30),
        "TIMESTAMP_INVALID",
        "samples[1].start_time",
    )


def test_timestamps_at_the_ends_of_the_range_are_stored(served: Served) -> None:
    first, last = _sample_pb(), _sample_pb()
    first.start_time.seconds = -62_135_596_800
    last.start_time.seconds, last.start_time.nanos = 253_402_300_799, 999_999_999
    req = pb.AppendSamplesRequest(
        profile_id=served.profile_id, batch_id="b2", samples=[first, last]
    )
    assert served.stub.AppendSamples(req, timeout=30).appended == 2
    years = [s.start_time.year for s in served.client.all_samples(served.profile_id)[-2:]]  # type: ignore[union-attr]
    assert years == [1, 9999]


def test_create_cost_model_with_a_bad_create_time(served: Served) -> None:
    msg = cv.cost_model_to_pb(_cost_model())
    msg.create_time.nanos = -5
    _refused(
        served,
        lambda: served.stub.CreateCostModel(pb.CreateCostModelRequest(cost_model=msg), timeout=30),
        "TIMESTAMP_INVALID",
        "cost_model.create_time",
    )


def test_update_profile_with_a_bad_end_time(served: Served) -> None:
    msg = cv.profile_to_pb(served.client.get_profile(served.profile_id))
    msg.end_time.seconds = -(2**62)
    _refused(
        served,
        lambda: served.stub.UpdateProfile(pb.UpdateProfileRequest(profile=msg), timeout=30),
        "TIMESTAMP_INVALID",
        "profile.end_time",
    )


@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (0, 1_000_000_000), (5, -1), (-5, 1)])
def test_create_profile_with_a_bad_duration(served: Served, seconds: int, nanos: int) -> None:
    msg = cv.profile_to_pb(served.client.get_profile(served.profile_id))
    msg.id = ""
    msg.plan.budget.seconds, msg.plan.budget.nanos = seconds, nanos
    _refused(
        served,
        lambda: served.stub.CreateProfile(pb.CreateProfileRequest(profile=msg), timeout=30),
        "DURATION_INVALID",
        "profile.plan.budget",
    )


# ---- 3. poisoned cost models ------------------------------------------------------------


def _poison_no_knots(m: rpb.CostModel) -> None:
    m.kind = "imported"
    del m.alpha_knots_p[:]
    del m.alpha_knots_seconds[:]


def _set(**values: Any) -> Callable[[rpb.CostModel], None]:
    def edit(m: rpb.CostModel) -> None:
        for key, value in values.items():
            setattr(m, key, value)

    return edit


def _interval(low: float, high: float) -> Callable[[rpb.CostModel], None]:
    def edit(m: rpb.CostModel) -> None:
        m.intervals["beta0"].low = low
        m.intervals["beta0"].high = high

    return edit


def _knots(ps: list[int], ss: list[float]) -> Callable[[rpb.CostModel], None]:
    def edit(m: rpb.CostModel) -> None:
        del m.alpha_knots_p[:]
        del m.alpha_knots_seconds[:]
        m.alpha_knots_p.extend(ps)
        m.alpha_knots_seconds.extend(ss)

    return edit


def _fit_option(name: str, value: str) -> Callable[[rpb.CostModel], None]:
    def edit(m: rpb.CostModel) -> None:
        m.fit_options[name] = value

    return edit


@pytest.mark.parametrize(
    ("poison", "field"),
    [
        (_poison_no_knots, "alpha_knots_p"),
        (_set(beta0_seconds=-math.inf), "beta0_s"),
        (_set(beta0_seconds=math.nan), "beta0_s"),
        (_set(beta0_seconds=-0.01), "beta0_s"),
        (_set(beta1_seconds=math.inf), "beta1_s"),
        (_set(overhead_seconds=-1.0), "overhead_s"),
        (_set(kind="mystery"), "kind"),
        (_knots([1, 1], [0.1, 0.2]), "alpha_knots_p[1]"),
        (_knots([64, 16], [0.1, 0.2]), "alpha_knots_p[1]"),
        (_knots([0, 16], [0.1, 0.2]), "alpha_knots_p[0]"),
        (_knots([1, 16], [0.1, math.nan]), "alpha_knots_s[1]"),
        (_knots([1, 16], [-0.1, 0.2]), "alpha_knots_s[0]"),
        (_interval(math.nan, 1.0), "intervals[beta0].low"),
        (_interval(0.3, 0.2), "intervals[beta0]"),
        (_set(valid_prompt_tokens_min=600, valid_prompt_tokens_max=500), "valid_prompt_tokens"),
        (_set(valid_output_tokens_min=-1), "valid_output_tokens[0]"),
        (_fit_option("trim", "'a lot'"), "fit_options"),
        (_fit_option("seed", "-" * 10_000 + "1"), "fit_options[seed]"),
        (_fit_option("seed", "-1"), "fit_options.seed"),
    ],
)
def test_create_cost_model_refuses_a_poisoned_record(
    served: Served, poison: Callable[[rpb.CostModel], None], field: str
) -> None:
    msg = cv.cost_model_to_pb(_cost_model(served.profile_id))
    poison(msg)
    _refused(
        served,
        lambda: served.stub.CreateCostModel(pb.CreateCostModelRequest(cost_model=msg), timeout=30),
        "COST_MODEL_INCONSISTENT",
        field,
    )


def test_legitimate_shapes_are_stored(served: Served) -> None:
    """Not monotone (an imported HELM table), one knot, unknown ranges, a denoised model's
    negative alpha(p_min) and overhead: all stored."""
    for edit in (
        _knots([1, 64, 512], [0.05, 0.03, 0.07]),
        _knots([7], [0.01]),
        _set(valid_prompt_tokens_min=0, valid_prompt_tokens_max=0, kind="imported"),
        _set(kind="denoised", overhead_seconds=-0.004),
    ):
        msg = cv.cost_model_to_pb(_cost_model())
        edit(msg)
        if msg.kind == "denoised":
            msg.alpha_knots_seconds[0] = -0.002
        resp = served.stub.CreateCostModel(pb.CreateCostModelRequest(cost_model=msg), timeout=30)
        assert resp.created


# ---- 6. forged page tokens --------------------------------------------------------------


def _token(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def _raw_token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        # a cursor time that leaves years 1..9999 in UTC
        _token({"v": 1, "k": "profiles", "f": "", "c": ["0001-01-01T00:00:00+14:00", "x"]}),
        _raw_token(b"[" * 100_000),  # nesting past the parser's recursion limit
        _raw_token(b"[" * 300),  # short, but no token of ours
        "A" * 100_000,
    ],
)
def test_list_profiles_with_a_forged_page_token(served: Served, token: str) -> None:
    _refused(
        served,
        lambda: served.stub.ListProfiles(pb.ListProfilesRequest(page_token=token), timeout=30),
        "PAGE_TOKEN_INVALID",
        "page_token",
    )


def test_list_cost_models_with_a_deeply_nested_page_token(served: Served) -> None:
    req = pb.ListCostModelsRequest(page_token=_raw_token(b'{"a":' * 50_000))
    _refused(
        served,
        lambda: served.stub.ListCostModels(req, timeout=30),
        "PAGE_TOKEN_INVALID",
        "page_token",
    )


def test_list_samples_with_a_cursor_beyond_int64(served: Served) -> None:
    token = _token({"v": 1, "k": "samples", "f": served.profile_id, "c": [2**70]})
    req = pb.ListSamplesRequest(profile_id=served.profile_id, page_token=token)
    _refused(
        served,
        lambda: served.stub.ListSamples(req, timeout=30),
        "PAGE_TOKEN_INVALID",
        "page_token",
    )


def test_issued_page_tokens_still_work(served: Served) -> None:
    for _ in range(3):
        served.client.create_cost_model(_cost_model())
    seen, token = [], ""
    while True:
        page, token = served.client.list_cost_models(1, token)
        seen += [c.id for c in page]
        if not token:
            break
    assert len(seen) == len(set(seen)) == 4
