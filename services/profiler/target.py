"""What the profiler measures: a generation target that returns server-side-timed samples."""

from __future__ import annotations

from typing import Protocol

from idealrt.core.domain import Sample
from idealrt.core.errors import IdealrtError, Unavailable
from idealrt.core.model_spec import ModelSpec

__all__ = ["GenerationTarget", "TargetUnavailable"]


class TargetUnavailable(Unavailable):
    """What a target raises (from prepare or generate) when its backend is unreachable for
    now but may come back: the serving process died and restarts, the connection broke.

    The runner rides it out: it retries the same call (for generate: the same
    configuration, repeat and seed, so nothing is counted twice) with backoff within
    `RunnerOptions.outage_window_s`, and the target reloads whatever it lost on the next
    call. Any other error from a target ends the profile FAILED at once."""

    @classmethod
    def wrap(cls, exc: IdealrtError) -> TargetUnavailable:
        """The same reason, message and field, marked as worth riding out."""
        if isinstance(exc, TargetUnavailable):
            return exc
        return cls(exc.reason, exc.message, field=exc.field)


class GenerationTarget(Protocol):
    """One model on one stack (an idealrt serving endpoint, or a black-box HTTP API).

    `prepare` loads/validates the model once; `generate` runs one exact-length generation and
    returns a Sample timed *inside* the target (serving) or as close to the wire as possible
    (HTTP, where prefill_ns = time to first token). A generation whose token counts differ
    from the request returns a Sample flagged NONCONFORMING, or raises; it is never kept as
    a valid measurement. Implementations must not busy-wait.
    """

    def prepare(self) -> ModelSpec | None:
        """Load the model; returns the resolved spec when known (None for black-box APIs)."""
        ...

    def generate(self, prompt_tokens: int, output_tokens: int, seed: int) -> Sample: ...

    def environment(self) -> dict[str, str]:
        """Provenance entries the target can report (hardware, library versions, ...)."""
        ...

    def close(self) -> None: ...
