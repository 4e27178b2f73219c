"""Store writes off the measuring thread: a store call that does not return (slow, or hung
until its deadline) holds up neither the next generation nor the next sample.

The store is the real one (SQLite in memory) behind wrappers that hold chosen calls on an
event until the test releases them: a real store cannot be told to take this long for this
call. No assertion is on time: the tests count generations made while a store call is
held (the synthetic target's calls), which the old code (appends and progress writes on
the measuring thread) holds at the batch that blocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from idealrt.core.domain import Profile, ProfileState
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.runner import run_profile
from idealrt.services.store.repository import Store


class HeldStore:
    """The real store; the calls `hold` picks wait on `release` (after setting `held`)."""

    def __init__(self, store: Store, hold: Callable[[str, Any], bool]) -> None:
        self.store = store
        self.hold = hold
        self.held = threading.Event()
        self.release = threading.Event()
        self.updates: list[ProfileState] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _maybe_hold(self, call: str, arg: Any) -> None:
        if self.hold(call, arg):
            self.held.set()
            assert self.release.wait(30), "never released"

    def append_samples(self, profile_id: str, batch_id: str, samples: Any) -> int:
        self._maybe_hold("append", batch_id)
        return self.store.append_samples(profile_id, batch_id, samples)

    def update_profile(self, profile: Profile) -> object:
        self._maybe_hold("update", profile)
        self.updates.append(profile.state)
        return self.store.update_profile(profile)


def test_measuring_goes_on_while_an_append_is_held_up_to_the_buffer_bound(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    profile = kit.make_profile(store)  # 4 configurations x 3 repeats, 1 warm-up each: 16
    first_batch = f"{profile.id}-b0"
    sink = HeldStore(store, lambda call, arg: call == "append" and arg == first_batch)
    target = kit.SyntheticTarget()
    result: list[Profile] = []
    runner = threading.Thread(
        target=lambda: result.append(
            run_profile(
                profile,
                target,
                sink,
                cancel=threading.Event(),
                on_progress=lambda p: None,
                options=kit.quiet_options(lease_dir, batch_samples=2, max_buffered_samples=6),
            )
        )
    )
    runner.start()
    try:
        assert sink.held.wait(20)
        # the first batch (2 samples) is held in the store; measuring goes on until 6
        # samples are unstored, and there it waits
        kit.wait_until(lambda: len(target.calls) == 6, "6 generations while the append is held")
        time.sleep(0.2)  # give a run that ignored the bound the chance to show it
        assert len(target.calls) == 6
        assert store.count_samples(profile.id) == 0
    finally:
        sink.release.set()
        runner.join(30)
    assert not runner.is_alive()
    final = result[0]
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert len(target.calls) == 16
    assert [s.seq for s in store.all_samples(profile.id)] == list(range(16))
    counts = kit.ok_per_repeat(store, profile.id)
    assert len(counts) == 12 and set(counts.values()) == {1}


def test_a_held_progress_write_does_not_hold_the_run_nor_land_after_the_end(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    """The first RUNNING progress write is held: the run measures everything meanwhile;
    the terminal state waits for that write, is written after it, and is what the store
    keeps (a stale RUNNING never overwrites it)."""
    hold_once = {"done": False}

    def hold(call: str, arg: Any) -> bool:
        if call == "update" and arg.state == ProfileState.RUNNING and not hold_once["done"]:
            hold_once["done"] = True
            return True
        return False

    sink = HeldStore(store, hold)
    targets: list[Any] = []

    def factory(profile: Profile) -> Any:
        targets.append(kit.SyntheticTarget())
        return targets[-1]

    m = ProfileManager(sink, factory, lease_dir, options=kit.quiet_options(lease_dir))
    try:
        p = m.create(kit.make_profile())
        assert sink.held.wait(20)
        kit.wait_until(lambda: bool(targets) and len(targets[0].calls) == 16, "every generation")
        assert not store.get_profile(p.id).state.terminal  # the end waits for the write
        sink.release.set()
        final = list(m.watch(p.id, timeout=30))[-1]
        assert final.state == ProfileState.SUCCEEDED, final.error
        kit.wait_until(lambda: store.get_profile(p.id).state.terminal, "SUCCEEDED stored")
        assert store.get_profile(p.id).state == ProfileState.SUCCEEDED
        assert sink.updates[-1] == ProfileState.SUCCEEDED
        assert sink.updates.count(ProfileState.SUCCEEDED) == 1
    finally:
        sink.release.set()
        m.shutdown(timeout=20)


def test_inline_writes_store_between_samples_on_the_measuring_thread(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    """background_writes=False (the embedded suite, whose store and serving share the
    profiler's process): a held append holds the run at the batch that blocked, because
    the write is made between samples, never beside a timed generation."""
    profile = kit.make_profile(store)
    first_batch = f"{profile.id}-b0"
    sink = HeldStore(store, lambda call, arg: call == "append" and arg == first_batch)
    target = kit.SyntheticTarget()
    result: list[Profile] = []
    options = kit.quiet_options(
        lease_dir, batch_samples=2, max_buffered_samples=6, background_writes=False
    )
    runner = threading.Thread(
        target=lambda: result.append(
            run_profile(
                profile,
                target,
                sink,
                cancel=threading.Event(),
                on_progress=lambda p: None,
                options=options,
            )
        )
    )
    runner.start()
    try:
        assert sink.held.wait(20)
        time.sleep(0.2)  # give a run that wrote on another thread the chance to show it
        assert len(target.calls) == 2
        assert [t.name for t in threading.enumerate() if t.name.startswith("profiler-writer")] == []
    finally:
        sink.release.set()
        runner.join(30)
    assert not runner.is_alive()
    assert result[0].state == ProfileState.SUCCEEDED, result[0].error
    assert [s.seq for s in store.all_samples(profile.id)] == list(range(16))
