"""The run hands the adaptive planner the samples it already holds (those it measured, and
those of a resumed run read once at its start) instead of reading every sample back from
the sink before each fit; the planner sees exactly what the sink stored, flags included,
so it adds the same prompt sizes.

`CurveTarget` is test_adaptive's deterministic stand-in, here with a convex alpha(p) that
never straightens (so the planner fits three times); `CountingSink` is the real in-memory
store with a log of `all_samples` calls.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import (
    ContentionObservation,
    Profile,
    ProfileState,
    Sample,
    SampleFlag,
)
from idealrt.services.profiler import adaptive as A
from idealrt.services.profiler.runner import run_profile
from idealrt.services.store.repository import Store

from .test_adaptive import CurveTarget, convex

GRID = (8, 32, 64, 160, 256)
OUTPUTS = (2, 6)
# calls: 10 warm-ups, 20 grid samples (2 repeats), then the added sizes' rounds
CONTENDED_CALLS = frozenset({12, 33})  # one in the grid, one in the first added size
ADDED = [232, 119]  # what the run adds when the planner reads every sample back from the sink


class CountingSink:
    """The store as the run's sink, logging each all_samples call in `events`."""

    def __init__(self, store: Store, events: list[str]) -> None:
        self.store = store
        self.events = events

    def append_samples(self, profile_id: str, batch_id: str, samples: Sequence[Sample]) -> int:
        return self.store.append_samples(profile_id, batch_id, samples)

    def all_samples(self, profile_id: str) -> list[Sample]:
        self.events.append("all_samples")
        return self.store.all_samples(profile_id)

    def count_samples(self, profile_id: str) -> int:
        return self.store.count_samples(profile_id)


class PlannerSpy:
    """Logs each AdaptivePlanner.next_size call in `events`, keeping the samples it was
    given next to what the store then holds for `profile_id`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Store, events: list[str]) -> None:
        self.store = store
        self.events = events
        self.profile_id = ""
        self.seen: list[tuple[list[Sample], list[Sample]]] = []
        real = A.AdaptivePlanner.next_size

        def next_size(
            planner: A.AdaptivePlanner, samples: Sequence[Sample], *, budget_spent: bool = False
        ) -> int | None:
            self.events.append("next_size")
            self.seen.append((list(samples), self.store.all_samples(self.profile_id)))
            return real(planner, samples, budget_spent=budget_spent)

        monkeypatch.setattr(A.AdaptivePlanner, "next_size", next_size)


def run(
    kit: Any,
    sink: CountingSink,
    lease_dir: Path,
    profile: Profile,
    target: CurveTarget,
    cancel: threading.Event | None = None,
    **opts: Any,
) -> Profile:
    monitors = kit.ScriptedMonitors(
        lambda i: ContentionObservation(foreign_cpu_s=0.5 if i in CONTENDED_CALLS else 0.0)
    )
    return run_profile(
        profile,
        target,
        sink,
        cancel=cancel or threading.Event(),
        on_progress=lambda p: None,
        options=kit.quiet_options(lease_dir, monitors=lambda p, env: monitors, **opts),
    )


def adaptive_profile(kit: Any, store: Store, spy: PlannerSpy) -> Profile:
    """The adaptive profile of both tests, its id given to the planner's spy."""
    profile: Profile = kit.make_profile(
        store,
        prompt_tokens=GRID,
        output_tokens=OUTPUTS,
        repeats=2,
        adaptive_target_rel=0.001,
        adaptive_max_prompt_sizes=2,
    )
    spy.profile_id = profile.id
    return profile


def added(profile: Profile) -> list[int]:
    return [int(x) for x in profile.provenance.entries["adaptive.added"].split(",") if x]


def assert_planner_saw_the_store(spy: PlannerSpy, fits: int) -> None:
    assert len(spy.seen) == fits
    for given, stored in spy.seen:
        assert given == stored  # same samples, same order, flags and seq included
    last = spy.seen[-1][0]
    assert {s.flag for s in last} == {SampleFlag.OK, SampleFlag.WARMUP, SampleFlag.CONTENDED}


def test_the_planner_gets_the_samples_the_run_holds(  # type: ignore[no-untyped-def]
    kit, store, lease_dir, monkeypatch
) -> None:
    events: list[str] = []
    spy = PlannerSpy(monkeypatch, store, events)
    profile = adaptive_profile(kit, store, spy)
    final = run(kit, CountingSink(store, events), lease_dir, profile, CurveTarget(convex))
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert final.provenance.entries["adaptive.stop"] == "max_sizes"
    # the sink is read once, when the run starts; never again for the planner
    assert events == ["all_samples", "next_size", "next_size", "next_size"]
    assert_planner_saw_the_store(spy, fits=3)
    assert added(final) == ADDED


def test_a_resumed_run_reads_the_stored_samples_once(  # type: ignore[no-untyped-def]
    kit, store, lease_dir, monkeypatch
) -> None:
    events: list[str] = []
    spy = PlannerSpy(monkeypatch, store, events)
    profile = adaptive_profile(kit, store, spy)
    cancel = threading.Event()
    first = CurveTarget(convex, on_generate=lambda i: cancel.set() if i == 35 else None)
    sink = CountingSink(store, events)
    stopped = run(kit, sink, lease_dir, profile, first, cancel=cancel, batch_samples=4)
    assert stopped.state == ProfileState.CANCELLED
    assert added(stopped) == ADDED[:1]
    events.clear()
    spy.seen.clear()
    final = run(kit, sink, lease_dir, profile, CurveTarget(convex))
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert final.provenance.entries["profile.resumed_adaptive_sizes"] == str(ADDED[0])
    assert events == ["all_samples", "next_size", "next_size"]
    assert_planner_saw_the_store(spy, fits=2)
    assert added(final) == ADDED
