"""Exactly once: every planned (configuration, repeat) is measured and stored once, across
crashes and resumes; SUCCEEDED only when every planned sample exists.

The store is the real one (SQLite in memory). A crash of the profiler (kill -9) is
simulated by a sink wrapper that raises a BaseException right after the store committed an
append (the answer never reaches the run: the sample writer's thread stops there and hands
the exception to the run, which raises it out of run_profile, and nothing of the run's own
error handling runs: the runner catches Exception only); a real store cannot be told to do
that on cue.
Contention is injected by monitors that report foreign CPU time for chosen generations.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from idealrt.core.domain import ContentionObservation, Profile, ProfileState, Sample
from idealrt.core.errors import IdealrtError
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.monitors import MonitorSet, Window
from idealrt.services.profiler.plan import Config, configurations, round_order, sample_seed
from idealrt.services.profiler.runner import run_profile
from idealrt.services.store.repository import Store

# every test with store writes in background and inline (conftest `write_mode`)
pytestmark = pytest.mark.usefixtures("write_mode")


class Crash(BaseException):
    """The process died (kill -9): nothing after this point of the run happens."""


class CrashingSink:
    """The real store; append call `crash_at` is committed, then the process "dies"."""

    def __init__(self, store: Store, crash_at: int) -> None:
        self.store = store
        self.crash_at = crash_at
        self.batches: list[tuple[str, int]] = []

    def append_samples(self, profile_id: str, batch_id: str, samples: Any) -> int:
        n = self.store.append_samples(profile_id, batch_id, samples)
        self.batches.append((batch_id, len(samples)))
        if len(self.batches) - 1 == self.crash_at:
            raise Crash
        return n

    def all_samples(self, profile_id: str) -> list[Sample]:
        return self.store.all_samples(profile_id)

    def count_samples(self, profile_id: str) -> int:
        return self.store.count_samples(profile_id)


class LostAnswerSink(CrashingSink):
    """Append call `lose_at` is committed and its answer lost (DEADLINE_EXCEEDED)."""

    def append_samples(self, profile_id: str, batch_id: str, samples: Any) -> int:
        n = self.store.append_samples(profile_id, batch_id, samples)
        self.batches.append((batch_id, len(samples)))
        if len(self.batches) - 1 == self.crash_at:
            exc = IdealrtError("DEADLINE_EXCEEDED", "deadline exceeded (on cue)")
            exc.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise exc
        return n


class ForeignCpuOn(MonitorSet):
    """Monitors that see foreign CPU time during the generations whose prompt seed is in
    `seeds` (so those samples are judged CONTENDED), and nothing otherwise."""

    def __init__(self, target: Any, seeds: set[int]) -> None:
        super().__init__()
        self.target = target
        self.seeds = seeds

    def before(self) -> Window:
        return Window(0, None, None, frozenset(), None)

    def after(self, w: Window) -> ContentionObservation:
        hit = self.target.calls[-1].seed in self.seeds
        return ContentionObservation(foreign_cpu_s=0.5 if hit else 0.0)


def run(kit: Any, sink: Any, lease_dir: Path, profile: Profile, target: Any, **kw: Any) -> Profile:
    return run_profile(
        profile,
        target,
        sink,
        cancel=kw.pop("cancel", threading.Event()),
        on_progress=lambda p: None,
        options=kit.quiet_options(lease_dir, **kw),
    )


def test_a_batch_stored_before_a_crash_but_never_acknowledged_is_not_measured_again(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    profile = kit.make_profile(store)  # 4 configurations x 3 repeats, 1 warm-up each
    sink = CrashingSink(store, crash_at=3)  # batches of 3: the 4th holds measured samples
    first = kit.SyntheticTarget()
    with pytest.raises(Crash):
        run(kit, sink, lease_dir, profile, first, batch_samples=3)
    held = store.all_samples(profile.id)
    assert len(held) == 12  # the unacknowledged batch is in the store
    unacked = held[9:]
    second = kit.SyntheticTarget()
    resumed = CrashingSink(store, crash_at=-1)
    final = run(kit, resumed, lease_dir, profile, second, batch_samples=3)
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert final.provenance.entries["profile.resumed_samples"] == "12"
    counts = kit.ok_per_repeat(store, profile.id)
    assert len(counts) == 12 and set(counts.values()) == {1}
    # the resumed run re-did the warm-ups, then only what the store did not hold
    assert len(second.calls) == 4 + (12 - 8)
    plan = profile.plan
    remeasured = {c.seed for c in second.calls}
    for s in unacked:
        config = Config(s.prompt_tokens, s.output_tokens, s.heldout)
        assert sample_seed(plan, config, s.repeat) not in remeasured
    # its batch ids start after what the store holds: none is used twice
    ids = [b for b, _ in sink.batches] + [b for b, _ in resumed.batches]
    assert len(ids) == len(set(ids))
    assert resumed.batches[0][0] == f"{profile.id}-b12"
    assert final.completed_samples == final.total_samples == 12


def test_an_append_whose_answer_was_lost_is_sent_again_and_stored_once(
    kit, store, lease_dir
) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)
    sink = LostAnswerSink(store, crash_at=2)
    final = run(kit, sink, lease_dir, profile, kit.SyntheticTarget(), batch_samples=3)
    assert final.state == ProfileState.SUCCEEDED, final.error
    ids = [b for b, _ in sink.batches]
    assert ids[2] == ids[3]  # the same batch, under the same id
    stored = store.all_samples(profile.id)
    assert [s.seq for s in stored] == list(range(16))
    counts = kit.ok_per_repeat(store, profile.id)
    assert len(counts) == 12 and set(counts.values()) == {1}


def abandoned_repeat_setup(kit: Any, store: Store) -> tuple[Profile, Config, set[int]]:
    """A profile whose first configuration of round 1 is contended at every attempt of
    repeat 1 (1 + max_retries = 4 samples): that repeat is abandoned."""
    profile = kit.make_profile(store, repeats=4, warmups=0)
    plan = profile.plan
    victim = round_order(configurations(plan), plan, 1)[0]
    seeds = {sample_seed(plan, victim, 1, a) for a in range(4)}
    return profile, victim, seeds


def test_an_abandoned_repeat_is_not_measured_twice_after_a_resume(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile, victim, seeds = abandoned_repeat_setup(kit, store)
    cancel = threading.Event()
    # stop inside round 3, after the victim's repeat 2 (the repeat after the abandoned one)
    first = kit.SyntheticTarget()
    plan = profile.plan
    stop_seed = sample_seed(plan, victim, 2)

    def hook(i: int) -> None:
        if first.calls[-1].seed == stop_seed:
            cancel.set()

    first.on_generate = hook
    stopped = run(
        kit,
        store,
        lease_dir,
        profile,
        first,
        cancel=cancel,
        monitors=lambda p, env: ForeignCpuOn(first, seeds),
    )
    assert stopped.state == ProfileState.CANCELLED
    before = kit.ok_per_repeat(store, profile.id)
    v = (victim.prompt_tokens, victim.output_tokens, victim.heldout)
    assert before[(*v, 2)] == 1 and before[(*v, 1)] == 0
    second = kit.SyntheticTarget()
    final = run(kit, store, lease_dir, profile, second)
    counts = kit.ok_per_repeat(store, profile.id)
    assert set(counts.values()) == {1}  # no (configuration, repeat) twice
    victim_seeds = {sample_seed(plan, victim, r, a) for r in range(3) for a in range(4)}
    assert not victim_seeds & {c.seed for c in second.calls}  # its settled repeats: left
    # one planned sample is missing (the abandoned repeat): not SUCCEEDED, and it says so
    assert final.state == ProfileState.INVALID
    assert final.error.startswith("CONTENTION: ")
    assert final.provenance.entries["contention.abandoned_repeats"] == "1"
    assert final.completed_samples == 15 < final.total_samples == 16


def test_succeeded_only_when_every_planned_sample_exists(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile, _victim, seeds = abandoned_repeat_setup(kit, store)
    target = kit.SyntheticTarget()
    final = run(
        kit, store, lease_dir, profile, target, monitors=lambda p, env: ForeignCpuOn(target, seeds)
    )
    assert final.state == ProfileState.INVALID  # formerly SUCCEEDED with 15 of 16
    assert final.error.startswith("CONTENTION: ")
    assert final.completed_samples == 15


def test_a_stored_repeat_outside_the_plan_does_not_stand_in_for_a_planned_one(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    """The store holds an OK sample of repeat 7 of a 3-repeat plan (written by something
    else): it is no planned sample, so the run, which stops at 3 repeats of that
    configuration, cannot end SUCCEEDED with repeat 2 missing."""
    profile = kit.make_profile(store, warmups=0)
    plan = profile.plan
    c = configurations(plan)[0]
    stray = kit.SyntheticTarget().generate(c.prompt_tokens, c.output_tokens, 1)
    store.append_samples(profile.id, "stray", [dataclasses.replace(stray, repeat=7)])
    final = run(kit, store, lease_dir, profile, kit.SyntheticTarget())
    assert final.state == ProfileState.FAILED
    assert final.error.startswith("INCOMPLETE: ")


def test_precision_and_budget_stops_end_with_completed_equal_to_total(
    kit, store, lease_dir
) -> None:  # type: ignore[no-untyped-def]
    # until_ci_rel: quiet configurations stop at `repeats`, noisy ones run to the cap
    profile = kit.make_profile(store, until_ci_rel=0.01, max_repeats=7, warmups=0)
    target = kit.SyntheticTarget()

    def noise(i: int) -> float:  # p = 32: +10% on every other generation of each (p, o)
        call = target.calls[i]
        k = sum(1 for c in target.calls[:i] if (c.p, c.o) == (call.p, call.o))
        return 1.1 if call.p == 32 and k % 2 else 1.0

    target.noise = noise
    final = run(kit, store, lease_dir, profile, target, contention=ContentionPolicy(enabled=False))
    assert final.state == ProfileState.SUCCEEDED, final.error
    per_config = Counter((p, o) for p, o, _h, _r in kit.ok_per_repeat(store, profile.id))
    assert sorted(per_config.values()) == [3, 3, 7, 7]
    assert final.completed_samples == final.total_samples == 20

    # the budget: what it allowed is what was planned
    clock = {"t": 0.0}

    def tick(i: int) -> None:
        clock["t"] += 1.0

    budgeted = kit.make_profile(store, repeats=50, warmups=0, budget_s=10.0)
    final = run(
        kit,
        store,
        lease_dir,
        budgeted,
        kit.SyntheticTarget(on_generate=tick),
        clock=lambda: clock["t"],
    )
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert final.provenance.entries["stopping.reason"] == "budget"
    assert final.completed_samples == final.total_samples == 10
