"""Riding out outages of the store and of serving (runner and manager), on a fake clock.

The store is the real one (SQLite in memory) behind `FlakyStore`, a wrapper that fails on
cue: a real store cannot be told to go down for a given stretch of (fake) time, or to lose
the answer to an append it has committed. Serving is a stand-in (`RestartingServing`) for
the same reason: it "dies" at a given call and comes back, without our model, once the fake
clock reaches a given time. The runner's and the manager's clock and sleep are a
`FakeTime`, so backoff waits take no real time (each also yields the CPU for a millisecond,
so that a background retry loop does not spin while a test looks on).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import ModelRef, Profile, ProfileState, Sample, StackSpec
from idealrt.core.errors import FailedPrecondition, NotFound, Unavailable
from idealrt.core.model_spec import ModelSpec
from idealrt.core.serving_contract import GenerationResult
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.runner import run_profile
from idealrt.services.profiler.serving_target import ServingTarget
from idealrt.services.store.repository import Store

# every test with store writes in background and inline (conftest `write_mode`)
pytestmark = pytest.mark.usefixtures("write_mode")


class FakeTime:
    """A clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self.t

    def sleep(self, event: threading.Event, seconds: float) -> bool:
        if event.wait(0.001):  # yields the CPU; a set event ends the wait at once
            return True
        with self._lock:
            self.sleeps.append(seconds)
            self.t += seconds
        return event.is_set()


class FlakyStore:
    """The real store; appends, updates and reads fail UNAVAILABLE while `down()` is true.
    `lose_ack(i)`: append call i is committed, and then its answer is lost."""

    def __init__(self, store: Store, down: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self.down = down
        self.lose_ack: Callable[[int], bool] = lambda i: False
        self.fail_update: Callable[[Profile], bool] = lambda p: False
        self.appends: list[tuple[str, int, bool]] = []  # (batch id, size, answered)
        self.updates: list[tuple[ProfileState, bool]] = []  # (state, taken)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _unavailable(self) -> Unavailable:
        return Unavailable("STORE_UNAVAILABLE", "the store is down (on cue)")

    def append_samples(self, profile_id: str, batch_id: str, samples: Any) -> int:
        i = len(self.appends)
        if self.down():
            self.appends.append((batch_id, len(samples), False))
            raise self._unavailable()
        n = self.store.append_samples(profile_id, batch_id, samples)
        if self.lose_ack(i):
            self.appends.append((batch_id, len(samples), False))
            raise Unavailable("UNAVAILABLE", "connection reset after the commit (on cue)")
        self.appends.append((batch_id, len(samples), True))
        return n

    def update_profile(self, profile: Profile) -> object:
        if self.down() or self.fail_update(profile):
            self.updates.append((profile.state, False))
            raise self._unavailable()
        self.updates.append((profile.state, True))
        return self.store.update_profile(profile)

    def all_samples(self, profile_id: str) -> list[Sample]:
        if self.down():
            raise self._unavailable()
        return self.store.all_samples(profile_id)


def options(kit: Any, lease_dir: Path, ft: FakeTime, **kw: Any) -> Any:
    return kit.quiet_options(lease_dir, clock=ft.clock, sleep=ft.sleep, **kw)


def run(
    kit: Any, sink: Any, lease_dir: Path, profile: Profile, target: Any, ft: FakeTime, **kw: Any
) -> Profile:
    return run_profile(
        profile,
        target,
        sink,
        cancel=threading.Event(),
        on_progress=lambda p: None,
        options=options(kit, lease_dir, ft, **kw),
    )


# ------------------------------------------------------------ the store


def test_a_store_outage_within_the_window_loses_and_repeats_nothing(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    ft = FakeTime()
    outage: dict[str, float | None] = {"from": None}
    sink = FlakyStore(store, down=lambda: outage["from"] is not None and ft.t < 40.0)
    down_calls: list[int] = []

    def on_generate(i: int) -> None:
        if i == 6:
            outage["from"] = ft.t  # the store goes down during the 7th generation
        if sink.down():
            down_calls.append(i)

    lost: dict[str, int | None] = {"i": None}

    def lose_the_first_answer_after_the_outage(i: int) -> bool:
        if outage["from"] is None or lost["i"] is not None:
            return False
        lost["i"] = i  # committed, and the answer lost: the run cannot know it landed
        return True

    sink.lose_ack = lose_the_first_answer_after_the_outage
    profile = kit.make_profile(store)  # 4 configurations x 3 repeats, 1 warm-up each
    target = kit.SyntheticTarget(on_generate=on_generate)
    final = run(kit, sink, lease_dir, profile, target, ft, batch_samples=2, max_buffered_samples=5)
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert ft.t >= 40.0 and ft.t < 300.0  # rode it out, within the window
    counts = kit.ok_per_repeat(store, profile.id)
    assert len(counts) == 12 and set(counts.values()) == {1}
    assert len(target.calls) == 4 + 12  # nothing measured twice
    seqs = [s.seq for s in store.all_samples(profile.id)]
    assert seqs == list(range(16))  # every measured sample stored, once
    # measuring went on while the store was down, up to the buffer's bound, then paused
    assert 0 < len(down_calls) <= 5
    # a batch whose answer was lost was sent again under the same id and taken once
    ids = [a[0] for a in sink.appends]
    assert lost["i"] is not None and ids.count(ids[lost["i"]]) >= 2
    answered = [a[0] for a in sink.appends if a[2]]
    assert len(answered) == len(set(answered))
    assert final.completed_samples == final.total_samples == 12
    assert final.provenance.entries["outage.store.count"] == "1"
    assert ft.sleeps  # backoff waits, on the fake clock


def test_a_store_outage_longer_than_the_window_fails_and_is_saved_once_back(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    ft = FakeTime()
    back = threading.Event()
    going = threading.Event()
    sink = FlakyStore(store, down=lambda: going.is_set() and not back.is_set())

    def factory(profile: Profile) -> Any:
        return kit.SyntheticTarget(on_generate=lambda i: going.set() if i == 6 else None)

    m = ProfileManager(
        sink, factory, lease_dir, options=options(kit, lease_dir, ft, outage_window_s=60.0)
    )
    try:
        p = m.create(kit.make_profile())
        final = list(m.watch(p.id, timeout=30))[-1]
        assert final.state == ProfileState.FAILED
        assert final.error.startswith("STORE_UNAVAILABLE: ")
        assert ft.t >= 60.0
        # the store does not have it yet; the manager answers from memory meanwhile
        assert m.get(p.id).state == ProfileState.FAILED
        assert not store.get_profile(p.id).state.terminal
        kit.wait_until(lambda: len([u for u in sink.updates if u[0].terminal]) >= 3, "retries")
        back.set()
        kit.wait_until(lambda: store.get_profile(p.id).state.terminal, "FAILED stored")
        saved = store.get_profile(p.id)
        assert saved.state == ProfileState.FAILED
        assert saved.error.startswith("STORE_UNAVAILABLE: ")
        kit.wait_until(lambda: m.get(p.id) == saved, "the manager forgets it once stored")
        counts = kit.ok_per_repeat(store, p.id)
        assert set(counts.values()) <= {1}
    finally:
        back.set()
        m.shutdown(timeout=20)


def test_a_failing_final_save_is_retried_until_it_lands(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    ft = FakeTime()
    sink = FlakyStore(store)
    refusals = {"left": 4}

    def fail_update(profile: Profile) -> bool:
        if profile.state.terminal and refusals["left"] > 0:
            refusals["left"] -= 1
            return True
        return False

    sink.fail_update = fail_update
    m = ProfileManager(
        sink, lambda p: kit.SyntheticTarget(), lease_dir, options=options(kit, lease_dir, ft)
    )
    try:
        p = m.create(kit.make_profile())
        assert list(m.watch(p.id, timeout=30))[-1].state == ProfileState.SUCCEEDED
        kit.wait_until(lambda: store.get_profile(p.id).state.terminal, "SUCCEEDED stored")
        assert store.get_profile(p.id).state == ProfileState.SUCCEEDED
        terminal = [taken for state, taken in sink.updates if state.terminal]
        assert terminal == [False] * 4 + [True]
        assert len(ft.sleeps) >= 4  # a backoff wait before every retry: no busy loop
        assert all(0 <= s <= 30.0 for s in ft.sleeps)
    finally:
        m.shutdown(timeout=20)


def test_cancel_while_waiting_for_the_store(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    ft = FakeTime()
    cancel = threading.Event()
    going = threading.Event()
    sink = FlakyStore(store, down=going.is_set)  # down once measuring has begun
    waits = {"n": 0}

    def sleep(event: threading.Event, seconds: float) -> bool:
        waits["n"] += 1
        if waits["n"] == 3:
            cancel.set()  # the user cancels while the run waits for the store
        return ft.sleep(event, seconds)

    profile = kit.make_profile(store)
    final = run_profile(
        profile,
        kit.SyntheticTarget(on_generate=lambda i: going.set()),
        sink,
        cancel=cancel,
        on_progress=lambda p: None,
        options=kit.quiet_options(
            lease_dir, clock=ft.clock, sleep=sleep, batch_samples=2, max_buffered_samples=4
        ),
    )
    assert final.state == ProfileState.CANCELLED
    assert final.provenance.entries["store.unstored_samples"] == "4"
    assert store.count_samples(profile.id) == 0


# ------------------------------------------------------------ serving


@dataclasses.dataclass(frozen=True)
class Loaded:
    model_id: str
    spec: ModelSpec


class RestartingServing:
    """A serving API that dies at generate call `die_at` and is back, having lost every
    model, once `back()` is true; meanwhile every call is UNAVAILABLE."""

    def __init__(
        self,
        spec: ModelSpec,
        die_at: int,
        back: Callable[[], bool],
        error: Exception | None = None,
    ) -> None:
        self.spec = spec
        self.die_at = die_at
        self.back = back
        self.error = error or Unavailable("UNAVAILABLE", "failed to connect to all addresses")
        self.dead = False
        self.models: set[str] = set()
        self.loads: list[tuple[ModelRef, StackSpec, int, str]] = []
        self.generates: list[tuple[str, int, int, int]] = []  # model id, p, o, seed
        self.answered: list[tuple[str, int, int, int]] = []
        self.unloaded: list[str] = []

    def _check(self) -> None:
        if self.dead and self.back():
            self.dead = False
            self.models.clear()  # a restarted process has no models
        if self.dead:
            raise self.error

    def load(
        self, model: ModelRef, stack: StackSpec, max_context: int = 0, request_id: str = ""
    ) -> Loaded:
        self._check()
        self.loads.append((model, stack, max_context, request_id))
        model_id = f"m{len(self.loads)}"
        self.models.add(model_id)
        return Loaded(model_id, self.spec)

    def generate(
        self,
        model_id: str,
        *,
        prompt_ids: Any = None,
        prompt_length: int,
        prompt_seed: int,
        output_tokens: int,
        batch_size: int = 1,
    ) -> GenerationResult:
        call = (model_id, prompt_length, output_tokens, prompt_seed)
        self.generates.append(call)
        if len(self.generates) - 1 == self.die_at:
            self.dead = True
        self._check()
        if model_id not in self.models:
            raise NotFound("MODEL_NOT_FOUND", f"no model {model_id}")
        self.answered.append(call)
        decode = tuple(100 + i for i in range(output_tokens - 1))
        return GenerationResult(
            prompt_length,
            output_tokens,
            tuple(range(output_tokens)),
            1000 + prompt_length,
            decode,
            1000 + prompt_length + sum(decode),
            datetime.now(UTC),
            batch_size,
        )

    def unload(self, model_id: str) -> None:
        self._check()
        self.unloaded.append(model_id)
        if model_id not in self.models:
            raise NotFound("MODEL_NOT_FOUND", f"no model {model_id}")
        self.models.discard(model_id)


def serving_target(kit: Any, serving: RestartingServing, profile: Profile) -> ServingTarget:
    return ServingTarget(serving, profile, retry_backoff_s=0.0, max_reconnects=2)


def test_a_serving_restart_within_the_window_reloads_and_measures_each_repeat_once(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    ft = FakeTime()
    profile = kit.make_profile(store)
    serving = RestartingServing(kit.TINY_SPEC, die_at=9, back=lambda: ft.t >= 30.0)
    final = run(kit, store, lease_dir, profile, serving_target(kit, serving, profile), ft)
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert 30.0 <= ft.t < 300.0
    counts = kit.ok_per_repeat(store, profile.id)
    assert len(counts) == 12 and set(counts.values()) == {1}
    # the interrupted generation was made again, same (p, o, seed), and answered once
    interrupted = serving.generates[9][1:]
    assert [a[1:] for a in serving.answered].count(interrupted) == 1
    assert len(serving.answered) == 4 + 12
    # reloaded: the same model, stack and context, and the new model id used from then on
    assert len(serving.loads) == 2
    assert serving.loads[0][:3] == serving.loads[1][:3]
    assert serving.loads[1][3] != serving.loads[0][3]  # a fresh request id
    assert [a[0] for a in serving.answered] == ["m1"] * 9 + ["m2"] * 7
    assert "m1" in serving.unloaded  # the lost load, unloaded best effort
    assert final.provenance.entries["outage.target.count"] == "1"


def test_a_serving_outage_longer_than_the_window_fails(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    ft = FakeTime()
    profile = kit.make_profile(store)
    serving = RestartingServing(kit.TINY_SPEC, die_at=5, back=lambda: False)
    final = run(
        kit,
        store,
        lease_dir,
        profile,
        serving_target(kit, serving, profile),
        ft,
        outage_window_s=20.0,
    )
    assert final.state == ProfileState.FAILED
    assert final.error.startswith("SERVING_UNAVAILABLE: ")
    assert ft.t >= 20.0
    assert store.count_samples(profile.id) == 5  # what was measured is kept


def test_failed_precondition_from_serving_is_not_retried(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    ft = FakeTime()
    profile = kit.make_profile(store)
    error = FailedPrecondition(
        "DEVICE_UNAVAILABLE", "device 'cuda' requested but CUDA is unavailable"
    )
    serving = RestartingServing(kit.TINY_SPEC, die_at=0, back=lambda: False, error=error)
    serving.dead = True  # dead from the start: load() answers FAILED_PRECONDITION
    final = run(kit, store, lease_dir, profile, serving_target(kit, serving, profile), ft)
    assert final.state == ProfileState.FAILED
    assert final.error.startswith("DEVICE_UNAVAILABLE: ")
    assert ft.sleeps == [] and serving.generates == []
