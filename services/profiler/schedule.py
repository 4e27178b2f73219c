"""Repeats spread over time, for black-box APIs.

A shared API's contention follows the clock (time of day, other tenants' batches), so the
denoised runtime is better estimated from rounds spread over minutes or hours than from
back-to-back repeats. `spread_offsets` places `rounds` start times over `[0, spread_s)` by
stratified jitter: the interval is cut into `rounds` equal slots and each round starts at a
seeded uniform point of the first `jitter` fraction of its slot. Every slot gets exactly one
round (even coverage, strictly increasing offsets), and the random phase keeps the rounds
from locking onto a periodic load (a cron job every 10 minutes, say). `jitter=0` gives the
evenly spaced offsets 0, w, 2w, ...

`SpreadSchedule` anchors the offsets to a monotonic clock and waits for each round with
`threading.Event.wait` (blocking, cancellable from another thread, no polling).

Wiring (runner.py, `plan.spread_s > 0`): one round = one pass over the plan's grid; the
schedule has `effective_max_repeats(plan)` rounds, seeded by `plan.seed`, anchored when the
measured rounds begin (after the warm-ups, which are not scheduled), and round r starts at
`start + offsets[r]`. A resumed run anchors the schedule so that its first unfinished round
is due at once and the later ones keep their spacing (`begin_at_round`). The device lease is
held for the whole profile, waits included: spreading a profile over hours keeps the device
from other profiles for hours, which suits black-box HTTP targets (whose device is not
ours) far better than a local accelerator. Prompt sizes added by adaptive planning are
measured after the grid's last round, back to back (not spread).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from idealrt.core.errors import InvalidArgument
from idealrt.services.profiler.reasons import JITTER_INVALID, ROUNDS_INVALID, SPREAD_INVALID

__all__ = ["SpreadSchedule", "sleep_until", "spread_offsets"]


def spread_offsets(
    rounds: int, spread_s: float, *, seed: int = 0, jitter: float = 1.0
) -> tuple[float, ...]:
    """Start offsets (seconds from the schedule's start) of `rounds` rounds over `spread_s`."""
    if rounds < 1:
        raise InvalidArgument(
            ROUNDS_INVALID, f"rounds={rounds}: must be at least 1", field="rounds"
        )
    if not spread_s >= 0.0:  # also rejects NaN
        raise InvalidArgument(
            SPREAD_INVALID, f"spread_s={spread_s}: must be >= 0 seconds", field="spread_s"
        )
    if not 0.0 <= jitter <= 1.0:
        raise InvalidArgument(
            JITTER_INVALID, f"jitter={jitter}: must be within [0, 1]", field="jitter"
        )
    width = spread_s / rounds
    rng = random.Random(seed)
    return tuple(r * width + rng.random() * jitter * width for r in range(rounds))


def sleep_until(
    deadline: float,
    cancel: threading.Event,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Block until `clock() >= deadline` (True) or `cancel` is set (False). Wakes only when
    the wait times out or the event is set: no busy-waiting."""
    while True:
        if cancel.is_set():
            return False
        remaining = deadline - clock()
        if remaining <= 0:
            return True
        if cancel.wait(remaining):
            return False


class SpreadSchedule:
    """Rounds at `start + spread_offsets(...)[r]` on a monotonic clock."""

    def __init__(
        self,
        rounds: int,
        spread_s: float,
        *,
        seed: int = 0,
        jitter: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.offsets = spread_offsets(rounds, spread_s, seed=seed, jitter=jitter)
        self.clock = clock
        self.start: float | None = None

    @property
    def rounds(self) -> int:
        return len(self.offsets)

    def begin(self, at: float | None = None) -> None:
        """Anchor the schedule (default: now)."""
        self.start = self.clock() if at is None else at

    def begin_at_round(self, r: int, at: float | None = None) -> None:
        """Anchor the schedule so that round r is due at `at` (default: now): a resumed run
        starts its first unfinished round at once, the later rounds keep their spacing."""
        now = self.clock() if at is None else at
        self.start = now - self.offsets[r]

    def due(self, r: int) -> float:
        """The clock reading at which round r starts."""
        if self.start is None:
            self.begin()
        assert self.start is not None
        return self.start + self.offsets[r]

    def wait_for(self, r: int, cancel: threading.Event) -> bool:
        """Block until round r is due; False when cancelled first. A round already due (the
        previous one overran its slot) starts at once: rounds never overlap, they slip."""
        return sleep_until(self.due(r), cancel, clock=self.clock)
