from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from idealrt.core.domain import (
    Backend,
    LeasePolicy,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Provenance,
    StackSpec,
    Target,
    TargetKind,
)
from idealrt.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional
from idealrt.services.store import repository
from idealrt.services.store.repository import Store

MakeProfile = Callable[..., Profile]
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
    family="llama",
)


def _full_profile() -> Profile:
    plus2 = timezone(timedelta(hours=2))
    return Profile(
        id="",
        request_id="req-full-1",
        model=ModelRef(name="tiny", spec=SPEC, seed=42, weights_path="/models/tiny"),
        stack=StackSpec(Backend.ONNXRUNTIME, "cuda:1", "fp16", {"cuda_graphs": "1"}),
        plan=ProfilePlan(
            prompt_tokens=(1, 64, 512),
            output_tokens=(1, 32),
            repeats=4,
            warmups=2,
            holdout_prompt_tokens=(32, 256),
            holdout_output_tokens=(16,),
            seed=9,
            randomize=False,
            until_ci_rel=0.02,
            max_repeats=20,
            budget_s=120.5,
            lease=LeasePolicy.FAIL,
            batch_size=2,
        ),
        target=Target(
            TargetKind.HTTP,
            address="",
            base_url="http://127.0.0.1:8000/v1",
            api_model="gpt2",
            credential="openai-prod",
            tokenizer="/tok",
        ),
        state=ProfileState.RUNNING,
        start_time=datetime(2026, 3, 4, 12, 0, 0, 1, tzinfo=plus2),
        end_time=None,
        completed_samples=3,
        total_samples=60,
        error="",
        provenance=Provenance({"cpu.model": "Xeon", "torch.version": "2.13.0"}),
        model_spec=SPEC,
    )


def test_create_get_round_trips_every_field(store: Store) -> None:
    before = datetime.now(UTC)
    stored, created = store.create_profile(_full_profile())
    assert created
    assert stored.id.startswith("prof_") and len(stored.id) == len("prof_") + 12
    assert stored.create_time is not None and stored.create_time.tzinfo is UTC
    assert before - timedelta(seconds=1) <= stored.create_time <= datetime.now(UTC)
    got = store.get_profile(stored.id)
    assert got == stored
    expected = dataclasses.replace(_full_profile(), id=stored.id, create_time=stored.create_time)
    assert got == expected
    assert got.start_time is not None and got.start_time.tzinfo is UTC
    assert got.start_time.hour == 10 and got.start_time.microsecond == 1
    assert isinstance(got.plan.prompt_tokens, tuple) and got.model_spec == SPEC


def test_client_supplied_id_is_kept_and_unique(store: Store, make_profile: MakeProfile) -> None:
    stored, _ = store.create_profile(make_profile(id="mine-1"))
    assert stored.id == "mine-1"
    with pytest.raises(AlreadyExists) as info:
        store.create_profile(make_profile(id="mine-1"))
    assert (info.value.reason, info.value.field) == ("PROFILE_ALREADY_EXISTS", "id")


def test_create_is_idempotent_on_request_id(store: Store, make_profile: MakeProfile) -> None:
    first, created = store.create_profile(make_profile(request_id="r-1"))
    again, created_again = store.create_profile(make_profile(request_id="r-1"))
    assert created and not created_again
    assert again == first
    other, _ = store.create_profile(make_profile(request_id="r-2"))
    assert other.id != first.id
    no_request_id = [store.create_profile(make_profile())[0].id for _ in range(2)]
    assert len(set(no_request_id)) == 2  # without a request_id every create is new
    assert len(store.list_profiles(0, "")[0]) == 4


def test_replay_after_progress_still_returns_the_row(
    store: Store, make_profile: MakeProfile
) -> None:
    first, _ = store.create_profile(make_profile(request_id="r-1"))
    store.update_profile(dataclasses.replace(first, state=ProfileState.RUNNING))
    again, created = store.create_profile(make_profile(request_id="r-1"))
    assert not created and again.state is ProfileState.RUNNING


def test_request_id_reuse_with_other_body(store: Store, make_profile: MakeProfile) -> None:
    store.create_profile(make_profile(request_id="r-1"))
    with pytest.raises(AlreadyExists) as info:
        store.create_profile(make_profile(request_id="r-1", model=ModelRef(name="opt-125m")))
    assert (info.value.reason, info.value.field) == ("REQUEST_ID_REUSED", "request_id")
    assert len(store.list_profiles(0, "")[0]) == 1


def test_concurrent_creates_with_one_request_id_make_one_row(
    store: Store, make_profile: MakeProfile
) -> None:
    results: list[tuple[Profile, bool]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def create() -> None:
        barrier.wait()
        try:
            results.append(store.create_profile(make_profile(request_id="race")))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(created for _, created in results) == 1
    assert len({p.id for p, _ in results}) == 1
    assert len(store.list_profiles(0, "")[0]) == 1


def test_get_unknown(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        store.get_profile("prof_000000000000")
    assert (info.value.reason, info.value.field) == ("PROFILE_NOT_FOUND", "id")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": "has space"}, "id"),
        ({"id": "x" * 65}, "id"),
        ({"request_id": "r" * 257}, "request_id"),
        ({"state": "sleeping"}, "state"),
        ({"completed_samples": -1}, "completed_samples"),
        ({"total_samples": 1.5}, "total_samples"),
        ({"start_time": datetime(2026, 1, 1)}, "start_time"),  # naive
        ({"plan": ProfilePlan(prompt_tokens=("a",), output_tokens=(1,))}, "plan"),
        ({"stack": StackSpec(backend="jax")}, "stack"),
        ({"error": None}, "error"),
    ],
)
def test_invalid_profile_is_refused_and_nothing_written(
    store: Store, make_profile: MakeProfile, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        store.create_profile(make_profile(**changes))
    assert info.value.field == field
    assert store.list_profiles(0, "") == ([], "")


def test_update_writes_mutable_fields_only(store: Store, make_profile: MakeProfile) -> None:
    p, _ = store.create_profile(make_profile(request_id="r"))
    start = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
    changed = dataclasses.replace(
        p,
        state=ProfileState.RUNNING,
        start_time=start,
        completed_samples=5,
        total_samples=12,
        provenance=Provenance({"gpu.0.name": "H100"}),
        model_spec=SPEC,
        model=ModelRef(name="ignored"),  # immutable: kept as stored
        request_id="ignored",
    )
    updated = store.update_profile(changed)
    assert updated == store.get_profile(p.id)
    assert updated.state is ProfileState.RUNNING and updated.start_time == start
    assert (updated.completed_samples, updated.total_samples) == (5, 12)
    assert updated.provenance.entries == {"gpu.0.name": "H100"}
    assert updated.model_spec == SPEC
    assert updated.model == p.model and updated.request_id == "r"
    assert updated.create_time == p.create_time


@pytest.mark.parametrize(
    "final",
    [ProfileState.SUCCEEDED, ProfileState.FAILED, ProfileState.CANCELLED, ProfileState.INVALID],
)
def test_terminal_state_is_final(
    store: Store, make_profile: MakeProfile, final: ProfileState
) -> None:
    p, _ = store.create_profile(make_profile())
    done = store.update_profile(
        dataclasses.replace(p, state=final, end_time=datetime.now(UTC), error="why")
    )
    assert store.update_profile(done) == done  # an identical retry is fine
    for change in (
        {"state": ProfileState.RUNNING},
        {"state": ProfileState.QUEUED},
        {"error": "rewritten"},
        {"completed_samples": 99},
    ):
        with pytest.raises(FailedPrecondition) as info:
            store.update_profile(dataclasses.replace(done, **change))
        assert (info.value.reason, info.value.field) == ("PROFILE_TERMINAL", "state")
    assert store.get_profile(p.id) == done


def test_update_unknown_or_invalid(store: Store, make_profile: MakeProfile) -> None:
    with pytest.raises(NotFound) as nf:
        store.update_profile(make_profile(id="prof_missing"))
    assert (nf.value.reason, nf.value.field) == ("PROFILE_NOT_FOUND", "id")
    with pytest.raises(InvalidArgument) as empty:
        store.update_profile(make_profile(id=""))
    assert empty.value.field == "id"
    p, _ = store.create_profile(make_profile())
    with pytest.raises(InvalidArgument):
        store.update_profile(dataclasses.replace(p, total_samples=-5))
    assert store.get_profile(p.id) == p


def test_list_newest_first_with_pages(store: Store, make_profile: MakeProfile) -> None:
    ids = [store.create_profile(make_profile())[0].id for _ in range(7)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = store.list_profiles(3, token)
        pages += 1
        seen += [p.id for p in page]
        if not token:
            break
    assert pages == 3
    assert seen == ids[::-1]


def test_list_filters_by_state(store: Store, make_profile: MakeProfile) -> None:
    a, _ = store.create_profile(make_profile())
    b, _ = store.create_profile(make_profile())
    store.update_profile(dataclasses.replace(b, state=ProfileState.RUNNING))
    running, token = store.list_profiles(0, "", ProfileState.RUNNING)
    assert [p.id for p in running] == [b.id] and token == ""
    assert [p.id for p in store.list_profiles(0, "", ProfileState.QUEUED)[0]] == [a.id]
    assert store.list_profiles(0, "", ProfileState.FAILED) == ([], "")


def test_page_token_is_bound_to_its_filter(store: Store, make_profile: MakeProfile) -> None:
    for _ in range(3):
        store.create_profile(make_profile())
    _, token = store.list_profiles(1, "")
    assert token
    with pytest.raises(InvalidArgument) as info:
        store.list_profiles(1, token, ProfileState.QUEUED)
    assert (info.value.reason, info.value.field) == ("PAGE_TOKEN_INVALID", "page_token")
    with pytest.raises(InvalidArgument) as info:
        store.list_profiles(1, "garbage!")
    assert info.value.field == "page_token"
    with pytest.raises(InvalidArgument) as info:
        store.list_profiles(-1, "")
    assert info.value.field == "page_size"
    with pytest.raises(InvalidArgument) as info:
        store.list_profiles(0, "", "sleeping")
    assert info.value.field == "state"
    assert store.list_profiles(0, "", "queued")[0]


def test_pagination_is_stable_under_concurrent_inserts(
    store: Store, make_profile: MakeProfile
) -> None:
    original = [store.create_profile(make_profile())[0].id for _ in range(25)]
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            store.create_profile(make_profile())
            stop.wait(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: list[str] = []
        page, token = store.list_profiles(4, "")
        seen += [p.id for p in page]
        while token:
            store.create_profile(make_profile())  # an insert between every two pages, too
            page, token = store.list_profiles(4, token)
            seen += [p.id for p in page]
    finally:
        stop.set()
        thread.join()
    assert len(seen) == len(set(seen))  # nothing twice
    assert [i for i in seen if i in set(original)] == original[::-1]  # nothing skipped


def test_pagination_with_equal_create_times(
    store: Store, make_profile: MakeProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ties on create_time are broken by id, so no row is lost or repeated."""
    frozen = datetime(2026, 1, 1, tzinfo=UTC)
    monkeypatch.setattr(repository, "utcnow", lambda: frozen)
    ids = {store.create_profile(make_profile())[0].id for _ in range(11)}
    seen: list[str] = []
    token = ""
    while True:
        page, token = store.list_profiles(2, token)
        seen += [p.id for p in page]
        if not token:
            break
    assert seen == sorted(ids, reverse=True)


def test_unfinished_profiles_oldest_first(store: Store, make_profile: MakeProfile) -> None:
    q, _ = store.create_profile(make_profile())
    r, _ = store.create_profile(make_profile())
    d, _ = store.create_profile(make_profile())
    store.update_profile(dataclasses.replace(r, state=ProfileState.RUNNING))
    store.update_profile(dataclasses.replace(d, state=ProfileState.SUCCEEDED))
    assert [p.id for p in store.unfinished_profiles()] == [q.id, r.id]


def test_closed_store_refuses(store_url: str, make_profile: MakeProfile) -> None:
    st = repository.open_store(store_url)
    st.close()
    with pytest.raises(FailedPrecondition) as info:
        st.create_profile(make_profile())
    assert info.value.reason == "STORE_CLOSED"
