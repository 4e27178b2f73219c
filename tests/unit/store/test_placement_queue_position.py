"""A profile's placement and queue position (issue 16): both directions of the converters,
the store's rows (in the JSON payload: a row written before the fields existed reads as the
defaults), create/get/update/list on every backend, and validation."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from idealrt.common.v1 import resources_pb2 as rpb
from idealrt.core import convert as cv
from idealrt.core.domain import Placement, Profile, ProfileState
from idealrt.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from idealrt.services.store import _rows, _validate, schema
from idealrt.services.store.repository import Store

MakeProfile = Callable[..., Profile]
NOW = datetime(2026, 1, 1, tzinfo=UTC)
H100 = Placement(gpu_product="NVIDIA-H100-80GB-HBM3", node_pool="gpu-pool_a.1", whole_node=True)


# ---- the domain and the converters ---------------------------------------------------


def test_placement_empty() -> None:
    assert Placement().empty
    assert not Placement(gpu_product="x").empty
    assert not Placement(node_pool="x").empty
    assert not Placement(whole_node=True).empty


def test_convert_round_trips_both_fields(make_profile: MakeProfile) -> None:
    p = make_profile(id="prof_1", placement=H100, queue_position=7)
    msg = cv.profile_to_pb(p)
    assert msg.HasField("placement") and msg.queue_position == 7
    assert (msg.placement.gpu_product, msg.placement.node_pool, msg.placement.whole_node) == (
        H100.gpu_product, H100.node_pool, True,
    )  # fmt: skip
    assert cv.profile_from_pb(msg) == p
    wire = rpb.Profile.FromString(msg.SerializeToString())
    assert cv.profile_from_pb(wire) == p


def test_empty_placement_is_unset_on_the_wire(make_profile: MakeProfile) -> None:
    msg = cv.profile_to_pb(make_profile())
    assert not msg.HasField("placement") and msg.queue_position == 0
    back = cv.profile_from_pb(msg)
    assert back.placement == Placement() and back.queue_position == 0
    # a client that sets an empty message means the same thing
    msg.placement.SetInParent()
    assert cv.profile_from_pb(msg).placement == Placement()


def test_a_new_profile_keeps_its_placement_and_drops_a_client_queue_position(
    make_profile: MakeProfile,
) -> None:
    msg = cv.profile_to_pb(make_profile(placement=H100, queue_position=3))
    new = cv.profile_from_pb(msg, new=True)
    assert new.placement == H100
    assert new.queue_position == 0  # the profiler's, never the client's


def test_profile_messages_key_on_both_fields(store: Store, make_profile: MakeProfile) -> None:
    stored, _ = store.create_profile(make_profile(placement=H100))
    messages = cv.ProfileMessages()
    first = store.get_profile(stored.id)
    again = store.get_profile(stored.id)
    assert first.placement is again.placement  # a shared frozen part, like plan
    assert messages(again) is messages(first) == cv.profile_to_pb(first)
    queued = dataclasses.replace(first, queue_position=4)  # same parts, other position
    assert messages(queued) == cv.profile_to_pb(queued) != messages(first)
    moved = dataclasses.replace(first, placement=Placement(node_pool="other"))
    assert messages(moved) == cv.profile_to_pb(moved) != messages(first)


# ---- rows ------------------------------------------------------------------------------


def test_rows_keep_both_fields_in_the_payload(make_profile: MakeProfile) -> None:
    p = make_profile(id="prof_1", placement=H100, queue_position=2)
    row = _rows.profile_row(p, update_time=NOW)
    payload = json.loads(row["payload"])
    assert payload["queue_position"] == 2
    assert payload["placement"]["gpu_product"] == H100.gpu_product
    assert _rows.profile_from_row(row) == p


def test_a_payload_written_before_the_fields_reads_as_the_defaults(
    make_profile: MakeProfile,
) -> None:
    row = _rows.profile_row(make_profile(id="prof_old"), update_time=NOW)
    old = json.loads(row["payload"])
    del old["placement"], old["queue_position"]
    row["payload"] = json.dumps(old)
    p = _rows.profile_from_row(row)
    assert p.placement == Placement() and p.queue_position == 0


def test_stored_rows_without_the_keys_read_as_the_defaults(
    store: Store, make_profile: MakeProfile
) -> None:
    """A row as an older store wrote it (no key in the payload, no migration) reads, updates
    and lists like any other."""
    p, _ = store.create_profile(make_profile(request_id="old-1"))
    with store._engine.begin() as conn:
        payload = json.loads(
            conn.execute(
                sa.select(schema.profiles.c.payload).where(schema.profiles.c.id == p.id)
            ).scalar_one()
        )
        del payload["placement"], payload["queue_position"]
        conn.execute(
            schema.profiles.update()
            .where(schema.profiles.c.id == p.id)
            .values(payload=json.dumps(payload))
        )
    got = store.get_profile(p.id)
    assert got == p and got.placement == Placement() and got.queue_position == 0
    assert store.list_profiles(0, "")[0] == [p]
    again, created = store.create_profile(make_profile(request_id="old-1"))  # a retry
    assert not created and again == p
    updated = store.update_profile(dataclasses.replace(got, queue_position=2))
    assert updated.queue_position == 2 and updated.placement == Placement()


# ---- the store -------------------------------------------------------------------------


def test_create_get_list_round_trip_both_fields(store: Store, make_profile: MakeProfile) -> None:
    p, created = store.create_profile(make_profile(placement=H100, queue_position=5))
    assert created and p.placement == H100 and p.queue_position == 5
    assert store.get_profile(p.id) == p
    other, _ = store.create_profile(make_profile())
    assert other.placement == Placement() and other.queue_position == 0
    listed = {x.id: x for x in store.list_profiles(0, "")[0]}
    assert listed == {p.id: p, other.id: other}
    assert {x.id: x for x in store.unfinished_profiles()} == listed


def test_update_writes_queue_position_and_keeps_placement(
    store: Store, make_profile: MakeProfile
) -> None:
    p, _ = store.create_profile(make_profile(placement=H100, queue_position=3))
    moved = store.update_profile(
        dataclasses.replace(p, queue_position=1, placement=Placement(node_pool="ignored"))
    )
    assert moved.queue_position == 1 and moved.placement == H100
    assert store.get_profile(p.id) == moved
    running = store.update_profile(
        dataclasses.replace(moved, state=ProfileState.RUNNING, queue_position=0)
    )
    assert running.queue_position == 0 and store.get_profile(p.id) == running


def test_a_terminal_profile_keeps_its_queue_position(
    store: Store, make_profile: MakeProfile
) -> None:
    p, _ = store.create_profile(make_profile())
    done = store.update_profile(dataclasses.replace(p, state=ProfileState.CANCELLED))
    assert store.update_profile(done) == done  # an identical retry
    with pytest.raises(FailedPrecondition) as info:
        store.update_profile(dataclasses.replace(done, queue_position=2))
    assert info.value.reason == "PROFILE_TERMINAL"


def test_request_id_reuse_with_another_placement(store: Store, make_profile: MakeProfile) -> None:
    first, _ = store.create_profile(make_profile(request_id="r-1", placement=H100))
    again, created = store.create_profile(make_profile(request_id="r-1", placement=H100))
    assert not created and again == first
    with pytest.raises(AlreadyExists) as info:  # the placement is part of the request
        store.create_profile(make_profile(request_id="r-1"))
    assert (info.value.reason, info.value.field) == ("REQUEST_ID_REUSED", "request_id")


# ---- validation ------------------------------------------------------------------------


GPU, POOL = "placement.gpu_product", "placement.node_pool"
BAD, RANGE = "VALUE_INVALID", "VALUE_OUT_OF_RANGE"


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"placement": Placement(gpu_product="NVIDIA H100")}, GPU, BAD),
        ({"placement": Placement(gpu_product="-H100")}, GPU, BAD),
        ({"placement": Placement(gpu_product="H100.")}, GPU, BAD),
        ({"placement": Placement(gpu_product="a" * 64)}, GPU, BAD),
        ({"placement": Placement(node_pool="pool/a")}, POOL, BAD),
        ({"placement": Placement(node_pool="é")}, POOL, BAD),
        ({"placement": Placement(gpu_product=1)}, "placement", BAD),  # type: ignore[arg-type]
        ({"placement": "anywhere"}, "placement", BAD),
        ({"queue_position": -1}, "queue_position", RANGE),
        ({"queue_position": 1_000_001}, "queue_position", RANGE),
        ({"queue_position": 2**63}, "queue_position", RANGE),
        ({"queue_position": 1.5}, "queue_position", BAD),
        ({"queue_position": True}, "queue_position", BAD),
    ],
)
def test_invalid_placement_or_position_is_refused(
    store: Store,
    make_profile: MakeProfile,
    changes: dict[str, object],
    field: str,
    reason: str,
) -> None:
    with pytest.raises(InvalidArgument) as info:
        store.create_profile(make_profile(**changes))
    assert (info.value.field, info.value.reason) == (field, reason)
    assert store.list_profiles(0, "") == ([], "")
    p, _ = store.create_profile(make_profile())
    with pytest.raises(InvalidArgument) as on_update:
        store.update_profile(dataclasses.replace(p, **changes))  # type: ignore[arg-type]
    assert (on_update.value.field, on_update.value.reason) == (field, reason)
    assert store.get_profile(p.id) == p


@pytest.mark.parametrize(
    "placement",
    [
        Placement(),
        Placement(gpu_product="a"),
        Placement(gpu_product="a" * 63, node_pool="A-b_c.d9"),
        Placement(gpu_product="NVIDIA-A100-SXM4-40GB", whole_node=True),
    ],
)
def test_valid_placements_and_positions_pass(
    make_profile: MakeProfile, placement: Placement
) -> None:
    for position in (0, 1, 1_000_000):
        p = make_profile(placement=placement, queue_position=position)
        checked = _validate.check_profile(p)
        assert checked.placement == placement and checked.queue_position == position


def test_the_message_names_the_allowed_form_and_range(make_profile: MakeProfile) -> None:
    with pytest.raises(InvalidArgument) as label:
        _validate.check_profile(make_profile(placement=Placement(node_pool="a b")))
    assert "63" in str(label.value) and "label value" in str(label.value)
    with pytest.raises(InvalidArgument) as position:
        _validate.check_profile(make_profile(queue_position=-3))
    assert "[0, 1000000]" in str(position.value)
