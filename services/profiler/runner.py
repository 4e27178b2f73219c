"""Run one profile: lease, fingerprint, warm-ups, randomized rounds, contention, storage.

`run_profile` is synchronous and runs in the caller's thread (the manager's worker). It
returns the final Profile (SUCCEEDED, FAILED, CANCELLED or INVALID) and never raises for a
measurement problem: the reason goes into Profile.error as "<REASON>: <message>".

Order of work:
 1. Validate the plan; take the device lease (plan.lease: WAIT or FAIL -> DEVICE_BUSY).
 2. Prepare the target (load the model), re-validate the plan against the resolved spec,
    fingerprint the environment.
 3. Resume: what the sink holds for this profile counts, per (configuration, repeat): a
    repeat with an OK sample is done (a second OK sample of the same repeat, left by an
    older version, is ignored), one with `max_retries + 1` CONTENDED samples and no OK
    one was abandoned, one with fewer has used that many retries. The run continues each
    configuration at its first unsettled repeat, so nothing stored is measured again; a
    batch that reached the store before a crash but whose acknowledgement did not reach
    the run is simply part of what the store holds. All stored samples seed the contention
    baselines and tally.
 4. Warm-ups (stored, flagged WARMUP; redone on resume: the server may be cold).
 5. Rounds (see plan.py): each sample is bracketed by the monitors, judged for contention,
    and stored flagged OK / CONTENDED / NONCONFORMING. After a contended sample the run
    waits the contention out (`_wait_out`: blocking waits until the monitors see the
    measured cores quiet, or a back-off without monitors; INVALID once it has lasted
    `patience_s`). A contended or nonconforming sample is re-measured at the end of the
    round after a back-off sleep, at most `max_retries` times; then that repeat is
    abandoned. `max_nonconforming` nonconforming samples fail the
    profile (NONCONFORMING): a target that cannot produce exact lengths is broken.
 6. Samples go to the sink in batches (every `batch_samples` samples or `batch_interval_s`
    seconds, checked between samples), stored by a SampleWriter (_sample_writer.py) in
    order, with batch id "<profile_id>-b<N>", N = number of samples of the profile stored
    before the batch. A retried append sends the same samples under the same id (the
    store takes it once), and a resumed run starts numbering at what the sink holds, so it
    never re-uses an id. With `background_writes` (the default) the writer has a thread of
    its own and a slow store does not slow the run: measuring goes on while batches are
    stored; without (the embedded suite, where store and serving share this process),
    batches are stored between samples on the measuring thread.
    Outages (_outage.py, RunnerOptions): a store call that fails UNAVAILABLE or
    DEADLINE_EXCEEDED is retried with backoff for `outage_window_s`. Meanwhile measuring
    goes on and samples wait in memory; at `max_buffered_samples` unstored samples the run
    stops measuring and waits for the writer. A serving target that cannot be reached
    (TargetUnavailable) is waited for the same way, and the interrupted generation is made
    again (same configuration, repeat, seed) once the target has reloaded its model. Past the window
    the profile ends FAILED (STORE_UNAVAILABLE / SERVING_UNAVAILABLE). Every wait is on
    the cancel event, with the options' clock and sleep.
 7. Cancel (the event) is checked between samples: what was measured is stored, the
    profile ends CANCELLED. Persistent contention ends it INVALID with the evidence.
 8. Spread (plan.spread_s > 0, schedule.py): round r of the plan's grid starts at its
    offset of a SpreadSchedule anchored after the warm-ups, waiting on the cancel event
    (cancellable at once, no polling; spread_s < budget_s, see plan.py). The lease is
    held for the whole profile, waits included: a profile spread over hours holds the
    device for hours, which suits HTTP targets (an API's device is not ours to free).
    Provenance records the schedule and how late rounds started ("spread.*").
 9. Adaptive planning (plan.adaptive_target_rel > 0, adaptive.py): once the plan's grid is
    measured, fit (the samples the run holds: what it read at the start and every batch it
    stored since; nothing is read back from the sink), add the prompt size where alpha(p)
    is least certain (one configuration per output length, measured in rounds like the
    grid, not spread), refit, until the target is met, the size cap is reached or the
    budget is spent; Profile.total_samples grows with each size, "adaptive.*" provenance
    records the sizes and the stop reason.
    Added configurations the budget left unmeasured are dropped, not failed.
10. Resume of either: sizes added before the restart are recognised from the stored samples
    (a fit sample whose prompt size is not in plan.prompt_tokens), their configurations
    rebuilt in the order added, so nothing is measured twice; a spread schedule restarts
    with the first unfinished round due at once and the later ones keeping their spacing.
11. The end: SUCCEEDED only when every planned sample exists, i.e. repeats 0..n-1 of every
    configuration each have one OK sample and the store took them all (n = plan.repeats,
    or where the stopping rule stopped under until_ci_rel or the budget). A repeat
    abandoned after contention makes the profile INVALID (CONTENTION, saying what is
    missing); any other gap FAILED (INCOMPLETE: n of m samples missing, and where).
    Timing evidence (_timing_evidence.py): provenance "timing.<kind>" counts the OK
    samples by how their times were obtained (Sample.timing); a complete profile whose fit
    samples cannot identify the cost model (no per-step times, no measured prefill, and a
    grid of one output or one prompt length) ends INVALID (TIMING_EVIDENCE_INSUFFICIENT,
    naming the evidence).
    total_samples is then what was planned and measured (lower than the plan's upper
    bound when precision or the budget stopped it early).

Why one module, and a long one: a run is one idea, its state and the phases that advance
it in the order above. `_RunState` holds everything a run changes as it goes (the profile
it reports, the samples it stores and keeps, the configurations and their totals, the
tallies), and every phase is a function of that state; split across files, the phases
would share the state's fields without either file saying what they are. What a run is
given (options, sink, monitors) is a separate idea, in `_runner_options.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from structlog.typing import FilteringBoundLogger

from idealrt.core.clock import utcnow
from idealrt.core.domain import (
    ContentionObservation,
    Profile,
    ProfileState,
    Sample,
    SampleFlag,
    TargetKind,
)
from idealrt.core.errors import FailedPrecondition, IdealrtError, InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.core.reasons import STORE_UNAVAILABLE
from idealrt.services.profiler._outage import Outage, is_transient
from idealrt.services.profiler._runner_options import MonitorFactory as MonitorFactory
from idealrt.services.profiler._runner_options import (
    RunnerOptions,
    SampleSink,
    default_monitors,
    error_text,
)
from idealrt.services.profiler._sample_writer import SampleWriter, StoreGaveUp
from idealrt.services.profiler._timing_evidence import TimingEvidence
from idealrt.services.profiler.adaptive import AdaptivePlanner, added_prompt_sizes
from idealrt.services.profiler.contention import ContentionDetector
from idealrt.services.profiler.fingerprint import collect_fingerprint
from idealrt.services.profiler.lease import LeaseWaitCancelled, acquire_lease, device_key
from idealrt.services.profiler.monitors import MonitorSet
from idealrt.services.profiler.plan import (
    Config,
    configurations,
    effective_max_repeats,
    round_order,
    sample_seed,
    total_samples,
    validate_plan,
    warmup_order,
)
from idealrt.services.profiler.reasons import INCOMPLETE, SERVING_UNAVAILABLE
from idealrt.services.profiler.schedule import SpreadSchedule, sleep_until
from idealrt.services.profiler.stopping import StoppingRule, StopReason
from idealrt.services.profiler.target import GenerationTarget, TargetUnavailable

__all__ = ["RunnerOptions", "SampleSink", "default_monitors", "error_text", "run_profile"]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# The store's own reason for "unreachable" (services/store/reasons.py), which a profile
# that outlived the outage window reports too. A reason two areas use belongs in
# idealrt.core.reasons; until it moves there, it is spelled here once.


class _Cancelled(Exception):
    pass


class _Stop(Exception):
    """Ends the run with a given state and error."""

    def __init__(self, state: ProfileState, error: str) -> None:
        super().__init__(error)
        self.state = state
        self.error = error


@dataclasses.dataclass(eq=False)
class _Repeats:
    """One configuration's repeats: those with an OK sample (`done`), those given up after
    `max_retries` contended re-measurements (`gave_up`), the failed attempts of repeats
    not yet settled, and the first unsettled repeat (`next`)."""

    done: set[int] = dataclasses.field(default_factory=set)
    gave_up: set[int] = dataclasses.field(default_factory=set)
    attempts: dict[int, int] = dataclasses.field(default_factory=dict)
    next: int = 0

    @property
    def slots(self) -> int:
        """Repeats used up: what the stopping rule counts against the cap."""
        return len(self.done) + len(self.gave_up)

    def settle(self, repeat: int, ok: bool) -> None:
        (self.done if ok else self.gave_up).add(repeat)
        self.attempts.pop(repeat, None)
        self.advance()

    def advance(self) -> None:
        while self.next in self.done or self.next in self.gave_up:
            self.next += 1


@dataclasses.dataclass(eq=False)
class _RunState:
    """Everything one run is given and everything it changes, by group (in field order):

    Given: the target, the sink, the cancel event, the progress observer, the options and
    the logger bound to the profile; fixed for the run.

    Reported: `profile`, replaced (never mutated) at every change and handed, as a copy, to
    `on_progress`.

    Storage: `buffer` holds the samples measured since the last batch was handed to the
    `writer` (which stores batches on its own thread, numbers their ids and rides out
    store outages: _sample_writer.py); `samples` are the samples the sink holds, in
    stored order, with the seq the store gives them (contiguous from 0 in append order),
    read from the sink once at the start and extended with what the writer stored: what
    the adaptive planner fits. Kept for adaptive plans only (`keeps_samples`);
    `last_flush` times the batch interval.

    Plan: `configs` to measure (the grid's, then those of each added prompt size, in the
    order added), `totals` the accepted total_ns per configuration, `reps` which of its
    repeats are settled, `completed` the accepted samples in all, `added` the adaptively
    added prompt sizes in the order added.

    Judgement: the contention `detector` and its `monitors`, the stopping `rule` (made
    anew after the warm-ups: the budget starts there), and the tallies of nonconforming
    samples and abandoned repeats.

    Outages: the current outage of the store and of the target (_outage.py), and per
    dependency how many outages were ridden out and the longest (provenance "outage.*").

    Spread: the largest lag of a round's start behind its schedule, and the rounds started.
    """

    target: GenerationTarget
    sink: SampleSink
    cancel: threading.Event
    on_progress: Callable[[Profile], None]
    opts: RunnerOptions
    log: FilteringBoundLogger

    profile: Profile

    buffer: list[Sample] = dataclasses.field(default_factory=list)
    writer: SampleWriter = dataclasses.field(init=False)
    samples: list[Sample] = dataclasses.field(default_factory=list)
    last_flush: float = dataclasses.field(default_factory=time.monotonic)

    configs: list[Config] = dataclasses.field(default_factory=list)
    totals: dict[Config, list[int]] = dataclasses.field(default_factory=dict)
    reps: dict[Config, _Repeats] = dataclasses.field(default_factory=dict)
    completed: int = 0
    added: list[int] = dataclasses.field(default_factory=list)

    detector: ContentionDetector = dataclasses.field(init=False)
    monitors: MonitorSet = dataclasses.field(default_factory=MonitorSet)
    rule: StoppingRule = dataclasses.field(init=False)
    nonconforming: int = 0
    abandoned: int = 0
    # waiting contention out (_wait_out): when the current episode began (None: no
    # contention since the last accepted sample), its back-offs, all time paused
    episode_start: float | None = None
    episode_waits: int = 0
    paused_s: float = 0.0
    evidence: TimingEvidence = dataclasses.field(init=False)

    store_outage: Outage = dataclasses.field(init=False)
    target_outage: Outage = dataclasses.field(init=False)
    outages: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    longest_outage_s: dict[str, float] = dataclasses.field(default_factory=dict)

    spread_lag_s: float = 0.0
    spread_started: int = 0

    def __post_init__(self) -> None:
        target = self.profile.target
        self.evidence = TimingEvidence(
            tokenizer=target.tokenizer if target.kind == TargetKind.HTTP else ""
        )
        self.detector = ContentionDetector(self.opts.contention)
        self.rule = StoppingRule(self.profile.plan, clock=self.opts.clock)
        rng = random.Random(f"idealrt-backoff:{self.profile.id}")
        self.store_outage = Outage(self.opts.retry, self.opts.clock, rng)
        self.target_outage = Outage(self.opts.retry, self.opts.clock, rng)
        self.writer = SampleWriter(
            self.sink,
            self.profile.id,
            outage=Outage(self.opts.retry, self.opts.clock, rng),
            sleep=self.opts.sleep,
            cancel=self.cancel,
            log=self.log,
            keep=self.keeps_samples,
            background=self.opts.background_writes,
        )

    @property
    def keeps_samples(self) -> bool:
        """Only the adaptive planner needs the stored samples; a long profile that is not
        adaptive does not hold them all in memory."""
        return self.profile.plan.adaptive_target_rel > 0


# ------------------------------------------------------------ plumbing


def _emit(run: _RunState) -> None:
    try:
        run.on_progress(dataclasses.replace(run.profile))
    except Exception:  # a broken observer must not break a measurement
        run.log.exception("progress_callback_failed")


def _update(run: _RunState, **changes: Any) -> None:
    run.profile = dataclasses.replace(run.profile, **changes)
    _emit(run)


def _record(run: _RunState, entries: Mapping[str, str], **changes: Any) -> None:
    merged = {**run.profile.provenance.entries, **entries}
    _update(run, provenance=dataclasses.replace(run.profile.provenance, entries=merged), **changes)


# ------------------------------------------------------------ outages


def _outage_failed(
    run: _RunState, outage: Outage, exc: IdealrtError, what: str, reason: str, detail: str = ""
) -> float:
    """Record a failed call to `what` (the store, the target): the seconds to wait before
    the next try; raises _Stop (FAILED, `reason`) once the outage window is spent."""
    first = not outage.active
    delay = outage.failed(exc)
    if first:
        run.log.warning(f"{what}_unavailable", reason=exc.reason, error=exc.message)
    if delay is None:
        run.log.error(f"{what}_outage_too_long", elapsed_s=outage.elapsed_s())
        raise _Stop(ProfileState.FAILED, f"{reason}: the {what} was {outage.describe()}{detail}")
    run.log.info(f"{what}_retry", attempt=outage.attempts, delay_s=round(delay, 3))
    return delay


def _pause(run: _RunState, delay: float) -> None:
    """Wait `delay` seconds on the cancel event (the options' sleep)."""
    if run.opts.sleep(run.cancel, delay):
        raise _Cancelled


def _outage_over(run: _RunState, outage: Outage, what: str) -> None:
    if not outage.active:
        return
    elapsed = outage.elapsed_s()
    run.log.info(f"{what}_back", elapsed_s=round(elapsed, 3), attempts=outage.attempts)
    run.outages[what] += 1
    run.longest_outage_s[what] = max(run.longest_outage_s.get(what, 0.0), elapsed)
    outage.clear()


def _store_call(run: _RunState, what: str, call: Callable[[], _T]) -> _T:
    """An idempotent store call that waits out an outage (the run pauses meanwhile)."""
    while True:
        try:
            result = call()
        except IdealrtError as exc:
            if not is_transient(exc):
                raise
            _pause(run, _outage_failed(run, run.store_outage, exc, "store", STORE_UNAVAILABLE))
            run.log.debug("store_call_retry", call=what)
            continue
        _outage_over(run, run.store_outage, "store")
        return result


def _target_call(run: _RunState, call: Callable[[], _T]) -> _T:
    """A target call (prepare, one generation) that waits out TargetUnavailable and is
    then made again: the target reloads what it lost."""
    while True:
        try:
            result = call()
        except TargetUnavailable as exc:
            _pause(run, _outage_failed(run, run.target_outage, exc, "target", SERVING_UNAVAILABLE))
            continue
        _outage_over(run, run.target_outage, "target")
        return result


# ------------------------------------------------------------ storage


def _unstored(run: _RunState) -> int:
    return len(run.buffer) + run.writer.unstored()


def _raise_store_failure(run: _RunState) -> None:
    """The writer's reason to stop, as the run's: FAILED STORE_UNAVAILABLE past the
    outage window, the store's own error otherwise."""
    failure = run.writer.failure()
    if isinstance(failure, StoreGaveUp):
        raise _Stop(ProfileState.FAILED, f"{STORE_UNAVAILABLE}: {failure}")
    if failure is not None:
        raise failure


def _flush(run: _RunState, force: bool = False, wait: bool = False) -> None:
    """Hand what is due (a full batch, the interval, or everything with `force`) to the
    writer, in batches of at most `batch_samples`. `wait`: until the store has everything
    (or the writer stopped); without, measuring goes on, until `max_buffered_samples`
    samples are unstored: then it waits for the writer to store a batch."""
    _raise_store_failure(run)
    size = max(1, run.opts.batch_samples)
    limit = max(1, min(size, run.opts.max_buffered_samples))
    due = time.monotonic() - run.last_flush >= run.opts.batch_interval_s
    if run.buffer and (force or due or len(run.buffer) >= limit):
        for i in range(0, len(run.buffer), size):
            run.writer.submit(run.buffer[i : i + size])
        run.buffer = []
        run.last_flush = time.monotonic()
    if wait:
        run.writer.drain()
    else:
        run.writer.pump()
        run.writer.wait_for_room(run.opts.max_buffered_samples - len(run.buffer))
    _raise_store_failure(run)


def _final_flush(run: _RunState, state: ProfileState, error: str) -> tuple[ProfileState, str]:
    """Store what is left; the state and error the profile ends with. A cancelled run
    tries once (the writer does not wait out an outage then): what the store did not take
    is counted in provenance ("store.unstored_samples") and measured again if the profile
    resumes."""
    try:
        _flush(run, force=True, wait=True)
    except _Stop as stop:  # the store stayed unreachable past the window
        if state not in (ProfileState.FAILED, ProfileState.CANCELLED):
            state, error = stop.state, stop.error
    except Exception as exc:  # the run's top: whatever it is, the profile must end
        run.log.exception("final_flush_failed")
        if state != ProfileState.FAILED:
            state, error = ProfileState.FAILED, f"STORE_WRITE_FAILED: {error_text(exc)}"
    run.writer.close()
    unstored = _unstored(run)
    if unstored:
        run.log.warning("samples_not_stored", count=unstored, state=state.value)
        entries = {**run.profile.provenance.entries, "store.unstored_samples": str(unstored)}
        run.profile = dataclasses.replace(
            run.profile, provenance=dataclasses.replace(run.profile.provenance, entries=entries)
        )
        if state == ProfileState.SUCCEEDED:  # cannot happen: success waits for the store
            state, error = ProfileState.FAILED, f"{STORE_UNAVAILABLE}: {unstored} not stored"
    return state, error


def _check_cancel(run: _RunState) -> None:
    if run.cancel.is_set():
        raise _Cancelled


# ------------------------------------------------------------ one sample


def _generate(
    run: _RunState, config: Config, seed: int
) -> tuple[Sample, int, ContentionObservation]:
    window = run.monitors.before()
    t0 = time.perf_counter_ns()
    sample = run.target.generate(config.prompt_tokens, config.output_tokens, seed)
    wall_ns = time.perf_counter_ns() - t0
    return sample, wall_ns, run.monitors.after(window)


def _measure(run: _RunState, config: Config, repeat: int, seed: int) -> tuple[Sample, int]:
    """One generation bracketed by the monitors. Token counts are checked here too,
    whatever the target did: a wrong-length result is never kept as OK."""
    sample, wall_ns, observation = _target_call(run, lambda: _generate(run, config, seed))
    # decode_ns may be empty: a black-box API can report totals only (the serving
    # target itself insists on o - 1 steps); when present it must be complete.
    conforming = (
        sample.prompt_tokens == config.prompt_tokens
        and sample.output_tokens == config.output_tokens
        and (not sample.decode_ns or len(sample.decode_ns) == config.output_tokens - 1)
    )
    sample = dataclasses.replace(
        sample,
        heldout=config.heldout,
        repeat=repeat,
        contention=observation,
        flag=sample.flag if conforming else SampleFlag.NONCONFORMING,
    )
    return sample, wall_ns


def _nonconforming(run: _RunState, config: Config, sample: Sample) -> None:
    run.nonconforming += 1
    run.buffer.append(sample)
    run.log.warning(
        "nonconforming_sample",
        want=(config.prompt_tokens, config.output_tokens),
        got=(sample.prompt_tokens, sample.output_tokens, len(sample.decode_ns)),
    )
    if run.nonconforming >= run.opts.max_nonconforming:
        raise _Stop(
            ProfileState.FAILED,
            f"NONCONFORMING: {run.nonconforming} generations did not have the requested "
            f"token counts (last: asked p={config.prompt_tokens} o={config.output_tokens}, "
            f"got p={sample.prompt_tokens} o={sample.output_tokens} with "
            f"{len(sample.decode_ns)} decode steps)",
        )


# ------------------------------------------------------------ phases


def _prepare(run: _RunState) -> None:
    """Load the target, read what the sink holds (resume), fingerprint; sets the run's
    configurations, totals, settled repeats, added sizes and stored samples."""
    spec: ModelSpec | None = _target_call(run, run.target.prepare)
    validate_plan(run.profile.plan, spec)
    env = run.target.environment()
    run.monitors = run.opts.monitors(run.profile, env)
    plan = run.profile.plan
    pid = run.profile.id
    # the only read: the run keeps the rest
    existing = _store_call(run, "all_samples", lambda: run.sink.all_samples(pid))
    run.added = added_prompt_sizes(plan, existing)
    run.configs = configurations(plan, run.added)
    by_key = {(c.prompt_tokens, c.output_tokens, c.heldout): c for c in run.configs}
    run.totals = {c: [] for c in run.configs}
    run.reps = {c: _Repeats() for c in run.configs}
    run.writer.stored = len(existing)
    run.samples = existing if run.keeps_samples else []
    contended: collections.Counter[tuple[Config, int]] = collections.Counter()
    duplicates = 0
    for s in existing:
        c = by_key.get((s.prompt_tokens, s.output_tokens, s.heldout))
        if c is None:
            continue
        if s.flag == SampleFlag.OK and s.repeat in run.reps[c].done:
            duplicates += 1  # stored twice by an older version: counted once
            continue
        run.detector.seed(c, s)
        if s.flag == SampleFlag.OK:
            run.reps[c].done.add(s.repeat)
            run.totals[c].append(s.total_ns)
            run.evidence.add(s)
        elif s.flag == SampleFlag.CONTENDED:
            contended[(c, s.repeat)] += 1
        elif s.flag == SampleFlag.NONCONFORMING:
            run.nonconforming += 1
    for (c, r), tries in contended.items():
        rep = run.reps[c]
        if r in rep.done:
            continue
        if tries > run.opts.contention.max_retries:
            rep.gave_up.add(r)
            run.abandoned += 1
        else:
            rep.attempts[r] = tries
    for rep in run.reps.values():
        rep.advance()
    run.completed = sum(len(v) for v in run.totals.values())
    extra = dict(run.monitors.describe())
    extra["lease.device_key"] = device_key(run.profile.stack.device)
    extra["profile.resumed_samples"] = str(len(existing))
    if duplicates:
        extra["profile.resumed_duplicates"] = str(duplicates)
    if run.added:
        extra["profile.resumed_adaptive_sizes"] = ",".join(map(str, run.added))
    if run.monitors.gpu is not None:
        extra["gpu.foreign_processes_at_start"] = str(len(run.monitors.gpu.foreign_pids()))
    provenance = collect_fingerprint(run.profile, spec=spec, target_env=env, extra=extra)
    _update(
        run,
        model_spec=spec or run.profile.model_spec,
        provenance=provenance,
        total_samples=total_samples(plan, len(run.added)),
        completed_samples=run.completed,
    )
    run.log.info(
        "profile_prepared", configs=len(run.configs), resumed=len(existing), duplicates=duplicates
    )


def _warmups(run: _RunState) -> None:
    """Warm-ups of the plan's grid (on resume too: the server may be cold)."""
    plan = run.profile.plan
    for config, w in warmup_order(configurations(plan), plan):
        _check_cancel(run)
        sample, _ = _measure(run, config, w, sample_seed(plan, config, -1 - w))
        if sample.flag == SampleFlag.NONCONFORMING:
            _nonconforming(run, config, sample)
        else:
            run.buffer.append(dataclasses.replace(sample, flag=SampleFlag.WARMUP))
        _flush(run)


def _spread_schedule(run: _RunState) -> SpreadSchedule | None:
    """The schedule of the plan's grid rounds (None without spread, or when the grid is
    done: a resumed adaptive run), anchored now (see schedule.py)."""
    plan = run.profile.plan
    if plan.spread_s <= 0:
        return None
    rounds = effective_max_repeats(plan)
    first = min(run.reps[c].next for c in configurations(plan))
    if first >= rounds:
        return None
    schedule = SpreadSchedule(rounds, plan.spread_s, seed=plan.seed, clock=run.opts.clock)
    if first:
        schedule.begin_at_round(first)
    else:
        schedule.begin()
    entries = dict(run.profile.provenance.entries)
    entries["spread.schedule"] = (
        f"{rounds} rounds over {plan.spread_s:g} s, stratified jitter, seed {plan.seed}"
        + (f"; resumed at round {first}" if first else "")
    )
    _update(run, provenance=dataclasses.replace(run.profile.provenance, entries=entries))
    run.log.info("spread_schedule", rounds=rounds, spread_s=plan.spread_s, first=first)
    return schedule


def _wait_for_round(run: _RunState, schedule: SpreadSchedule, r: int) -> None:
    """Block until round r is due, on the cancel event (a set event ends the wait at
    once). validate_plan keeps spread_s below budget_s, so no wait outlasts the budget."""
    due = schedule.due(r)
    if not sleep_until(due, run.cancel, clock=run.opts.clock):
        raise _Cancelled
    lag = max(0.0, run.opts.clock() - due)
    run.spread_lag_s = max(run.spread_lag_s, lag)
    run.spread_started += 1
    run.log.info("spread_round_started", round=r, offset_s=schedule.offsets[r], lag_s=lag)


def _rounds(run: _RunState, schedule: SpreadSchedule | None = None) -> StopReason:
    """Measure `run.configs` in randomized rounds until the stopping rule says stop. Round
    r measures repeat r of every pending configuration whose first unsettled repeat is r
    (after a resume, from the retries that repeat has used)."""
    plan, policy, rule, totals, reps = (
        run.profile.plan,
        run.opts.contention,
        run.rule,
        run.totals,
        run.reps,
    )
    while True:
        pending = rule.pending(totals, {c: reps[c].slots for c in totals})
        if not pending:
            return rule.reason(totals)
        r = min(reps[c].next for c in pending)
        if schedule is not None and r < schedule.rounds:
            _wait_for_round(run, schedule, r)
        include = [c for c in pending if reps[c].next == r]
        queue = collections.deque(
            (c, reps[c].attempts.get(r, 0)) for c in round_order(run.configs, plan, r, include)
        )
        while queue:
            _check_cancel(run)
            if rule.budget_spent():
                return StopReason.BUDGET
            config, attempt = queue.popleft()
            if attempt and run.cancel.wait(policy.retry_backoff_s * attempt):
                raise _Cancelled
            sample, wall_ns = _measure(run, config, r, sample_seed(plan, config, r, attempt))
            retry = False
            if sample.flag == SampleFlag.NONCONFORMING:
                _nonconforming(run, config, sample)
                retry = True
            else:
                verdict = run.detector.judge(config, sample, wall_ns)
                if verdict.contended:
                    run.log.info(
                        "sample_contended",
                        p=config.prompt_tokens,
                        o=config.output_tokens,
                        repeat=r,
                        attempt=attempt,
                        reasons=list(verdict.reasons),
                    )
                    run.buffer.append(dataclasses.replace(sample, flag=SampleFlag.CONTENDED))
                    retry = True
                    _flush(run)  # what was measured is stored before the pause
                    _wait_out(run, verdict.reasons)
                else:
                    run.episode_start, run.episode_waits = None, 0
                    run.detector.accept(config, sample)
                    run.buffer.append(sample)
                    totals[config].append(sample.total_ns)
                    run.evidence.add(sample)
                    reps[config].settle(r, ok=True)
                    run.completed += 1
            if retry:
                if attempt < policy.max_retries:
                    reps[config].attempts[r] = attempt + 1
                    queue.append((config, attempt + 1))
                else:
                    run.abandoned += 1
                    reps[config].settle(r, ok=False)
            _flush(run)
            run.profile = dataclasses.replace(run.profile, completed_samples=run.completed)
            _emit(run)


def _wait_out(run: _RunState, reasons: Sequence[str]) -> None:
    """Contention was seen: pause until it has passed (ContentionPolicy: quiet windows on
    the monitors, blocking waits only, nothing spins on the measured cores), so that the
    re-measurement sees the machine as it is without it. INVALID (raised) once the
    episode has lasted `patience_s`."""
    policy, clock, mon = run.opts.contention, run.opts.clock, run.monitors
    if run.episode_start is None:
        run.episode_start = clock()
    watching = policy.use_monitors and mon.watching
    window = policy.quiet_window_s
    while True:
        lasted = clock() - run.episode_start
        if lasted >= policy.patience_s:
            raise _Stop(
                ProfileState.INVALID,
                f"CONTENTION: contention persisted for {lasted:.0f} s, past the patience of "
                f"{policy.patience_s:.0f} s (IDEALRT_CONTENTION_PATIENCE_S); last evidence: "
                f"{'; '.join(reasons) or 'the samples'}; "
                f"{run.detector.evidence(run.abandoned)}",
            )
        t0 = clock()
        if not watching:  # nothing to watch: back off, the re-measurement judges
            delay = min(window * 2**run.episode_waits, 8 * window, policy.patience_s - lasted)
            run.episode_waits += 1
            if run.opts.sleep(run.cancel, delay):
                raise _Cancelled
            run.paused_s += clock() - t0
            return
        before = mon.before()
        if run.opts.sleep(run.cancel, window):
            raise _Cancelled
        seen = mon.after(before)
        run.paused_s += clock() - t0
        if (
            seen.foreign_cpu_s < policy.foreign_cpu_frac * window
            and seen.gpu_foreign_processes == 0
        ):
            run.log.info("contention_waited_out", waited_s=round(clock() - run.episode_start, 3))
            return


def _adaptive(run: _RunState, reason: StopReason) -> StopReason:
    """Add prompt sizes until adaptive.py says stop; returns the last rounds' reason."""
    plan = run.profile.plan
    planner = AdaptivePlanner(plan, added=run.added, options=run.opts.adaptive)
    while reason != StopReason.BUDGET:
        _check_cancel(run)
        # store what is measured (batches as before), so that run.samples is all of it:
        # the planner fits what the sink holds without reading it back
        _flush(run, force=True, wait=True)
        run.samples.extend(run.writer.take_stored())
        size = planner.next_size(run.samples, budget_spent=run.rule.budget_spent())
        if size is None:
            break
        assert len(run.configs) == len(configurations(plan, run.added))
        new = configurations(plan, [*run.added, size])[len(run.configs) :]
        run.added.append(size)
        run.configs.extend(new)
        run.totals.update((c, []) for c in new)
        run.reps.update((c, _Repeats()) for c in new)
        _record(run, planner.provenance(), total_samples=total_samples(plan, len(run.added)))
        run.log.info(
            "adaptive_size_added", p=size, rel_halfwidth=planner.added_rel[-1], added=run.added
        )
        reason = _rounds(run)
    changes: dict[str, Any] = {}
    if reason == StopReason.BUDGET:
        planner.halt_budget()
        # configurations of added sizes that the budget left without a sample were
        # optional: dropped (and a size with none left is no longer "added")
        for c in [c for c in run.configs if c.prompt_tokens in run.added and not run.totals[c]]:
            run.configs.remove(c)
            del run.totals[c]
            del run.reps[c]
        kept = {c.prompt_tokens for c in run.totals}
        planner.drop_unmeasured([p for p in run.added if p not in kept])
        run.added = [p for p in run.added if p in kept]
        changes["total_samples"] = total_samples(plan, len(run.added))
    _record(run, planner.provenance(), **changes)
    run.log.info("adaptive_finished", stop=planner.stop, added=run.added)
    return reason


def _missing(run: _RunState, reason: StopReason) -> tuple[dict[Config, list[int]], int]:
    """The planned repeats without an OK sample, per configuration, and how many repeats
    were planned: repeats 0..n-1 of every configuration, n = plan.repeats or, where the
    stopping rule stopped later (until_ci_rel) or earlier (the budget), the repeats it
    settled."""
    repeats = run.profile.plan.repeats
    missing: dict[Config, list[int]] = {}
    planned = 0
    for c, rep in run.reps.items():
        need = rep.slots if reason == StopReason.BUDGET else max(rep.slots, repeats)
        planned += need
        lacking = [r for r in range(need) if r not in rep.done]
        if lacking:
            missing[c] = lacking
    return missing, planned


def _describe_missing(missing: Mapping[Config, list[int]], shown: int = 5) -> str:
    parts = []
    for c, lacking in list(missing.items())[:shown]:
        held = " held out" if c.heldout else ""
        which = ",".join(map(str, lacking[:10])) + ("..." if len(lacking) > 10 else "")
        parts.append(f"p={c.prompt_tokens} o={c.output_tokens}{held} repeats {which}")
    if len(missing) > shown:
        parts.append(f"and {len(missing) - shown} more configurations")
    return "; ".join(parts)


def _conclude(run: _RunState, reason: StopReason) -> None:
    """Record why the rounds stopped and the contention tallies; raise _Stop for a run
    that is INVALID (contention), or FAILED (budget spent with configurations unmeasured;
    any other planned sample missing: INCOMPLETE). A run that passes has every planned
    sample: total_samples becomes what was planned."""
    totals = run.totals
    entries = dict(run.profile.provenance.entries)
    entries["stopping.reason"] = reason.value
    if run.profile.plan.spread_s > 0:
        entries["spread.rounds_started"] = str(run.spread_started)
        entries["spread.max_lag_s"] = f"{run.spread_lag_s:.6g}"
    worst = run.rule.worst_ci_rel(totals)
    entries["stopping.worst_ci_rel"] = f"{worst:.6g}"
    entries["contention.measured"] = str(run.detector.measured)
    entries["contention.contended"] = str(run.detector.contended)
    entries["contention.abandoned_repeats"] = str(run.abandoned)
    entries["contention.paused_s"] = f"{run.paused_s:.3f}"
    entries.update(run.evidence.provenance())
    run.profile = dataclasses.replace(
        run.profile, provenance=dataclasses.replace(run.profile.provenance, entries=entries)
    )
    unmeasured = [c for c, v in totals.items() if not v]
    missing, planned = _missing(run, reason)
    lost = sum(len(v) for v in missing.values())
    abandoned = any(r in run.reps[c].gave_up for c, v in missing.items() for r in v)
    if (
        run.detector.persistent()
        or (unmeasured and reason != StopReason.BUDGET)
        or (abandoned and not unmeasured)
    ):
        evidence = run.detector.evidence(run.abandoned)
        if unmeasured:
            evidence += f"; {len(unmeasured)} configurations have no uncontended sample"
        if missing:
            evidence += (
                f"; {lost} of {planned} planned samples missing ({_describe_missing(missing)})"
            )
        raise _Stop(ProfileState.INVALID, f"CONTENTION: {evidence}")
    if unmeasured:
        raise _Stop(
            ProfileState.FAILED,
            f"BUDGET_EXHAUSTED: budget_s={run.profile.plan.budget_s} spent with "
            f"{len(unmeasured)} of {len(totals)} configurations unmeasured",
        )
    if missing:
        raise _Stop(
            ProfileState.FAILED,
            f"{INCOMPLETE}: {lost} of {planned} planned samples missing "
            f"({_describe_missing(missing)})",
        )
    run.profile = dataclasses.replace(run.profile, total_samples=planned, completed_samples=planned)
    insufficient = run.evidence.insufficient()
    if insufficient:
        raise _Stop(ProfileState.INVALID, insufficient)


# ------------------------------------------------------------ the whole run


def _finish(run: _RunState, state: ProfileState, error: str = "") -> Profile:
    """End the profile; provenance records the outages ridden out ("outage.*": the final
    store write may have waited for one too)."""
    if run.writer.outages:
        run.outages["store"] += run.writer.outages
        run.longest_outage_s["store"] = max(
            run.longest_outage_s.get("store", 0.0), run.writer.longest_outage_s
        )
    if run.outages:
        entries = dict(run.profile.provenance.entries)
        for what, count in sorted(run.outages.items()):
            entries[f"outage.{what}.count"] = str(count)
            entries[f"outage.{what}.longest_s"] = f"{run.longest_outage_s[what]:.6g}"
        run.profile = dataclasses.replace(
            run.profile, provenance=dataclasses.replace(run.profile.provenance, entries=entries)
        )
    run.profile = dataclasses.replace(run.profile, state=state, error=error, end_time=utcnow())
    run.log.info("profile_finished", state=state.value, error=error or None)
    _emit(run)
    return run.profile


def _record_target_environment(run: _RunState) -> None:
    """The target's environment again at the end of the run (its counters, e.g. the HTTP
    target's retries and errors, cover the whole run then), as `target.*` provenance."""
    if "profile.start_time" not in run.profile.provenance.entries:  # never fingerprinted
        return
    try:
        env = run.target.environment()
    except Exception:  # a target that cannot describe itself must not lose the samples
        run.log.exception("target_environment_failed")
        return
    entries = {**run.profile.provenance.entries, **{f"target.{k}": str(v) for k, v in env.items()}}
    run.profile = dataclasses.replace(
        run.profile, provenance=dataclasses.replace(run.profile.provenance, entries=entries)
    )


def _execute(run: _RunState) -> Profile:
    plan = run.profile.plan
    try:
        validate_plan(plan)
    except InvalidArgument as exc:
        return _finish(run, ProfileState.FAILED, error_text(exc))
    try:
        lease = acquire_lease(
            run.opts.lease_dir,
            run.profile.stack.device,
            profile_id=run.profile.id,
            policy=plan.lease,
            cancel=run.cancel,
            timeout_s=run.opts.lease_timeout_s,
        )
    except LeaseWaitCancelled:
        return _finish(run, ProfileState.CANCELLED, "CANCELLED: while waiting for the lease")
    except FailedPrecondition as exc:
        return _finish(run, ProfileState.FAILED, error_text(exc))
    with lease:
        _update(run, state=ProfileState.RUNNING, start_time=run.profile.start_time or utcnow())
        run.log.info("profile_started", device=run.profile.stack.device)
        state, error = ProfileState.SUCCEEDED, ""
        # a target that waits between retries (the HTTP target) waits on the run's cancel
        bind_cancel = getattr(run.target, "bind_cancel", None)
        if bind_cancel is not None:
            bind_cancel(run.cancel)
        try:
            _prepare(run)
            _warmups(run)
            run.rule = StoppingRule(plan, clock=run.opts.clock)  # budget starts here
            reason = _rounds(run, _spread_schedule(run))
            if plan.adaptive_target_rel > 0:
                reason = _adaptive(run, reason)
            _conclude(run, reason)
        except _Cancelled:
            state, error = ProfileState.CANCELLED, ""
        except _Stop as stop:
            state, error = stop.state, stop.error
        except Exception as exc:
            if run.cancel.is_set():  # e.g. the target's retry wait was cancelled
                run.log.info("profile_cancelled_in_target", error=error_text(exc))
                state, error = ProfileState.CANCELLED, ""
            else:
                run.log.exception("profile_error")
                state, error = ProfileState.FAILED, error_text(exc)
        _record_target_environment(run)
        state, error = _final_flush(run, state, error)
        try:
            run.target.close()
        except Exception:
            run.log.exception("target_close_failed")
        return _finish(run, state, error)


def run_profile(
    profile: Profile,
    target: GenerationTarget,
    sink: SampleSink,
    *,
    cancel: threading.Event,
    on_progress: Callable[[Profile], None],
    options: RunnerOptions | None = None,
) -> Profile:
    """Measure `profile` on `target`, storing samples in `sink`; see the module docstring.
    `on_progress` receives a copy of the profile after every state change and sample."""
    run = _RunState(
        target=target,
        sink=sink,
        cancel=cancel,
        on_progress=on_progress,
        opts=options or RunnerOptions(),
        log=log.bind(profile_id=profile.id),
        profile=dataclasses.replace(profile, error=""),
    )
    return _execute(run)
