"""The state of one profile run and its plumbing: progress, batched storage, cancellation,
and the measurement of one sample. The phases build on it (`_runner_phases.py`); the
whole run is `idealrt.services.profiler.runner`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from idealrt.core.domain import Profile, ProfileState, Sample, SampleFlag
from idealrt.services.profiler._runner_options import RunnerOptions, SampleSink
from idealrt.services.profiler.contention import ContentionDetector
from idealrt.services.profiler.monitors import MonitorSet
from idealrt.services.profiler.plan import Config
from idealrt.services.profiler.stopping import StoppingRule
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["_Cancelled", "_RunBase", "_Stop"]

log = structlog.get_logger(__name__)


class _Cancelled(Exception):
    pass


class _Stop(Exception):
    """Ends the run with a given state and error."""

    def __init__(self, state: ProfileState, error: str) -> None:
        super().__init__(error)
        self.state = state
        self.error = error


class _RunBase:
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

    def _record(self, entries: Mapping[str, str], **changes: Any) -> None:
        merged = {**self.profile.provenance.entries, **entries}
        self._update(
            provenance=dataclasses.replace(self.profile.provenance, entries=merged), **changes
        )

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
