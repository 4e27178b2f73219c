"""Rounds spread over time: plan validation, the schedule, and run_profile waiting for each
round with the synthetic target (see conftest) and the real store.

Time is a fake clock: the cancel event's timed waits advance it instead of blocking (and are
recorded), and every generation takes one fake second, so a test states exactly when each
round must start. One test uses the real clock to show a wait ends as soon as the profile is
cancelled.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import Profile, ProfilePlan, ProfileState, SampleFlag
from idealrt.core.errors import InvalidArgument
from idealrt.services.profiler import plan as P
from idealrt.services.profiler.plan import configurations, round_order
from idealrt.services.profiler.runner import run_profile
from idealrt.services.profiler.schedule import SpreadSchedule, spread_offsets
from idealrt.services.store.repository import Store

SPREAD = 300.0
SEED = 7


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ClockEvent(threading.Event):
    """A cancel event whose timed waits pass on the fake clock instead of blocking."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[tuple[float, float]] = []  # (clock at the start, timeout)

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        assert timeout is not None, "an untimed wait would block for ever"
        self.waits.append((self.clock.t, timeout))
        self.clock.t += timeout
        return self.is_set()


class Timed:
    """Hook for SyntheticTarget(on_generate=...): each generation takes `step` fake seconds;
    records the clock when each one started; optionally cancels at a call index."""

    def __init__(self, clock: FakeClock, step: float = 1.0) -> None:
        self.clock = clock
        self.step = step
        self.starts: list[float] = []
        self.cancel_at: tuple[int, threading.Event] | None = None

    def __call__(self, i: int) -> None:
        self.starts.append(self.clock.t)
        self.clock.t += self.step
        if self.cancel_at is not None and i == self.cancel_at[0]:
            self.cancel_at[1].set()


def run(
    kit: Any, store: Store, lease_dir: Path, profile: Profile, target: Any, cancel: Any, clock: Any
) -> Profile:
    return run_profile(
        profile,
        target,
        store,
        cancel=cancel,
        on_progress=lambda p: None,
        options=kit.quiet_options(lease_dir, clock=clock),
    )


def spread_profile(kit: Any, store: Store, **plan_kw: Any) -> Profile:
    args: dict[str, Any] = {"spread_s": SPREAD, "seed": SEED, "repeats": 3, "warmups": 1}
    args.update(plan_kw)
    return kit.make_profile(store, **args)


def test_each_round_starts_at_its_offset_after_the_warmups(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    cancel = ClockEvent(clock)
    timed = Timed(clock)
    profile = spread_profile(kit, store)  # 4 configurations, 3 rounds, 1 warm-up each
    final = run(
        kit, store, lease_dir, profile, kit.SyntheticTarget(on_generate=timed), cancel, clock
    )
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert timed.starts[:4] == [0.0, 1.0, 2.0, 3.0]  # warm-ups at once, not scheduled
    start = 4.0  # the schedule is anchored when the measured rounds begin
    offsets = spread_offsets(3, SPREAD, seed=SEED)
    for r in range(3):
        block = timed.starts[4 + 4 * r : 8 + 4 * r]
        assert block[0] == pytest.approx(start + offsets[r])
        assert block == pytest.approx([block[0] + k for k in range(4)])  # back to back
    assert [w[0] + w[1] for w in cancel.waits] == pytest.approx([start + o for o in offsets])
    measured = [s for s in store.all_samples(profile.id) if s.flag == SampleFlag.OK]
    configs = configurations(profile.plan)
    assert [(s.prompt_tokens, s.output_tokens, s.repeat) for s in measured] == [
        (c.prompt_tokens, c.output_tokens, r)
        for r in range(3)
        for c in round_order(configs, profile.plan, r)
    ]
    e = final.provenance.entries
    assert e["spread.schedule"].startswith("3 rounds over 300 s")
    assert e["spread.rounds_started"] == "3" and float(e["spread.max_lag_s"]) == 0.0


def test_a_round_that_overruns_its_slot_delays_the_next(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    cancel = ClockEvent(clock)
    timed = Timed(clock, step=40.0)  # a round of 4 samples takes 160 s, a slot is 100 s
    profile = spread_profile(kit, store, warmups=0)
    final = run(
        kit, store, lease_dir, profile, kit.SyntheticTarget(on_generate=timed), cancel, clock
    )
    assert final.state == ProfileState.SUCCEEDED, final.error
    offsets = spread_offsets(3, SPREAD, seed=SEED)
    assert offsets[1] - offsets[0] < 160 and offsets[2] - offsets[1] < 160  # premise
    assert len(cancel.waits) == 1  # only round 0 waited; the later ones were overdue
    assert timed.starts == pytest.approx([offsets[0] + 40.0 * k for k in range(12)])  # no overlap
    lag = offsets[0] + 2 * 160.0 - offsets[2]  # round 2 began when round 1 ended
    assert float(final.provenance.entries["spread.max_lag_s"]) == pytest.approx(lag, rel=1e-5)


def test_no_spread_never_waits(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    cancel = ClockEvent(clock)
    profile = spread_profile(kit, store, spread_s=0.0)
    final = run(kit, store, lease_dir, profile, kit.SyntheticTarget(), cancel, clock)
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert cancel.waits == [] and not any(k.startswith("spread.") for k in final.provenance.entries)


def test_cancel_ends_a_long_wait_at_once(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = spread_profile(kit, store, spread_s=3600.0, repeats=2)
    assert spread_offsets(2, 3600.0, seed=SEED)[0] > 60  # round 0 is minutes away
    cancel = threading.Event()
    timer = threading.Timer(0.05, cancel.set)
    timer.start()
    target = kit.SyntheticTarget()
    final = run_profile(
        profile,
        target,
        store,
        cancel=cancel,
        on_progress=lambda p: None,
        options=kit.quiet_options(lease_dir),
    )
    timer.join()
    assert final.state == ProfileState.CANCELLED
    assert len(target.calls) == 4  # the warm-ups; no round started
    flags = Counter(s.flag for s in store.all_samples(profile.id))
    assert flags == {SampleFlag.WARMUP: 4}


def test_a_resumed_spread_run_keeps_the_spacing_and_measures_nothing_twice(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    profile = spread_profile(kit, store)
    clock = FakeClock()
    cancel = ClockEvent(clock)
    timed = Timed(clock)
    timed.cancel_at = (9, cancel)  # 4 warm-ups, round 0, then 2 samples of round 1
    first = run(
        kit, store, lease_dir, profile, kit.SyntheticTarget(on_generate=timed), cancel, clock
    )
    assert first.state == ProfileState.CANCELLED

    clock2 = FakeClock(1000.0)  # another process, another clock
    cancel2 = ClockEvent(clock2)
    timed2 = Timed(clock2)
    target = kit.SyntheticTarget(on_generate=timed2)
    final = run(kit, store, lease_dir, profile, target, cancel2, clock2)
    assert final.state == ProfileState.SUCCEEDED, final.error
    offsets = spread_offsets(3, SPREAD, seed=SEED)
    # warm-ups again, then the rest of round 1 at once, round 2 at its spacing from round 1
    assert len(timed2.starts) == 4 + 2 + 4
    assert timed2.starts[4:6] == [1004.0, 1005.0]
    assert timed2.starts[6] == pytest.approx(1004.0 + offsets[2] - offsets[1])
    assert len(cancel2.waits) == 1
    ok = Counter(
        (s.prompt_tokens, s.output_tokens, s.repeat)
        for s in store.all_samples(profile.id)
        if s.flag == SampleFlag.OK
    )
    assert len(ok) == 4 * 3 and set(ok.values()) == {1}  # every (config, repeat) once
    assert "resumed at round 1" in final.provenance.entries["spread.schedule"]
    assert final.completed_samples == final.total_samples == 12


SPREAD_FIELD = ("plan.spread_s", "PLAN_SPREAD_OUT_OF_RANGE")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"spread_s": -1.0}, SPREAD_FIELD),
        ({"spread_s": P.MAX_SPREAD_S + 1}, SPREAD_FIELD),
        ({"spread_s": math.nan}, SPREAD_FIELD),
        ({"spread_s": math.inf}, SPREAD_FIELD),
        ({"spread_s": 600.0, "budget_s": 600.0}, ("plan.spread_s", "PLAN_SPREAD_EXCEEDS_BUDGET")),
    ],
)
def test_invalid_spreads(changes: dict[str, Any], expected: tuple[str, str]) -> None:
    base = ProfilePlan(prompt_tokens=(8, 64), output_tokens=(2,))
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(base, **changes))
    assert (info.value.field, info.value.reason) == expected


def test_spread_limits_are_stated_and_edges_allowed() -> None:
    base = ProfilePlan(prompt_tokens=(8, 64), output_tokens=(2,))
    P.validate_plan(dataclasses.replace(base, spread_s=P.MAX_SPREAD_S))
    P.validate_plan(dataclasses.replace(base, spread_s=600.0, budget_s=601.0))
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(base, spread_s=-5.0))
    assert "[0, 604800]" in info.value.message


def test_begin_at_round_makes_that_round_due_now() -> None:
    clock = FakeClock(50.0)
    schedule = SpreadSchedule(4, 400.0, seed=1, clock=clock)
    schedule.begin_at_round(2)
    assert schedule.due(2) == 50.0
    assert schedule.due(3) == pytest.approx(50.0 + schedule.offsets[3] - schedule.offsets[2])
    schedule.begin_at_round(1, at=10.0)
    assert schedule.due(1) == 10.0
