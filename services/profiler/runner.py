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

import dataclasses
import threading
from collections.abc import Callable

from idealrt.core.clock import utcnow
from idealrt.core.domain import Profile, ProfileState
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.profiler._runner_base import _Cancelled, _Stop
from idealrt.services.profiler._runner_options import MonitorFactory as MonitorFactory
from idealrt.services.profiler._runner_options import (
    RunnerOptions,
    SampleSink,
    default_monitors,
    error_text,
)
from idealrt.services.profiler._runner_phases import _RunPhases
from idealrt.services.profiler.lease import LeaseWaitCancelled, acquire_lease
from idealrt.services.profiler.plan import configurations, validate_plan
from idealrt.services.profiler.stopping import StoppingRule
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["RunnerOptions", "SampleSink", "default_monitors", "error_text", "run_profile"]


class _Run(_RunPhases):
    # ------------------------------------------------------------ the whole run

    def _finish(self, state: ProfileState, error: str = "") -> Profile:
        self.profile = dataclasses.replace(
            self.profile, state=state, error=error, end_time=utcnow()
        )
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
            self._update(state=ProfileState.RUNNING, start_time=self.profile.start_time or utcnow())
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
