from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from idealrt.core.domain import Backend, CostModel, FitQuality, Profile, StackSpec
from idealrt.core.errors import AlreadyExists, InvalidArgument, NotFound
from idealrt.services.store.repository import Store

MakeProfile = Callable[..., Profile]


def _cm(profile_id: str = "", **changes: Any) -> CostModel:
    cm = CostModel(
        id="",
        profile_id=profile_id,
        alpha_knots_p=(1, 64, 512),
        alpha_knots_s=(0.0231, 0.0302, 0.0761),
        beta0_s=0.021,
        beta1_s=1.5e-7,
        overhead_s=0.0,
        name="gpt-j-6b@a100",
        kind="idealized",
        quality=FitQuality("heldout", 42, 0.012, 0.031, 0.05),
        intervals={"beta0": (0.0205, 0.0215), "alpha@64": (0.029, 0.031)},
        valid_prompt_tokens=(1, 2048),
        valid_output_tokens=(1, 512),
        model_name="gpt-j-6b",
        stack=StackSpec(Backend.TENSORRT, "cuda", "fp16", {"cuda_graphs": "1"}),
        fit_options={"bootstrap": "200", "robust_centre": "'median'"},
    )
    for key, value in changes.items():
        setattr(cm, key, value)
    return cm


def test_round_trip(store: Store, make_profile: MakeProfile) -> None:
    p, _ = store.create_profile(make_profile())
    stored, created = store.create_cost_model(_cm(p.id, request_id="fit-1"))
    assert created and stored.id.startswith("cm_") and len(stored.id) == 15
    assert stored.create_time is not None and stored.create_time.tzinfo is UTC
    got = store.get_cost_model(stored.id)
    assert got == stored
    assert got == dataclasses.replace(
        _cm(p.id, request_id="fit-1"), id=stored.id, create_time=stored.create_time
    )
    assert isinstance(got.intervals["beta0"], tuple) and got.stack is not None


def test_imported_model_without_profile(store: Store) -> None:
    stored, _ = store.create_cost_model(_cm(kind="imported", stack=None))
    assert store.get_cost_model(stored.id).profile_id == ""
    assert store.get_cost_model(stored.id).stack is None


def test_idempotent_on_request_id(store: Store) -> None:
    first, created = store.create_cost_model(_cm(request_id="r"))
    again, created_again = store.create_cost_model(_cm(request_id="r"))
    assert created and not created_again and again == first
    with pytest.raises(AlreadyExists) as info:
        store.create_cost_model(_cm(request_id="r", beta0_s=0.5))
    assert (info.value.reason, info.value.field) == ("REQUEST_ID_REUSED", "request_id")
    assert len(store.list_cost_models(0, "")[0]) == 1


def test_errors(store: Store) -> None:
    with pytest.raises(NotFound) as nf:
        store.get_cost_model("cm_000000000000")
    assert (nf.value.reason, nf.value.field) == ("COST_MODEL_NOT_FOUND", "id")
    with pytest.raises(NotFound) as np_:
        store.create_cost_model(_cm("prof_missing"))
    assert (np_.value.reason, np_.value.field) == ("PROFILE_NOT_FOUND", "profile_id")
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"alpha_knots_s": (0.1,)}, "alpha_knots_s"),
        ({"kind": ""}, "kind"),
        ({"beta0_s": "fast"}, "cost_model"),
        ({"create_time": datetime(2026, 1, 1)}, "create_time"),
    ]
    for changes, field in invalid:
        with pytest.raises(InvalidArgument) as info:
            store.create_cost_model(_cm(**changes))
        assert info.value.field == field
    stored, _ = store.create_cost_model(_cm(id="cm_fixed"))
    with pytest.raises(AlreadyExists) as dup:
        store.create_cost_model(_cm(id="cm_fixed"))
    assert (dup.value.reason, dup.value.field) == ("COST_MODEL_ALREADY_EXISTS", "id")
    assert [c.id for c in store.list_cost_models(0, "")[0]] == [stored.id]


def test_list_by_profile_newest_first(store: Store, make_profile: MakeProfile) -> None:
    p1, _ = store.create_profile(make_profile())
    p2, _ = store.create_profile(make_profile())
    ids1 = [store.create_cost_model(_cm(p1.id))[0].id for _ in range(5)]
    ids2 = [store.create_cost_model(_cm(p2.id))[0].id for _ in range(2)]
    seen: list[str] = []
    token = ""
    while True:
        page, token = store.list_cost_models(2, token, profile_id=p1.id)
        seen += [c.id for c in page]
        if not token:
            break
    assert seen == ids1[::-1]
    everything, token = store.list_cost_models(0, "")
    assert [c.id for c in everything] == (ids1 + ids2)[::-1] and token == ""
    _, token = store.list_cost_models(1, "", profile_id=p1.id)
    with pytest.raises(InvalidArgument) as info:
        store.list_cost_models(1, token, profile_id=p2.id)
    assert info.value.reason == "PAGE_TOKEN_INVALID"
