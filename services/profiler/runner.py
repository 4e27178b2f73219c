"""Run one profile: lease, fingerprint, warm-ups, randomized rounds, contention, storage.

`run_profile` is synchronous and runs in the caller's thread (the manager's worker). It
returns the final Profile (SUCCEEDED, FAILED, CANCELLED or INVALID) and never raises for a
measurement problem: the reason goes into Profile.error as "<REASON>: <message>".

Order of work:
 1. Validate the plan; take the device lease (plan.lease: WAIT or FAIL -> DEVICE_BUSY).
 2. Prepare the target (load the model), re-validate the plan against the resolved spec,
    fingerprint the environment.
 3. Resume: samples already in the sink for this profile count. Accepted (OK) samples of
    a (p, o, heldout) configuration are repeats already done; all stored samples seed the
    contention baselines and tally.
 4. Warm-ups (stored, flagged WARMUP; redone on resume: the server may be cold).
 5. Rounds (see plan.py): each sample is bracketed by the monitors, judged for contention,
    and stored flagged OK / CONTENDED / NONCONFORMING. A contended or nonconforming sample
    is re-measured at the end of the round after a back-off sleep, at most `max_retries`
    times; then that repeat is abandoned. `max_nonconforming` nonconforming samples fail the
    profile (NONCONFORMING): a target that cannot produce exact lengths is broken.
 6. Samples go to the sink in batches (every `batch_samples` samples or `batch_interval_s`
    seconds, checked between samples) with batch id "<profile_id>-b<N>", N = number of
    samples of the profile stored before the batch. A retried append is idempotent, and a
    resumed run starts numbering at what the sink holds, so it never re-uses an id.
 7. Cancel (the event) is checked between samples: what was measured is stored, the
    profile ends CANCELLED. Persistent contention ends it INVALID with the evidence.
 8. Spread (plan.spread_s > 0, schedule.py): round r of the plan's grid starts at its
    offset of a SpreadSchedule anchored after the warm-ups, waiting on the cancel event
    (cancellable at once, no polling; spread_s < budget_s, see plan.py). The lease is
    held for the whole profile, waits included: a profile spread over hours holds the
    device for hours, which suits HTTP targets (an API's device is not ours to free).
    Provenance records the schedule and how late rounds started ("spread.*").
 9. Adaptive planning (plan.adaptive_target_rel > 0, adaptive.py): once the plan's grid is
    measured, fit, add the prompt size where alpha(p) is least certain (one configuration
    per output length, measured in rounds like the grid, not spread), refit, until the
    target is met, the size cap is reached or the budget is spent; Profile.total_samples
    grows with each size, "adaptive.*" provenance records the sizes and the stop reason.
    Added configurations the budget left unmeasured are dropped, not failed.
10. Resume of either: sizes added before the restart are recognised from the stored samples
    (a fit sample whose prompt size is not in plan.prompt_tokens), their configurations
    rebuilt in the order added, so nothing is measured twice; a spread schedule restarts
    with the first unfinished round due at once and the later ones keeping their spacing.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from idealrt.core.domain import Profile, ProfileState, Sample, SampleFlag
from idealrt.core.errors import FailedPrecondition, IdealrtError, InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler.adaptive import AdaptiveOptions, AdaptivePlanner, added_prompt_sizes
from idealrt.services.profiler.contention import ContentionDetector, ContentionPolicy
from idealrt.services.profiler.fingerprint import collect_fingerprint
from idealrt.services.profiler.lease import LeaseWaitCancelled, acquire_lease, device_key
from idealrt.services.profiler.monitors import MonitorSet, parse_cores
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
from idealrt.services.profiler.schedule import SpreadSchedule, sleep_until
from idealrt.services.profiler.stopping import StoppingRule, StopReason
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["RunnerOptions", "SampleSink", "default_monitors", "error_text", "run_profile"]

log = structlog.get_logger(__name__)


class SampleSink(Protocol):
    """Where samples go (the store, or its gRPC client)."""

    def append_samples(self, profile_id: str, batch_id: str, samples: Sequence[Sample]) -> int: ...

    def all_samples(self, profile_id: str) -> list[Sample]: ...

    def count_samples(self, profile_id: str) -> int: ...


MonitorFactory = Callable[[Profile, Mapping[str, str]], MonitorSet]


def default_monitors(
    profile: Profile, target_env: Mapping[str, str], cores: Iterable[int] | None = None
) -> MonitorSet:
    """CPU monitor on `cores` (default: this process's affinity; bind other cores with
    functools.partial), counting the serving process as ours when the target reports it on
    this host; NVML for GPUs; RAPL."""
    if cores is None and profile.stack.options.get("cores", "").strip():
        cores = parse_cores(profile.stack.options["cores"])
    own: list[int] = []
    pid = target_env.get("serving.pid", "")
    if pid.isdigit() and target_env.get("serving.host") == socket.gethostname():
        own.append(int(pid))
    return MonitorSet.for_device(profile.stack.device, cores, own)


@dataclasses.dataclass(frozen=True)
class RunnerOptions:
    """clock: the monotonic clock of the budget and the spread schedule (waits block on the
    cancel event with timeouts measured on it; tests substitute both)."""

    lease_dir: Path = Path(".idealrt/leases")
    lease_timeout_s: float | None = None  # WAIT policy: give up (DEVICE_BUSY) after this
    contention: ContentionPolicy = dataclasses.field(default_factory=ContentionPolicy)
    batch_samples: int = 16
    batch_interval_s: float = 2.0
    max_nonconforming: int = 3
    append_retries: int = 3
    monitors: MonitorFactory = default_monitors
    adaptive: AdaptiveOptions = dataclasses.field(default_factory=AdaptiveOptions)
    clock: Callable[[], float] = time.monotonic


class _Cancelled(Exception):
    pass


class _Stop(Exception):
    """Ends the run with a given state and error."""

    def __init__(self, state: ProfileState, error: str) -> None:
        super().__init__(error)
        self.state = state
        self.error = error


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def error_text(exc: BaseException) -> str:
    """Profile.error of a failure: "<REASON>: <message>" (INTERNAL for foreign errors)."""
    if isinstance(exc, IdealrtError):
        return f"{exc.reason}: {exc.message}"
    return f"INTERNAL: {type(exc).__name__}: {exc}"


class _Run:
    def __init__(
        self,
        profile: Profile,
        target: GenerationTarget,
        sink: SampleSink,
        cancel: threading.Event,
        on_progress: Callable[[Profile], None],
        options: RunnerOptions,
    ) -> None:
        self.profile = dataclasses.replace(profile, error="")
        self.target = target
        self.sink = sink
        self.cancel = cancel
        self.on_progress = on_progress
        self.opts = options
        self.log = log.bind(profile_id=profile.id)
        self.buffer: list[Sample] = []
        self.stored = 0
        self.last_flush = time.monotonic()
        self.detector = ContentionDetector(options.contention)
        self.nonconforming = 0
        self.abandoned = 0
        self.monitors = MonitorSet()
        self.added: list[int] = []  # adaptively added prompt sizes, in the order added
        self.rule = StoppingRule(profile.plan, clock=options.clock)
        self.spread_lag_s = 0.0
        self.spread_started = 0

    # ------------------------------------------------------------ plumbing

    def _emit(self) -> None:
        try:
            self.on_progress(dataclasses.replace(self.profile))
        except Exception:  # a broken observer must not break a measurement
            self.log.exception("progress_callback_failed")

    def _update(self, **changes: Any) -> None:
        self.profile = dataclasses.replace(self.profile, **changes)
        self._emit()

    def _flush(self, force: bool = False) -> None:
        due = time.monotonic() - self.last_flush >= self.opts.batch_interval_s
        if not self.buffer or not (force or due or len(self.buffer) >= self.opts.batch_samples):
            return
        batch, batch_id = list(self.buffer), f"{self.profile.id}-b{self.stored}"
        for attempt in range(self.opts.append_retries + 1):
            try:
                self.sink.append_samples(self.profile.id, batch_id, batch)
                break
            except Exception:
                if attempt == self.opts.append_retries:
                    raise
                self.log.warning("append_samples_retry", batch_id=batch_id, attempt=attempt)
                time.sleep(0.2 * (attempt + 1))
        self.stored += len(batch)
        self.buffer.clear()
        self.last_flush = time.monotonic()

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled

    # ------------------------------------------------------------ one sample

    def _measure(self, config: Config, repeat: int, seed: int) -> tuple[Sample, int]:
        """One generation bracketed by the monitors. Token counts are checked here too,
        whatever the target did: a wrong-length result is never kept as OK."""
        window = self.monitors.before()
        t0 = time.perf_counter_ns()
        sample = self.target.generate(config.prompt_tokens, config.output_tokens, seed)
        wall_ns = time.perf_counter_ns() - t0
        observation = self.monitors.after(window)
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

    def _nonconforming(self, config: Config, sample: Sample) -> None:
        self.nonconforming += 1
        self.buffer.append(sample)
        self.log.warning(
            "nonconforming_sample",
            want=(config.prompt_tokens, config.output_tokens),
            got=(sample.prompt_tokens, sample.output_tokens, len(sample.decode_ns)),
        )
        if self.nonconforming >= self.opts.max_nonconforming:
            raise _Stop(
                ProfileState.FAILED,
                f"NONCONFORMING: {self.nonconforming} generations did not have the requested "
                f"token counts (last: asked p={config.prompt_tokens} o={config.output_tokens}, "
                f"got p={sample.prompt_tokens} o={sample.output_tokens} with "
                f"{len(sample.decode_ns)} decode steps)",
            )

    # ------------------------------------------------------------ phases

    def _prepare(self) -> tuple[list[Config], dict[Config, list[int]]]:
        spec: ModelSpec | None = self.target.prepare()
        validate_plan(self.profile.plan, spec)
        env = self.target.environment()
        self.monitors = self.opts.monitors(self.profile, env)
        plan = self.profile.plan
        existing = self.sink.all_samples(self.profile.id)
        self.added = added_prompt_sizes(plan, existing)
        configs = configurations(plan, self.added)
        by_key = {(c.prompt_tokens, c.output_tokens, c.heldout): c for c in configs}
        totals: dict[Config, list[int]] = {c: [] for c in configs}
        self.stored = len(existing)
        for s in existing:
            c = by_key.get((s.prompt_tokens, s.output_tokens, s.heldout))
            if c is None:
                continue
            self.detector.seed(c, s)
            if s.flag == SampleFlag.OK:
                totals[c].append(s.total_ns)
            elif s.flag == SampleFlag.NONCONFORMING:
                self.nonconforming += 1
        extra = dict(self.monitors.describe())
        extra["lease.device_key"] = device_key(self.profile.stack.device)
        extra["profile.resumed_samples"] = str(len(existing))
        if self.added:
            extra["profile.resumed_adaptive_sizes"] = ",".join(map(str, self.added))
        if self.monitors.gpu is not None:
            extra["gpu.foreign_processes_at_start"] = str(len(self.monitors.gpu.foreign_pids()))
        provenance = collect_fingerprint(self.profile, spec=spec, target_env=env, extra=extra)
        self._update(
            model_spec=spec or self.profile.model_spec,
            provenance=provenance,
            total_samples=total_samples(plan, len(self.added)),
            completed_samples=sum(len(v) for v in totals.values()),
        )
        self.log.info("profile_prepared", configs=len(configs), resumed=len(existing))
        return configs, totals

    def _warmups(self, configs: list[Config]) -> None:
        plan = self.profile.plan
        for config, w in warmup_order(configs, plan):
            self._check_cancel()
            sample, _ = self._measure(config, w, sample_seed(plan, config, -1 - w))
            if sample.flag == SampleFlag.NONCONFORMING:
                self._nonconforming(config, sample)
            else:
                self.buffer.append(dataclasses.replace(sample, flag=SampleFlag.WARMUP))
            self._flush()

    def _spread_schedule(self, totals: dict[Config, list[int]]) -> SpreadSchedule | None:
        """The schedule of the plan's grid rounds (None without spread, or when the grid is
        done: a resumed adaptive run), anchored now (see schedule.py)."""
        plan = self.profile.plan
        if plan.spread_s <= 0:
            return None
        rounds = effective_max_repeats(plan)
        first = min(len(totals[c]) for c in configurations(plan))
        if first >= rounds:
            return None
        schedule = SpreadSchedule(rounds, plan.spread_s, seed=plan.seed, clock=self.opts.clock)
        if first:
            schedule.begin_at_round(first)
        else:
            schedule.begin()
        entries = dict(self.profile.provenance.entries)
        entries["spread.schedule"] = (
            f"{rounds} rounds over {plan.spread_s:g} s, stratified jitter, seed {plan.seed}"
            + (f"; resumed at round {first}" if first else "")
        )
        self._update(provenance=dataclasses.replace(self.profile.provenance, entries=entries))
        self.log.info("spread_schedule", rounds=rounds, spread_s=plan.spread_s, first=first)
        return schedule

    def _wait_for_round(self, schedule: SpreadSchedule, r: int) -> None:
        """Block until round r is due, on the cancel event (a set event ends the wait at
        once). validate_plan keeps spread_s below budget_s, so no wait outlasts the budget."""
        due = schedule.due(r)
        if not sleep_until(due, self.cancel, clock=self.opts.clock):
            raise _Cancelled
        lag = max(0.0, self.opts.clock() - due)
        self.spread_lag_s = max(self.spread_lag_s, lag)
        self.spread_started += 1
        self.log.info("spread_round_started", round=r, offset_s=schedule.offsets[r], lag_s=lag)

    def _rounds(
        self,
        configs: list[Config],
        totals: dict[Config, list[int]],
        schedule: SpreadSchedule | None = None,
    ) -> StopReason:
        plan, policy, rule = self.profile.plan, self.opts.contention, self.rule
        slots = {c: len(v) for c, v in totals.items()}
        while True:
            pending = rule.pending(totals, slots)
            if not pending:
                return rule.reason(totals)
            r = min(slots[c] for c in pending)
            if schedule is not None and r < schedule.rounds:
                self._wait_for_round(schedule, r)
            queue = collections.deque(
                (c, 0) for c in round_order(configs, plan, r, [c for c in pending if slots[c] == r])
            )
            while queue:
                self._check_cancel()
                if rule.budget_spent():
                    return StopReason.BUDGET
                config, attempt = queue.popleft()
                if attempt and self.cancel.wait(policy.retry_backoff_s * attempt):
                    raise _Cancelled
                sample, wall_ns = self._measure(config, r, sample_seed(plan, config, r, attempt))
                retry = False
                if sample.flag == SampleFlag.NONCONFORMING:
                    self._nonconforming(config, sample)
                    retry = True
                else:
                    verdict = self.detector.judge(config, sample, wall_ns)
                    if verdict.contended:
                        self.log.info(
                            "sample_contended",
                            p=config.prompt_tokens,
                            o=config.output_tokens,
                            repeat=r,
                            attempt=attempt,
                            reasons=list(verdict.reasons),
                        )
                        self.buffer.append(dataclasses.replace(sample, flag=SampleFlag.CONTENDED))
                        retry = True
                    else:
                        self.detector.accept(config, sample)
                        self.buffer.append(sample)
                        totals[config].append(sample.total_ns)
                        slots[config] += 1
                if retry:
                    if attempt < policy.max_retries:
                        queue.append((config, attempt + 1))
                    else:
                        self.abandoned += 1
                        slots[config] += 1
                self._flush()
                self.profile = dataclasses.replace(
                    self.profile, completed_samples=sum(len(v) for v in totals.values())
                )
                self._emit()

    def _adaptive(
        self, configs: list[Config], totals: dict[Config, list[int]], reason: StopReason
    ) -> StopReason:
        """Add prompt sizes until adaptive.py says stop; returns the last rounds' reason."""
        plan = self.profile.plan
        planner = AdaptivePlanner(plan, added=self.added, options=self.opts.adaptive)
        while reason != StopReason.BUDGET:
            self._check_cancel()
            self._flush(force=True)
            samples = self.sink.all_samples(self.profile.id)
            size = planner.next_size(samples, budget_spent=self.rule.budget_spent())
            if size is None:
                break
            assert len(configs) == len(configurations(plan, self.added))
            new = configurations(plan, [*self.added, size])[len(configs) :]
            self.added.append(size)
            configs.extend(new)
            totals.update((c, []) for c in new)
            self._record(planner.provenance(), total_samples=total_samples(plan, len(self.added)))
            self.log.info(
                "adaptive_size_added", p=size, rel_halfwidth=planner.added_rel[-1], added=self.added
            )
            reason = self._rounds(configs, totals)
        changes: dict[str, Any] = {}
        if reason == StopReason.BUDGET:
            planner.halt_budget()
            # configurations of added sizes that the budget left without a sample were
            # optional: dropped (and a size with none left is no longer "added")
            for c in [c for c in configs if c.prompt_tokens in self.added and not totals[c]]:
                configs.remove(c)
                del totals[c]
            kept = {c.prompt_tokens for c in totals}
            planner.drop_unmeasured([p for p in self.added if p not in kept])
            self.added = [p for p in self.added if p in kept]
            changes["total_samples"] = total_samples(plan, len(self.added))
        self._record(planner.provenance(), **changes)
        self.log.info("adaptive_finished", stop=planner.stop, added=self.added)
        return reason

    def _record(self, entries: Mapping[str, str], **changes: Any) -> None:
        merged = {**self.profile.provenance.entries, **entries}
        self._update(
            provenance=dataclasses.replace(self.profile.provenance, entries=merged), **changes
        )

    def _conclude(self, reason: StopReason, totals: dict[Config, list[int]]) -> None:
        rule = self.rule
        entries = dict(self.profile.provenance.entries)
        entries["stopping.reason"] = reason.value
        if self.profile.plan.spread_s > 0:
            entries["spread.rounds_started"] = str(self.spread_started)
            entries["spread.max_lag_s"] = f"{self.spread_lag_s:.6g}"
        worst = rule.worst_ci_rel(totals)
        entries["stopping.worst_ci_rel"] = f"{worst:.6g}"
        entries["contention.measured"] = str(self.detector.measured)
        entries["contention.contended"] = str(self.detector.contended)
        entries["contention.abandoned_repeats"] = str(self.abandoned)
        self.profile = dataclasses.replace(
            self.profile, provenance=dataclasses.replace(self.profile.provenance, entries=entries)
        )
        missing = [c for c, v in totals.items() if not v]
        if self.detector.persistent() or (missing and reason != StopReason.BUDGET):
            evidence = self.detector.evidence(self.abandoned)
            if missing:
                evidence += f"; {len(missing)} configurations have no uncontended sample"
            raise _Stop(ProfileState.INVALID, f"CONTENTION: {evidence}")
        if missing:
            raise _Stop(
                ProfileState.FAILED,
                f"BUDGET_EXHAUSTED: budget_s={self.profile.plan.budget_s} spent with "
                f"{len(missing)} of {len(totals)} configurations unmeasured",
            )
        if reason == StopReason.PRECISION:
            self.profile = dataclasses.replace(
                self.profile, total_samples=self.profile.completed_samples
            )

    # ------------------------------------------------------------ the whole run

    def _finish(self, state: ProfileState, error: str = "") -> Profile:
        self.profile = dataclasses.replace(self.profile, state=state, error=error, end_time=_now())
        self.log.info("profile_finished", state=state.value, error=error or None)
        self._emit()
        return self.profile

    def execute(self) -> Profile:
        plan = self.profile.plan
        try:
            validate_plan(plan)
        except InvalidArgument as exc:
            return self._finish(ProfileState.FAILED, error_text(exc))
        try:
            lease = acquire_lease(
                self.opts.lease_dir,
                self.profile.stack.device,
                profile_id=self.profile.id,
                policy=plan.lease,
                cancel=self.cancel,
                timeout_s=self.opts.lease_timeout_s,
            )
        except LeaseWaitCancelled:
            return self._finish(ProfileState.CANCELLED, "CANCELLED: while waiting for the lease")
        except FailedPrecondition as exc:
            return self._finish(ProfileState.FAILED, error_text(exc))
        with lease:
            self._update(state=ProfileState.RUNNING, start_time=self.profile.start_time or _now())
            self.log.info("profile_started", device=self.profile.stack.device)
            state, error = ProfileState.SUCCEEDED, ""
            try:
                configs, totals = self._prepare()
                self._warmups(configurations(plan))  # the plan's grid (on resume too)
                self.rule = StoppingRule(plan, clock=self.opts.clock)  # budget starts here
                reason = self._rounds(configs, totals, self._spread_schedule(totals))
                if plan.adaptive_target_rel > 0:
                    reason = self._adaptive(configs, totals, reason)
                self._conclude(reason, totals)
            except _Cancelled:
                state, error = ProfileState.CANCELLED, ""
            except _Stop as stop:
                state, error = stop.state, stop.error
            except Exception as exc:
                self.log.exception("profile_error")
                state, error = ProfileState.FAILED, error_text(exc)
            try:
                self._flush(force=True)
            except Exception as exc:
                self.log.exception("final_flush_failed")
                if state != ProfileState.FAILED:
                    state, error = ProfileState.FAILED, f"STORE_WRITE_FAILED: {error_text(exc)}"
            try:
                self.target.close()
            except Exception:
                self.log.exception("target_close_failed")
            return self._finish(state, error)


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
    return _Run(profile, target, sink, cancel, on_progress, options or RunnerOptions()).execute()
