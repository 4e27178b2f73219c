"""The local executor: a profile runs in this process (the embedded default, and what a
cluster's profiler does for HTTP targets and given serving addresses): the target from
`target_factory`, then runner.run_profile. Recovery resumes every unfinished profile
(runs are checkpointed: a resumed one goes on from its stored samples)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

import structlog

from idealrt.core.clock import utcnow
from idealrt.core.domain import Profile, ProfileState
from idealrt.services.profiler.executor.base import Recovery
from idealrt.services.profiler.runner import RunnerOptions, SampleSink, error_text, run_profile
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["LocalExecutor"]

log = structlog.get_logger(__name__)


class LocalExecutor:
    name = "local"

    def __init__(
        self,
        target_factory: Callable[[Profile], GenerationTarget],
        store: SampleSink,
        options: RunnerOptions,
    ) -> None:
        self.target_factory, self.store, self.options = target_factory, store, options

    def run(
        self,
        profile: Profile,
        *,
        cancel: threading.Event,
        on_progress: Callable[[Profile], None],
    ) -> Profile:
        try:
            target = self.target_factory(profile)
        except Exception as exc:  # as the manager: a target that cannot be built FAILs
            log.exception("target_factory_failed", profile_id=profile.id)
            return dataclasses.replace(
                profile, state=ProfileState.FAILED, end_time=utcnow(), error=error_text(exc)
            )
        return run_profile(
            profile,
            target,
            self.store,
            cancel=cancel,
            on_progress=on_progress,
            options=self.options,
        )

    def recover(self, unfinished: Sequence[Profile]) -> Recovery:
        return Recovery(resume=list(unfinished), failed=[], released=[])

    def close(self) -> None:
        """Nothing to release: the manager cancels local runs itself."""
