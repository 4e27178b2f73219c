from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from idealrt.core.domain import (
    ContentionObservation,
    Profile,
    ProfileState,
    Sample,
    SampleFlag,
    SampleTiming,
)
from idealrt.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from idealrt.services.store.repository import Store

MakeProfile = Callable[..., Profile]
MakeSample = Callable[..., Sample]


@pytest.fixture
def profile(store: Store, make_profile: MakeProfile) -> Profile:
    return store.create_profile(make_profile())[0]


def test_every_sample_field_round_trips(store: Store, profile: Profile) -> None:
    plus9 = timezone(timedelta(hours=9))
    full = Sample(
        prompt_tokens=512,
        output_tokens=5,
        prefill_ns=123_456_789,
        decode_ns=(1, 2**40, 2**62, 0),
        total_ns=2**62 + 2**40 + 123_456_792,
        batch_size=4,
        start_time=datetime(2026, 7, 1, 9, 30, 0, 999999, tzinfo=plus9),
        rpc_ns=987_654_321,
        heldout=True,
        repeat=7,
        flag=SampleFlag.CONTENDED,
        contention=ContentionObservation(
            foreign_cpu_s=0.125,
            gpu_foreign_processes=2,
            sm_clock_mhz=1410.5,
            temperature_c=71.25,
            throttle_reasons=0x40,
            energy_j=1.5e3,
            energy_source="nvml",
        ),
        timing=SampleTiming.STREAM_TOKENS,
        chunks=5,
    )
    sparse = Sample(prompt_tokens=0, output_tokens=1, prefill_ns=0, decode_ns=(), total_ns=0)
    assert store.append_samples(profile.id, "b1", [full, sparse]) == 2
    got = store.all_samples(profile.id)
    assert got == [dataclasses.replace(full, seq=0), dataclasses.replace(sparse, seq=1)]
    assert got[0].start_time is not None and got[0].start_time.tzinfo is UTC
    assert got[0].start_time.hour == 0 and isinstance(got[0].decode_ns, tuple)
    assert got[1].start_time is None


def test_seq_is_contiguous_across_batches(
    store: Store, profile: Profile, make_sample: MakeSample
) -> None:
    assert store.append_samples(profile.id, "a", [make_sample(i) for i in range(3)]) == 3
    assert store.append_samples(profile.id, "b", [make_sample(i) for i in range(3, 5)]) == 2
    got = store.all_samples(profile.id)
    assert [s.seq for s in got] == [0, 1, 2, 3, 4]
    assert [s.prompt_tokens for s in got] == [16 + i for i in range(5)]
    assert store.count_samples(profile.id) == 5


def test_replayed_batch_is_not_duplicated(
    store: Store, profile: Profile, make_sample: MakeSample
) -> None:
    batch = [make_sample(i) for i in range(4)]
    assert store.append_samples(profile.id, "b1", batch) == 4
    assert store.append_samples(profile.id, "b1", batch) == 4
    assert store.append_samples(profile.id, "b1", tuple(batch)) == 4
    assert store.count_samples(profile.id) == 4
    # a replay after the profile finished still answers
    store.update_profile(dataclasses.replace(profile, state=ProfileState.SUCCEEDED))
    assert store.append_samples(profile.id, "b1", batch) == 4


@pytest.mark.parametrize(
    "changed",
    [
        lambda b: b[:2],
        lambda b: [*b, b[0]],
        lambda b: [dataclasses.replace(b[0], prefill_ns=1), *b[1:]],
        lambda b: [dataclasses.replace(b[0], contention=ContentionObservation()), *b[1:]],
    ],
)
def test_batch_id_reused_with_other_samples(
    store: Store,
    profile: Profile,
    make_sample: MakeSample,
    changed: Callable[[list[Sample]], list[Sample]],
) -> None:
    batch = [make_sample(i) for i in range(3)]
    store.append_samples(profile.id, "b1", batch)
    with pytest.raises(AlreadyExists) as info:
        store.append_samples(profile.id, "b1", changed(batch))
    assert (info.value.reason, info.value.field) == ("BATCH_ID_REUSED", "batch_id")
    assert store.all_samples(profile.id) == [
        dataclasses.replace(s, seq=i) for i, s in enumerate(batch)
    ]


def test_batch_ids_are_per_profile(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample
) -> None:
    p1, _ = store.create_profile(make_profile())
    p2, _ = store.create_profile(make_profile())
    store.append_samples(p1.id, "b", [make_sample(1)])
    store.append_samples(p2.id, "b", [make_sample(2), make_sample(3)])
    assert [s.seq for s in store.all_samples(p2.id)] == [0, 1]
    assert store.count_samples(p1.id) == 1


def test_empty_batch(store: Store, profile: Profile, make_sample: MakeSample) -> None:
    assert store.append_samples(profile.id, "empty", []) == 0
    assert store.append_samples(profile.id, "empty", []) == 0
    with pytest.raises(AlreadyExists):
        store.append_samples(profile.id, "empty", [make_sample()])
    assert store.count_samples(profile.id) == 0


def test_unknown_profile(store: Store, make_sample: MakeSample) -> None:
    for call in (
        lambda: store.append_samples("prof_nope", "b", [make_sample()]),
        lambda: store.list_samples("prof_nope", 0, ""),
        lambda: store.all_samples("prof_nope"),
        lambda: store.count_samples("prof_nope"),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert (info.value.reason, info.value.field) == ("PROFILE_NOT_FOUND", "profile_id")


def test_finished_profile_takes_no_new_batches(
    store: Store, profile: Profile, make_sample: MakeSample
) -> None:
    store.update_profile(dataclasses.replace(profile, state=ProfileState.FAILED))
    with pytest.raises(FailedPrecondition) as info:
        store.append_samples(profile.id, "late", [make_sample()])
    assert (info.value.reason, info.value.field) == ("PROFILE_TERMINAL", "profile_id")
    assert store.count_samples(profile.id) == 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prefill_ns": -1}, "samples[1].prefill_ns"),
        ({"total_ns": 2**63}, "samples[1].total_ns"),
        ({"decode_ns": (1, -2)}, "samples[1].decode_ns"),
        ({"decode_ns": (1.5,)}, "samples[1].decode_ns"),
        ({"decode_ns": "12"}, "samples[1].decode_ns"),
        ({"batch_size": 0}, "samples[1].batch_size"),
        ({"prompt_tokens": True}, "samples[1].prompt_tokens"),
        ({"output_tokens": 2.0}, "samples[1].output_tokens"),
        ({"start_time": datetime(2026, 1, 1)}, "samples[1].start_time"),
        ({"flag": "weird"}, "samples[1].flag"),
        ({"heldout": 1}, "samples[1].heldout"),
        (
            {"contention": ContentionObservation(energy_j=float("nan"))},
            "samples[1].contention.energy_j",
        ),
    ],
)
def test_invalid_sample_rejects_whole_batch(
    store: Store,
    profile: Profile,
    make_sample: MakeSample,
    changes: dict[str, object],
    field: str,
) -> None:
    bad = dataclasses.replace(make_sample(1), **changes)
    with pytest.raises(InvalidArgument) as info:
        store.append_samples(profile.id, "b", [make_sample(0), bad, make_sample(2)])
    assert info.value.field == field
    assert store.count_samples(profile.id) == 0
    # the batch id was not consumed: the corrected batch goes in
    assert store.append_samples(profile.id, "b", [make_sample(0), make_sample(1)]) == 2


@pytest.mark.parametrize(
    ("profile_id", "batch_id", "field"),
    [("", "b", "profile_id"), ("bad id", "b", "profile_id"), ("p", "", "batch_id")],
)
def test_invalid_ids(
    store: Store, make_sample: MakeSample, profile_id: str, batch_id: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        store.append_samples(profile_id, batch_id, [make_sample()])
    assert info.value.field == field
    assert info.value.reason == ("BATCH_ID_INVALID" if field == "batch_id" else "ID_INVALID")


def test_numpy_like_integers_are_accepted(store: Store, profile: Profile) -> None:
    class Index:  # what numpy.int64 looks like to the store: __index__, not int
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    s = Sample(
        prompt_tokens=Index(3),
        output_tokens=2,
        prefill_ns=Index(10),
        decode_ns=(Index(5),),
        total_ns=15,
    )
    store.append_samples(profile.id, "b", [s])
    got = store.all_samples(profile.id)[0]
    assert (got.prompt_tokens, got.prefill_ns, got.decode_ns) == (3, 10, (5,))


def test_list_samples_pages_in_seq_order(
    store: Store, profile: Profile, make_sample: MakeSample
) -> None:
    for b in range(4):
        store.append_samples(profile.id, f"b{b}", [make_sample(b * 5 + i) for i in range(5)])
    seqs: list[int] = []
    token = ""
    while True:
        page, token = store.list_samples(profile.id, 6, token)
        assert len(page) <= 6
        seqs += [s.seq for s in page]
        if not token:
            break
    assert seqs == list(range(20))
    everything, token = store.list_samples(profile.id, 0, "")
    assert len(everything) == 20 and token == ""


def test_sample_page_token_is_bound_to_its_profile(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample
) -> None:
    p1, _ = store.create_profile(make_profile())
    p2, _ = store.create_profile(make_profile())
    store.append_samples(p1.id, "b", [make_sample(i) for i in range(3)])
    _, token = store.list_samples(p1.id, 1, "")
    with pytest.raises(InvalidArgument) as info:
        store.list_samples(p2.id, 1, token)
    assert (info.value.reason, info.value.field) == ("PAGE_TOKEN_INVALID", "page_token")


def test_concurrent_appends_from_threads(
    store: Store, profile: Profile, make_sample: MakeSample
) -> None:
    """8 threads x 6 batches x 5 samples, each batch also replayed by a second thread:
    every batch lands once, seq is 0..N-1 and each batch's samples are contiguous."""
    threads_n, batches_n, size = 8, 6, 5
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        barrier.wait()
        try:
            for b in range(batches_n):
                for owner in (t, (t + 1) % threads_n):  # own batch, then a neighbour's replay
                    batch = [make_sample(owner * 1000 + b * 10 + i) for i in range(size)]
                    assert store.append_samples(profile.id, f"t{owner}-b{b}", batch) == size
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    got = store.all_samples(profile.id)
    assert [s.seq for s in got] == list(range(threads_n * batches_n * size))
    for start in range(0, len(got), size):  # batches are contiguous runs
        keys = {(s.prompt_tokens - 16) // 10 for s in got[start : start + size]}
        assert len(keys) == 1
