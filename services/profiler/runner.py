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
from idealrt.services.profiler.contention import ContentionDetector, ContentionPolicy
from idealrt.services.profiler.fingerprint import collect_fingerprint
from idealrt.services.profiler.lease import LeaseWaitCancelled, acquire_lease, device_key
from idealrt.services.profiler.monitors import MonitorSet, parse_cores
from idealrt.services.profiler.plan import (
    Config,
    configurations,
    round_order,
    sample_seed,
    total_samples,
    validate_plan,
    warmup_order,
)
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
    lease_dir: Path = Path(".idealrt/leases")
    lease_timeout_s: float | None = None  # WAIT policy: give up (DEVICE_BUSY) after this
    contention: ContentionPolicy = dataclasses.field(default_factory=ContentionPolicy)
    batch_samples: int = 16
    batch_interval_s: float = 2.0
    max_nonconforming: int = 3
    append_retries: int = 3
    monitors: MonitorFactory = default_monitors


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
        configs = configurations(self.profile.plan)
        by_key = {(c.prompt_tokens, c.output_tokens, c.heldout): c for c in configs}
        totals: dict[Config, list[int]] = {c: [] for c in configs}
        existing = self.sink.all_samples(self.profile.id)
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
        if self.monitors.gpu is not None:
            extra["gpu.foreign_processes_at_start"] = str(len(self.monitors.gpu.foreign_pids()))
        provenance = collect_fingerprint(self.profile, spec=spec, target_env=env, extra=extra)
        self._update(
            model_spec=spec or self.profile.model_spec,
            provenance=provenance,
            total_samples=total_samples(self.profile.plan),
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

    def _rounds(self, configs: list[Config], totals: dict[Config, list[int]]) -> StopReason:
        plan, policy = self.profile.plan, self.opts.contention
        rule = StoppingRule(plan)
        slots = {c: len(v) for c, v in totals.items()}
        while True:
            pending = rule.pending(totals, slots)
            if not pending:
                return rule.reason(totals)
            r = min(slots[c] for c in pending)
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

    def _conclude(self, reason: StopReason, totals: dict[Config, list[int]]) -> None:
        rule = StoppingRule(self.profile.plan)
        entries = dict(self.profile.provenance.entries)
        entries["stopping.reason"] = reason.value
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
                self._warmups(configs)
                reason = self._rounds(configs, totals)
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
