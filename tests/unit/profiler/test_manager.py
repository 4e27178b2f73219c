"""ProfileManager life cycle with the real store (SQLite in memory) and the synthetic target
(see conftest); a gate event holds a target inside generate() to observe running states."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import Profile, ProfileState, SampleFlag, StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument, NotFound
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.runner import run_profile


class Factory:
    """target_factory recording what it built; `gated` targets block in generate() until
    the gate is set."""

    def __init__(self, kit: Any, gate: threading.Event | None = None) -> None:
        self.kit = kit
        self.gate = gate
        self.entered = threading.Event()  # a target is inside generate()
        self.built: list[str] = []
        self.targets: list[Any] = []

    def __call__(self, profile: Profile) -> Any:
        self.built.append(profile.id)
        gate = self.gate
        hook: Callable[[int], None] | None = None
        if gate is not None:

            def hook(i: int) -> None:
                self.entered.set()
                gate.wait(30)

        target = self.kit.SyntheticTarget(on_generate=hook)
        self.targets.append(target)
        return target


def manager(kit: Any, store: Any, lease_dir: Path, factory: Factory, **kw: Any) -> ProfileManager:
    return ProfileManager(store, factory, lease_dir, options=kit.quiet_options(lease_dir), **kw)


def wait_for(
    m: ProfileManager, profile_id: str, pred: Callable[[Profile], bool], timeout: float = 20
) -> Profile:
    last = None
    for snap in m.watch(profile_id, timeout=timeout):
        last = snap
        if pred(snap):
            return snap
    raise AssertionError(f"condition not reached; last snapshot {last}")


def new(kit: Any, **plan: Any) -> Profile:
    return kit.make_profile(**plan)


def test_create_runs_to_success_and_watch_follows(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    factory = Factory(kit)
    m = manager(kit, store, lease_dir, factory)
    try:
        created = m.create(new(kit))
        assert created.id and created.total_samples == 12
        snaps = list(m.watch(created.id, timeout=30))
        assert snaps[-1].state == ProfileState.SUCCEEDED
        done = [s.completed_samples for s in snaps]
        assert done == sorted(done)
        stored = store.get_profile(created.id)
        assert stored.state == ProfileState.SUCCEEDED and stored.completed_samples == 12
        assert stored.provenance.entries["stopping.reason"] == "repeats"
        assert m.get(created.id).state == ProfileState.SUCCEEDED
        assert list(m.watch(created.id)) == [m.get(created.id)]  # finished: one snapshot
    finally:
        m.shutdown()


def test_create_is_idempotent_by_request_id(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    factory = Factory(kit)
    m = manager(kit, store, lease_dir, factory)
    try:
        a = m.create(dataclasses.replace(new(kit), request_id="req-1"))
        b = m.create(dataclasses.replace(new(kit), request_id="req-1"))
        assert a.id == b.id
        wait_for(m, a.id, lambda p: p.state.terminal)
        assert factory.built == [a.id]
    finally:
        m.shutdown()


def test_invalid_plan_is_rejected_before_storing(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    m = manager(kit, store, lease_dir, Factory(kit))
    with pytest.raises(InvalidArgument) as info:
        m.create(new(kit, repeats=0))
    assert info.value.field == "plan.repeats"
    assert store.list_profiles(10, "")[0] == []
    m.shutdown()


def test_cancel_queued_running_terminal_unknown(kit, store, lease_dir, gate) -> None:  # type: ignore[no-untyped-def]
    factory = Factory(kit, gate)
    m = manager(kit, store, lease_dir, factory, max_concurrent=1)
    try:
        first = m.create(new(kit))
        second = m.create(new(kit))
        assert factory.entered.wait(20)
        queued = m.cancel(second.id)
        assert queued.state == ProfileState.CANCELLED
        assert store.get_profile(second.id).state == ProfileState.CANCELLED
        m.cancel(first.id)
        gate.set()
        final = wait_for(m, first.id, lambda p: p.state.terminal)
        assert final.state == ProfileState.CANCELLED
        assert store.count_samples(first.id) == len(factory.targets[0].calls) >= 1
        assert factory.built == [first.id]  # the queued one never started
        with pytest.raises(FailedPrecondition) as info:
            m.cancel(first.id)
        assert info.value.reason == "PROFILE_TERMINAL"
        with pytest.raises(NotFound):
            m.cancel("prof_does_not_exist")
    finally:
        gate.set()
        m.shutdown()


def test_max_concurrent_and_the_device_lease(kit, store, lease_dir, gate) -> None:  # type: ignore[no-untyped-def]
    m = manager(kit, store, lease_dir, Factory(kit, gate), max_concurrent=3)
    try:
        a = m.create(new(kit))
        b = m.create(dataclasses.replace(new(kit), stack=StackSpec(device="cuda:7")))
        c = m.create(new(kit))  # same device as a: waits for its lease
        wait_for(m, a.id, lambda p: p.state == ProfileState.RUNNING)
        wait_for(m, b.id, lambda p: p.state == ProfileState.RUNNING)
        assert m.get(c.id).state == ProfileState.QUEUED
        gate.set()
        for p in (a, b, c):
            assert wait_for(m, p.id, lambda s: s.state.terminal).state == ProfileState.SUCCEEDED
    finally:
        gate.set()
        m.shutdown()


def test_watch_timeout_and_inactive_client(kit, store, lease_dir, gate) -> None:  # type: ignore[no-untyped-def]
    m = manager(kit, store, lease_dir, Factory(kit, gate))
    try:
        p = m.create(new(kit))
        wait_for(m, p.id, lambda s: s.state == ProfileState.RUNNING)
        snaps = list(m.watch(p.id, timeout=0.3))
        assert snaps and not snaps[-1].state.terminal
        gone = list(m.watch(p.id, is_active=lambda: False))
        assert len(gone) == 1
        with pytest.raises(NotFound):
            list(m.watch("prof_nope"))
        items, _ = m.list()
        assert [i.state for i in items if i.id == p.id] == [ProfileState.RUNNING]
    finally:
        gate.set()
        m.shutdown()


def test_resume_unfinished_after_a_crash(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    # A crashed profiler: the profile is RUNNING in the store with part of its samples.
    profile = kit.make_profile(store)
    cancel = threading.Event()
    partial = kit.SyntheticTarget(on_generate=lambda i: cancel.set() if i == 8 else None)
    run_profile(
        profile,
        partial,
        store,
        cancel=cancel,
        on_progress=lambda p: None,
        options=kit.quiet_options(lease_dir),
    )
    store.update_profile(dataclasses.replace(profile, state=ProfileState.RUNNING))
    before = store.count_samples(profile.id)
    factory = Factory(kit)
    m = manager(kit, store, lease_dir, factory)
    try:
        resumed = m.resume_unfinished()
        assert [p.id for p in resumed] == [profile.id]
        final = wait_for(m, profile.id, lambda p: p.state.terminal)
        assert final.state == ProfileState.SUCCEEDED, final.error
        samples = store.all_samples(profile.id)
        ok = Counter((s.prompt_tokens, s.output_tokens) for s in samples if s.flag == SampleFlag.OK)
        assert set(ok.values()) == {3} and len(ok) == 4
        assert len(samples) == before + len(factory.targets[0].calls)
    finally:
        m.shutdown()


def test_shutdown_leaves_running_work_resumable(kit, store, lease_dir, gate) -> None:  # type: ignore[no-untyped-def]
    m = manager(kit, store, lease_dir, Factory(kit, gate))
    p = m.create(new(kit))
    wait_for(m, p.id, lambda s: s.state == ProfileState.RUNNING)
    threading.Timer(0.2, gate.set).start()
    m.shutdown(timeout=20)
    assert store.get_profile(p.id).state == ProfileState.QUEUED
    with pytest.raises(FailedPrecondition):
        m.create(new(kit))
    m2 = manager(kit, store, lease_dir, Factory(kit))
    try:
        assert [x.id for x in m2.resume_unfinished()] == [p.id]
        assert wait_for(m2, p.id, lambda s: s.state.terminal).state == ProfileState.SUCCEEDED
    finally:
        m2.shutdown()


def test_target_factory_failure_fails_the_profile(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    def broken(profile: Profile) -> Any:
        raise InvalidArgument("SERVING_TARGET_REQUIRED", "no serving endpoint")

    m = ProfileManager(store, broken, lease_dir, options=kit.quiet_options(lease_dir))
    try:
        p = m.create(new(kit))
        final = wait_for(m, p.id, lambda s: s.state.terminal)
        assert final.state == ProfileState.FAILED
        assert final.error.startswith("SERVING_TARGET_REQUIRED: ")
        assert store.get_profile(p.id).state == ProfileState.FAILED
    finally:
        m.shutdown()


def test_plan_beyond_the_models_context_is_rejected_at_create(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    factory = Factory(kit)
    m = manager(kit, store, lease_dir, factory)
    try:
        base = new(kit)  # TINY_SPEC: 512 positions; outputs (2, 6)
        too_long = dataclasses.replace(
            base, plan=dataclasses.replace(base.plan, prompt_tokens=(8, 510))
        )
        with pytest.raises(InvalidArgument) as info:
            m.create(too_long)
        assert (info.value.reason, info.value.field) == (
            "PLAN_EXCEEDS_CONTEXT",
            "plan.prompt_tokens",
        )
        assert store.list_profiles(10, "")[0] == [] and factory.built == []
    finally:
        m.shutdown()
