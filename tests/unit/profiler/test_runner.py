"""run_profile with the synthetic target (see conftest) and the real store (SQLite in
memory): order, batching, cancel, resume, contention, failures, stopping."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from idealrt.core.domain import (
    ContentionObservation,
    LeasePolicy,
    Profile,
    ProfileState,
    Sample,
    SampleFlag,
)
from idealrt.core.errors import Unavailable
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.lease import acquire_lease
from idealrt.services.profiler.plan import configurations, round_order, sample_seed
from idealrt.services.profiler.runner import run_profile
from idealrt.services.store.repository import Store


class RecordingSink:
    """The real store, with the batch ids it was given recorded."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[tuple[str, int]] = []

    def append_samples(self, profile_id: str, batch_id: str, samples: Any) -> int:
        self.batches.append((batch_id, len(samples)))
        return self.store.append_samples(profile_id, batch_id, samples)

    def all_samples(self, profile_id: str) -> list[Sample]:
        return self.store.all_samples(profile_id)

    def count_samples(self, profile_id: str) -> int:
        return self.store.count_samples(profile_id)


def run(
    kit: Any,
    sink: Any,
    lease_dir: Path,
    profile: Profile,
    target: Any,
    cancel: threading.Event | None = None,
    **opts: Any,
) -> tuple[Profile, list[Profile]]:
    progress: list[Profile] = []
    final = run_profile(
        profile,
        target,
        sink,
        cancel=cancel or threading.Event(),
        on_progress=progress.append,
        options=kit.quiet_options(lease_dir, **opts),
    )
    return final, progress


def ok_counts(samples: list[Sample]) -> Counter[tuple[int, int, bool]]:
    return Counter(
        (s.prompt_tokens, s.output_tokens, s.heldout) for s in samples if s.flag == SampleFlag.OK
    )


def test_successful_run_order_flags_and_progress(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, holdout_prompt_tokens=(16,))
    target = kit.SyntheticTarget()
    final, progress = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    configs = configurations(profile.plan)
    assert len(configs) == 6 and sum(c.heldout for c in configs) == 2
    assert final.completed_samples == final.total_samples == 6 * 3
    stored = store.all_samples(profile.id)
    assert [s.flag for s in stored[:6]] == [SampleFlag.WARMUP] * 6
    measured = stored[6:]
    assert all(s.flag == SampleFlag.OK for s in measured)
    expected = [(c, r) for r in range(3) for c in round_order(configs, profile.plan, r)]
    assert [(s.prompt_tokens, s.output_tokens, s.heldout, s.repeat) for s in measured] == [
        (c.prompt_tokens, c.output_tokens, c.heldout, r) for c, r in expected
    ]
    assert [c.seed for c in target.calls[6:]] == [
        sample_seed(profile.plan, c, r) for c, r in expected
    ]
    assert all(s.rpc_ns > s.total_ns for s in measured)  # kept apart, not mixed in
    assert progress[0].state == ProfileState.RUNNING and progress[-1].state == final.state
    done = [p.completed_samples for p in progress]
    assert done == sorted(done) and done[-1] == 18
    e = final.provenance.entries
    assert e["stopping.reason"] == "repeats" and e["model.spec_hash"] != "unknown"
    assert e["contention.contended"] == "0" and e["target.kind"] == "synthetic"
    assert final.model_spec == kit.TINY_SPEC and final.end_time is not None
    assert (target.prepared, target.closed) == (1, 1)


def test_batches_have_deterministic_ids(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)
    sink = RecordingSink(store)
    final, _ = run(
        kit, sink, lease_dir, profile, kit.SyntheticTarget(), batch_samples=5, batch_interval_s=3600
    )
    assert final.state == ProfileState.SUCCEEDED
    p = profile.id
    assert sink.batches == [(f"{p}-b0", 5), (f"{p}-b5", 5), (f"{p}-b10", 5), (f"{p}-b15", 1)]


def test_cancel_stops_between_samples_and_keeps_them(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)
    cancel = threading.Event()
    target = kit.SyntheticTarget(on_generate=lambda i: cancel.set() if i == 9 else None)
    final, _ = run(kit, store, lease_dir, profile, target, cancel=cancel)
    assert final.state == ProfileState.CANCELLED
    assert len(target.calls) == 10  # the sample in flight finished; no new one started
    assert store.count_samples(profile.id) == 10  # every measured sample was kept
    assert final.completed_samples == 6 and target.closed == 1


def test_resume_continues_without_duplicates(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, repeats=3)
    cancel = threading.Event()
    first = kit.SyntheticTarget(on_generate=lambda i: cancel.set() if i == 9 else None)
    interrupted, _ = run(kit, store, lease_dir, profile, first, cancel=cancel, batch_samples=3)
    assert interrupted.state == ProfileState.CANCELLED
    second = kit.SyntheticTarget()
    final, _ = run(kit, store, lease_dir, profile, second, batch_samples=3)
    assert final.state == ProfileState.SUCCEEDED, final.error
    stored = store.all_samples(profile.id)
    assert ok_counts(stored) == {k: 3 for k in ok_counts(stored)} and len(ok_counts(stored)) == 4
    assert len(second.calls) == 4 + (12 - 6)  # warm-ups again, then only what was missing
    # together the two runs measured exactly what one uninterrupted run measures, in order
    configs = configurations(profile.plan)
    expected = [
        (c.prompt_tokens, c.output_tokens, r)
        for r in range(3)
        for c in round_order(configs, profile.plan, r)
    ]
    ok = [(s.prompt_tokens, s.output_tokens, s.repeat) for s in stored if s.flag == SampleFlag.OK]
    assert ok == expected
    assert final.completed_samples == 12
    assert final.provenance.entries["profile.resumed_samples"] == "10"


def test_a_slow_window_is_flagged_and_remeasured(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, repeats=6)
    window = range(20, 23)  # round 4: every configuration has its own baseline by then
    target = kit.SyntheticTarget(slow=lambda i: 3.0 if i in window else 1.0)
    final, _ = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    stored = store.all_samples(profile.id)
    contended = [s for s in stored if s.flag == SampleFlag.CONTENDED]
    assert len(contended) == 3
    slow_calls = [target.calls[i] for i in window]
    assert sorted((s.prompt_tokens, s.output_tokens) for s in contended) == sorted(
        (c.p, c.o) for c in slow_calls
    )
    assert set(ok_counts(stored).values()) == {6}  # every contended repeat was re-measured
    assert final.provenance.entries["contention.contended"] == "3"


def test_a_configurations_first_sample_is_judged_by_the_shared_model(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(
        store,
        prompt_tokens=(8, 9, 10, 11),
        output_tokens=(24,),
        repeats=2,
        warmups=0,
        randomize=False,
    )
    target = kit.SyntheticTarget(slow=lambda i: 2.0 if i == 3 else 1.0)  # p=11, its 1st sample
    final, _ = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    contended = [s for s in store.all_samples(profile.id) if s.flag == SampleFlag.CONTENDED]
    assert [(s.prompt_tokens, s.repeat) for s in contended] == [(11, 0)]


def test_persistent_contention_ends_invalid_with_evidence(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, repeats=6)
    target = kit.SyntheticTarget(slow=lambda i: 3.0 if i >= 16 else 1.0)
    final, _ = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.INVALID
    assert final.error.startswith("CONTENTION: ")
    assert "12 repeats abandoned" in final.error and "slow_vs_own_baseline" in final.error
    flags = Counter(s.flag for s in store.all_samples(profile.id))
    # 3 slowed rounds x 4 configurations x (1 + 3 retries)
    assert flags[SampleFlag.CONTENDED] == 48 and flags[SampleFlag.OK] == 12


def test_monitor_evidence_flags_a_sample(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)
    monitors = kit.ScriptedMonitors(
        lambda i: ContentionObservation(foreign_cpu_s=0.5 if i == 6 else 0.0)
    )
    final, _ = run(
        kit, store, lease_dir, profile, kit.SyntheticTarget(), monitors=lambda p, env: monitors
    )
    assert final.state == ProfileState.SUCCEEDED
    stored = store.all_samples(profile.id)
    contended = [s for s in stored if s.flag == SampleFlag.CONTENDED]
    assert len(contended) == 1 and contended[0].contention.foreign_cpu_s == 0.5
    assert set(ok_counts(stored).values()) == {3}


def test_nonconforming_generations_fail_loudly(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)
    target = kit.SyntheticTarget(short_output=lambda i: i >= 5)
    final, _ = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.FAILED
    assert final.error.startswith("NONCONFORMING: 3 generations")
    flags = Counter(s.flag for s in store.all_samples(profile.id))
    assert flags[SampleFlag.NONCONFORMING] == 3


def test_target_errors_fail_and_keep_samples(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)
    target = kit.SyntheticTarget(
        fail=lambda i: Unavailable("SERVING_UNAVAILABLE", "serving is gone") if i == 6 else None
    )
    final, _ = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.FAILED
    assert final.error == "SERVING_UNAVAILABLE: serving is gone"
    assert store.count_samples(profile.id) == 6 and target.closed == 1
    other = kit.make_profile(store)
    final, _ = run(
        kit,
        store,
        lease_dir,
        other,
        kit.SyntheticTarget(fail=lambda i: RuntimeError("boom") if i == 0 else None),
    )
    assert final.error == "INTERNAL: RuntimeError: boom"


def test_busy_device_with_fail_policy(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, lease=LeasePolicy.FAIL)
    target = kit.SyntheticTarget()
    with acquire_lease(lease_dir, "cpu", profile_id="someone-else"):
        final, _progress = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.FAILED and final.error.startswith("DEVICE_BUSY: ")
    assert "someone-else" in final.error
    assert target.prepared == 0 and store.count_samples(profile.id) == 0


def test_cancel_while_waiting_for_the_lease(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)  # WAIT policy
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with acquire_lease(lease_dir, "cpu", profile_id="someone-else"):
        final, _ = run(kit, store, lease_dir, profile, kit.SyntheticTarget(), cancel=cancel)
    assert final.state == ProfileState.CANCELLED


def test_plan_checked_against_the_resolved_spec(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store)
    small = dataclasses.replace(kit.TINY_SPEC, max_positions=16)
    target = kit.SyntheticTarget(spec=small)
    final, _ = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.FAILED
    assert final.error.startswith("PLAN_EXCEEDS_CONTEXT: ")
    assert target.calls == []


def test_precision_target_stops_when_quiet(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, until_ci_rel=0.01)
    final, _ = run(kit, store, lease_dir, profile, kit.SyntheticTarget())
    assert final.state == ProfileState.SUCCEEDED
    assert final.provenance.entries["stopping.reason"] == "precision"
    assert final.completed_samples == final.total_samples == 12


def test_precision_target_noisy_runs_to_the_cap(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, until_ci_rel=0.001, max_repeats=7)
    noise = lambda i: 1.0 + 0.1 * ((i * 7919) % 5 - 2) / 2  # noqa: E731 (+-10%)
    final, _ = run(
        kit,
        store,
        lease_dir,
        profile,
        kit.SyntheticTarget(noise=noise),
        contention=ContentionPolicy(enabled=False),
    )
    assert final.state == ProfileState.SUCCEEDED
    assert final.provenance.entries["stopping.reason"] == "max_repeats"
    assert set(ok_counts(store.all_samples(profile.id)).values()) == {7}


def test_budget_stops_the_run(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = kit.make_profile(store, repeats=200, warmups=0, budget_s=0.5)
    target = kit.SyntheticTarget(on_generate=lambda i: time.sleep(0.02))
    final, _ = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert final.provenance.entries["stopping.reason"] == "budget"
    assert 4 <= final.completed_samples < 200 * 4
    none_left = kit.make_profile(store, budget_s=1e-9)
    final, _ = run(kit, store, lease_dir, none_left, kit.SyntheticTarget())
    assert final.state == ProfileState.FAILED and final.error.startswith("BUDGET_EXHAUSTED")


class _FakeTime:
    """A clock that moves only when the runner sleeps on it (its `sleep` option)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    def sleep(self, event: threading.Event, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.t += seconds
        return event.is_set()


def _busy(i: int, busy: range) -> ContentionObservation:
    return ContentionObservation(foreign_cpu_s=0.5 if i in busy else 0.0)


def test_transient_contention_is_waited_out_then_remeasured(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    """Window 6 (a sample) shows foreign CPU on the measured cores, and so do the next
    three quiet windows the runner waits on (the load is still there); the fourth is
    quiet: the runner goes on, re-measures, and the profile SUCCEEDS with every repeat
    measured clean, 2 s paused (4 windows of 0.5 s, blocking waits on the clock)."""
    profile = kit.make_profile(store)
    monitors = kit.ScriptedMonitors(lambda i: _busy(i, range(6, 10)), watching=True)
    ft = _FakeTime()
    final, _ = run(
        kit,
        store,
        lease_dir,
        profile,
        kit.SyntheticTarget(),
        monitors=lambda p, env: monitors,
        clock=ft.clock,
        sleep=ft.sleep,
        contention=ContentionPolicy(retry_backoff_s=0.0, quiet_window_s=0.5),
    )
    assert final.state == ProfileState.SUCCEEDED, final.error
    stored = store.all_samples(profile.id)
    assert sum(s.flag == SampleFlag.CONTENDED for s in stored) == 1
    assert set(ok_counts(stored).values()) == {3}
    assert ft.sleeps.count(0.5) == 4
    assert final.provenance.entries["contention.paused_s"] == "2.000"


def test_contention_past_the_patience_ends_invalid(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    """Foreign load that never leaves: the runner waits in quiet windows until the
    patience (3 s) is spent, then ends INVALID saying so; what was measured is kept."""
    profile = kit.make_profile(store)
    monitors = kit.ScriptedMonitors(lambda i: _busy(i, range(6, 10_000)), watching=True)
    ft = _FakeTime()
    final, _ = run(
        kit,
        store,
        lease_dir,
        profile,
        kit.SyntheticTarget(),
        monitors=lambda p, env: monitors,
        clock=ft.clock,
        sleep=ft.sleep,
        contention=ContentionPolicy(retry_backoff_s=0.0, quiet_window_s=0.5, patience_s=3.0),
    )
    assert final.state == ProfileState.INVALID
    assert final.error.startswith("CONTENTION: contention persisted for 3 s, past the patience")
    assert ft.sleeps == [0.5] * 6  # blocking waits only, no spinning
    stored = store.all_samples(profile.id)
    # windows 0-5 were measured before the load came (warm-ups and samples): all kept
    assert sum(s.flag in (SampleFlag.OK, SampleFlag.WARMUP) for s in stored) == 6
    assert sum(s.flag == SampleFlag.CONTENDED for s in stored) == 1


def test_without_monitors_contention_is_backed_off_blind(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    """No monitor to watch (e.g. a remote API): after each contended sample the runner
    backs off (0.5 s doubling) and lets the re-measurement judge; an accepted sample
    ends the episode, so the next one starts again at 0.5 s."""
    profile = kit.make_profile(store, repeats=6)
    window = range(20, 23)
    target = kit.SyntheticTarget(slow=lambda i: 3.0 if i in window else 1.0)
    ft = _FakeTime()
    final, _ = run(
        kit,
        store,
        lease_dir,
        profile,
        target,
        clock=ft.clock,
        sleep=ft.sleep,
        contention=ContentionPolicy(retry_backoff_s=0.0, quiet_window_s=0.5),
    )
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert sum(s.flag == SampleFlag.CONTENDED for s in store.all_samples(profile.id)) == 3
    assert ft.sleeps[:3] == [0.5, 1.0, 2.0]  # three contended in a row: one episode
