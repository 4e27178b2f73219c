"""Keeping the profiler's own process off the cores a profile pins its serving to.

The embedded suite (services/suite.py) runs store, metrics and this profiler in one process
and serving in a child process. A profile with the stack option `cores` pins that child to
those cores when its model loads; `OffCoresTarget` wraps the profile's serving target so
that, from its `prepare` (before the load) to its `close` (the run's end, whatever ended it),
this process (every thread: gRPC's, the store's, the run's) runs on the other cores
(`idealrt.core.affinity.CoreExclusion`). The CPU monitor then sees only the serving child
and foreign work on the measured cores (`_runner_options.default_monitors` stops counting
this process as ours when it cannot run there). A deployed profiler runs elsewhere and is
not wrapped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from idealrt.core.affinity import CoreExclusion, parse_cores
from idealrt.core.domain import Profile, Sample
from idealrt.core.errors import InvalidArgument
from idealrt.core.fingerprint import current_affinity, format_cores
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["OffCoresTarget"]


class OffCoresTarget:
    """`target` of `profile`, with this process kept off the profile's `cores` from
    `prepare` to `close`. Everything else is the wrapped target's (attributes too)."""

    def __init__(
        self, target: GenerationTarget, profile: Profile, exclusion: CoreExclusion
    ) -> None:
        self.target = target
        self._text = profile.stack.options.get("cores", "").strip()
        self._exclusion = exclusion
        self._release: Callable[[], None] | None = None

    def prepare(self) -> ModelSpec | None:
        if self._release is None and self._text:
            try:
                cores = parse_cores(self._text)
            except InvalidArgument:
                cores = None  # serving refuses the load with the field's own error
            if cores is not None:
                self._release = self._exclusion.exclude(cores)
        return self.target.prepare()

    def generate(self, prompt_tokens: int, output_tokens: int, seed: int) -> Sample:
        return self.target.generate(prompt_tokens, output_tokens, seed)

    def environment(self) -> dict[str, str]:
        env = self.target.environment()
        if self._release is not None:
            # provenance: where the harness ran while it measured
            env["harness.affinity"] = format_cores(current_affinity())
        return env

    def close(self) -> None:
        try:
            self.target.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()

    def __getattr__(self, name: str) -> Any:  # bind_cancel, counters, ...
        return getattr(self.target, name)
