from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from idealrt.core import paging as _paging
from idealrt.core.domain import (
    Backend,
    ContentionObservation,
    CostModel,
    FitQuality,
    LeasePolicy,
    ModelRef,
    ProfilePlan,
    StackSpec,
    Target,
    TargetKind,
)
from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional
from idealrt.services.store import _serde

SPEC = ModelSpec(
    "tiny-llama",
    layers=2,
    d_model=64,
    heads=4,
    d_ff=172,
    vocab=1000,
    max_positions=256,
    kv_heads=2,
    norm=Norm.RMSNORM,
    activation=Activation.SWIGLU,
    positional=Positional.ROTARY,
    tied_embeddings=False,
    bias=False,
    rotary_base=500000.0,
    family="llama",
)


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (ModelSpec, SPEC),
        (ModelRef, ModelRef(name="x", spec=SPEC, seed=7, weights_path="/w")),
        (StackSpec, StackSpec(Backend.ONNXRUNTIME, "cuda:1", "fp16", {"threads": "2"})),
        (
            ProfilePlan,
            ProfilePlan(
                (1, 2),
                (3,),
                repeats=5,
                holdout_prompt_tokens=(7,),
                until_ci_rel=0.01,
                lease=LeasePolicy.FAIL,
                randomize=False,
            ),
        ),
        (Target, Target(TargetKind.HTTP, base_url="http://x/v1", credential="api")),
        (ContentionObservation, ContentionObservation(0.5, 2, 1410.0, 61.5, 4, 12.25, "nvml")),
        (
            CostModel,
            CostModel(
                "cm_1",
                "prof_1",
                (1, 64),
                (0.01, 0.05),
                0.02,
                1e-7,
                quality=FitQuality("kfold", 9, 0.01, 0.02, 0.03),
                intervals={"beta0": (0.019, 0.021), "alpha@64": (0.04, float("inf"))},
                valid_prompt_tokens=(1, 64),
                create_time=datetime(2026, 1, 1, tzinfo=UTC),
                stack=StackSpec(),
                namespace="team-a",
            ),
        ),
    ],
)
def test_round_trip_is_exact(tp: type, value: object) -> None:
    text = _serde.dumps(value)
    back = _serde.loads(tp, text)
    assert back == value
    assert type(back) is type(value)
    assert _serde.dumps(back) == text  # canonical: stable text for equal values


def test_tuples_and_enums_come_back_typed() -> None:
    plan = _serde.loads(ProfilePlan, _serde.dumps(ProfilePlan((1, 2), (3,))))
    assert isinstance(plan.prompt_tokens, tuple)
    assert isinstance(plan.lease, LeasePolicy)


def test_datetimes_are_utc_aware() -> None:
    local = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    back = _serde.from_jsonable(datetime, _serde.to_jsonable(local))
    assert back == local and back.tzinfo is UTC and back.hour == 10


def test_missing_keys_take_defaults_and_unknown_keys_are_ignored() -> None:
    obs = _serde.from_jsonable(ContentionObservation, {"energy_j": 3.0, "gone_field": 1})
    assert obs == ContentionObservation(energy_j=3.0)


@pytest.mark.parametrize(
    ("tp", "value"),
    [(ProfilePlan, {"prompt_tokens": ["a"], "output_tokens": [1]}), (StackSpec, {"backend": "x"})],
)
def test_malformed_json_is_refused(tp: type, value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        _serde.from_jsonable(tp, value)


def test_decode_ns_blob_is_int64_little_endian() -> None:
    steps = (0, 1, 2**40, 2**63 - 1)
    blob = _serde.encode_ns(steps)
    assert len(blob) == 32 and blob[8:16] == (1).to_bytes(8, "little")
    assert _serde.decode_ns(blob) == steps
    assert _serde.decode_ns(b"") == ()
    with pytest.raises(ValueError):
        _serde.decode_ns(b"\x00" * 7)


def test_page_tokens() -> None:
    token = _paging.encode_token("profiles", "", ["2026-01-01T00:00:00+00:00", "prof_1"])
    assert _paging.decode_token(token, "profiles", "") == ["2026-01-01T00:00:00+00:00", "prof_1"]
    assert _paging.decode_token("", "profiles", "") is None
    for bad, kind, filt in [
        (token, "profiles", "queued"),  # other filter
        (token, "cost_models", ""),  # other listing
        ("%%%", "profiles", ""),
        ("bm90IGpzb24", "profiles", ""),  # base64 of "not json"
        ("W10", "profiles", ""),  # base64 of "[]"
    ]:
        with pytest.raises(InvalidArgument) as info:
            _paging.decode_token(bad, kind, filt)
        assert (info.value.reason, info.value.field) == ("PAGE_TOKEN_INVALID", "page_token")


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (1000, 1000), (5000, 1000)])
def test_page_size_defaults_and_coerces(requested: int, expected: int) -> None:
    assert _paging.page_size(requested, 50, 1000) == expected


@pytest.mark.parametrize("requested", [-1, True, 2.5, "10"])
def test_page_size_invalid(requested: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        _paging.page_size(requested, 50, 1000)
    assert (info.value.reason, info.value.field) == ("PAGE_SIZE_INVALID", "page_size")
