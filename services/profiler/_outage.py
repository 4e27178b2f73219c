"""Riding out an unreachable dependency (the store, the serving process): which errors are
worth retrying, and the retry schedule of one outage.

Transient: UNAVAILABLE (the process is down or restarting, the connection broke) and
DEADLINE_EXCEEDED (no answer in time; the call may or may not have taken effect, so only
idempotent calls go through here: appends carry their deterministic batch id, profile
updates write the whole resource, loads carry a request id). Every other error is an
answer (InvalidArgument, FailedPrecondition, NotFound, ...) and is not retried.

Schedule: exponential backoff with full jitter (attempt n waits uniform(0, min(cap,
base x 2^(n-1))) seconds, so that profilers that lost the same store do not come back in
lockstep), bounded by a window that starts at the outage's first failure: the last attempt
is made when the window ends, and an attempt that fails after it ends gives up. A success
ends the outage; the next failure starts a new one with a fresh window.

Waiting is the caller's: `failed()` returns how long to wait, and the runner waits on its
cancel event through `RunnerOptions.sleep` (cancellable, and replaceable in tests together
with the clock).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable

from idealrt.core.errors import IdealrtError

__all__ = ["TRANSIENT_CODES", "Outage", "RetryPolicy", "is_transient"]

TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


def is_transient(exc: BaseException) -> bool:
    """UNAVAILABLE or DEADLINE_EXCEEDED (by gRPC status code, in-process errors included)."""
    return isinstance(exc, IdealrtError) and getattr(exc.code, "name", "") in TRANSIENT_CODES


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """window_s: how long one outage is ridden out (math.inf: until it ends); base_s and
    cap_s: the backoff's first and largest ceiling."""

    window_s: float = 300.0
    base_s: float = 0.5
    cap_s: float = 30.0


class Outage:
    """The failed attempts of one outage of one dependency and when to try next."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float], rng: random.Random) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self.started: float | None = None
        self.attempts = 0
        self.next_at = -math.inf
        self.last_error: IdealrtError | None = None

    @property
    def active(self) -> bool:
        return self.started is not None

    def elapsed_s(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started

    def due(self) -> bool:
        """Whether the next attempt may be made now (always, outside an outage)."""
        return self.started is None or self.clock() >= self.next_at

    def retry_now(self) -> None:
        """Allow one attempt now, whatever the schedule says (a last try before giving up)."""
        self.next_at = -math.inf

    def failed(self, exc: IdealrtError) -> float | None:
        """Record a failed attempt: the seconds to wait before the next one, or None when
        the window is spent (give up)."""
        now = self.clock()
        if self.started is None:
            self.started = now
        self.attempts += 1
        self.last_error = exc
        left = self.started + self.policy.window_s - now
        if left <= 0:
            return None
        ceiling = min(self.policy.cap_s, self.policy.base_s * 2.0 ** min(self.attempts - 1, 60))
        delay = min(self.rng.uniform(0.0, ceiling), left)
        self.next_at = now + delay
        return delay

    def clear(self) -> None:
        """The dependency answered: the outage is over."""
        self.started, self.attempts, self.next_at, self.last_error = None, 0, -math.inf, None

    def describe(self) -> str:
        """For Profile.error: how long, how many attempts, the window, the last error."""
        last = self.last_error
        detail = "" if last is None else f"; last error {last.reason}: {last.message}"
        return (
            f"unreachable for {self.elapsed_s():.1f} s over {self.attempts} attempts "
            f"(outage window {self.policy.window_s:g} s, outage_window_s / "
            f"IDEALRT_OUTAGE_WINDOW_S){detail}"
        )
