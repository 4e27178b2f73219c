"""Storing a run's samples off the measuring thread.

The runner hands batches to a `SampleWriter` and goes on measuring; the writer's own thread
stores them one at a time, in the order handed over, each under the batch id its first
sample numbers: "<profile_id>-b<N>", N = the samples of the profile stored before it (a
resumed run starts at what the sink holds, so an id is never re-used). A call that fails
UNAVAILABLE or DEADLINE_EXCEEDED is made again with the same batch under the same id (the
store takes it once) after the outage's backoff (_outage.py), for the outage window. So a
slow store, or an outage within the window, costs the measurement nothing but memory: the
runner bounds that (max_buffered_samples) by waiting in `wait_for_room` for the writer.

The writer stops for good, keeping what it holds as unstored, when
- the outage window is spent: `failure` is `StoreGaveUp` (STORE_UNAVAILABLE, how long and
  how many samples are not stored);
- the store answered with anything else, or the call raised (`failure` is that error or
  exception: the runner raises it);
- a try failed while the run is cancelled: a cancelled run tries once, it does not wait
  out an outage (a backoff wait ends at once when the run is cancelled, then that one try).

The runner looks at `failure()` between samples. Everything shared with the measuring
thread is under one Condition; waits on it end when the writer stores a batch or stops.

Inline (`background=False`): no thread; the measuring thread stores in `pump`, between
samples, as the runner calls it. That is for a profiler that shares its process with the
serving it measures and the store it writes (the embedded suite): there a write on
another thread would run during a timed generation and take the CPU and the GIL from it.
In an outage the inline writer makes one try when the backoff says so and otherwise
returns, so measuring goes on; `wait_for_room` and `drain` wait out the backoff.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from idealrt.core.domain import Sample
from idealrt.core.errors import IdealrtError
from idealrt.services.profiler._outage import Outage, is_transient

__all__ = ["SampleWriter", "StoreGaveUp"]


class _Sink(Protocol):
    def append_samples(self, profile_id: str, batch_id: str, samples: Sequence[Sample]) -> int: ...


class StoreGaveUp(Exception):
    """The store stayed unreachable past the outage window; str() says how long and how
    many measured samples are not stored."""


class SampleWriter:
    """One run's writer. `stored` (set before the first `submit`) is what the sink already
    holds for the profile; `keep`: collect the stored samples with their seq (contiguous
    from 0 in append order) for `take_stored` (the adaptive planner fits them);
    `background`: a thread of its own (else inline, see the module docstring)."""

    def __init__(
        self,
        sink: _Sink,
        profile_id: str,
        *,
        outage: Outage,
        sleep: Callable[[threading.Event, float], bool],
        cancel: threading.Event,
        log: FilteringBoundLogger,
        keep: bool = False,
        background: bool = True,
    ) -> None:
        self.sink = sink
        self.profile_id = profile_id
        self.outage = outage
        self.sleep = sleep
        self.cancel = cancel
        self.log = log
        self.keep = keep
        self.background = background
        self.stored = 0
        self.outages = 0  # outages ridden out, and the longest (provenance "outage.store.*")
        self.longest_outage_s = 0.0
        self._cond = threading.Condition()
        self._queue: collections.deque[list[Sample]] = collections.deque()  # [0]: in flight
        self._queued = 0
        self._kept: list[Sample] = []
        self._failure: BaseException | None = None
        self._stopped = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._delay = 0.0  # the backoff after the last failed try

    # ------------------------------------------------------------ the measuring thread

    def submit(self, batch: Sequence[Sample]) -> None:
        """Queue one batch (stored after those before it); a background writer starts its
        thread at the first."""
        if not batch:
            return
        with self._cond:
            self._queue.append(list(batch))
            self._queued += len(batch)
            if self.background and self._thread is None and not self._stopped:
                self._thread = threading.Thread(
                    target=self._loop, name=f"profiler-writer-{self.profile_id}", daemon=False
                )
                self._thread.start()
            self._cond.notify_all()

    def pump(self) -> None:
        """Inline: store what is queued now, unless the store is out and the backoff says
        wait (then return: measuring goes on). Background: nothing to do."""
        if not self.background:
            self._inline(block=False)

    def unstored(self) -> int:
        """Samples handed over that the store has not acknowledged (in flight included)."""
        with self._cond:
            return self._queued

    def wait_for_room(self, limit: int) -> None:
        """Block while `limit` or more samples are unstored and the writer goes on."""
        limit = max(1, limit)
        if not self.background:
            self._inline(block=True, until=limit)
            return
        with self._cond:
            while self._queued >= limit and not self._stopped:
                self._cond.wait()

    def drain(self) -> None:
        """Block until everything handed over is stored, or the writer stopped."""
        if not self.background:
            self._inline(block=True, until=1)
            return
        with self._cond:
            while self._queued and not self._stopped:
                self._cond.wait()

    def failure(self) -> BaseException | None:
        """Why the writer stopped (StoreGaveUp or the store's answer), None while it goes
        on or when it stopped for a cancelled run."""
        with self._cond:
            return self._failure

    def take_stored(self) -> list[Sample]:
        """The samples stored since the last call, with their seq (`keep` only)."""
        with self._cond:
            kept, self._kept = self._kept, []
            return kept

    def close(self) -> None:
        """Stop the thread once what is queued is stored (or the writer stopped), and join it.
        Call `drain` first to wait for the store; after close nothing more is stored."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _inline(self, *, block: bool, until: int = 0) -> None:
        """Store queued batches in this thread while `until` or more samples are unstored
        (`until` 0: all that can be stored now). Not blocking: one try when the backoff
        is due, else return."""
        while self._queue and not self._stopped and self._queued >= until:
            if not block and not self.outage.due():
                return
            outcome = self._try(self._queue[0], self.stored)
            if outcome is None:  # a transient failure: back off
                if not block:
                    return
                self.sleep(self.cancel, self._delay)  # cancelled: one more try, then stop
                continue
            if not outcome:
                self._stopped = True
                return
            self._stored_first()

    # ------------------------------------------------------------ the writer's thread

    def _loop(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # the thread's top: kept, and raised by the runner
            self.log.exception("sample_writer_failed")
            with self._cond:
                self._failure = exc
        finally:  # however the thread ends, nothing waits for it any more
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, first = self._queue[0], self.stored
            outcome = self._try(batch, first)
            while outcome is None:  # a transient failure: back off, and try again
                self.sleep(self.cancel, self._delay)  # cancelled: one more try, then stop
                outcome = self._try(batch, first)
            if not outcome:
                return
            self._stored_first()

    # ------------------------------------------------------------ either

    def _stored_first(self) -> None:
        """The store took the first queued batch."""
        with self._cond:
            batch = self._queue.popleft()
            first = self.stored
            self._queued -= len(batch)
            self.stored += len(batch)
            if self.keep:
                self._kept.extend(
                    dataclasses.replace(s, seq=first + i) for i, s in enumerate(batch)
                )
            self._cond.notify_all()

    def _try(self, batch: list[Sample], first: int) -> bool | None:
        """One append of `batch` under its id: True stored; None a transient failure to
        retry after `_delay` s; False the writer must stop (the reason, if any, in
        `_failure`: the window is spent or the store refused; none when cancelled)."""
        batch_id = f"{self.profile_id}-b{first}"
        try:
            self.sink.append_samples(self.profile_id, batch_id, batch)
        except IdealrtError as exc:
            if not is_transient(exc):
                with self._cond:
                    self._failure = exc
                return False
            if not self.outage.active:
                self.log.warning("store_unavailable", reason=exc.reason, error=exc.message)
            delay = self.outage.failed(exc)
            if delay is None:
                with self._cond:
                    self._failure = StoreGaveUp(
                        f"the store was {self.outage.describe()}; "
                        f"{self._queued} measured samples are not stored"
                    )
                self.log.error("store_outage_too_long", elapsed_s=self.outage.elapsed_s())
                return False
            if self.cancel.is_set():
                self.log.info("store_not_retried_cancelled", batch_id=batch_id)
                return False
            self.log.info("store_retry", attempt=self.outage.attempts, delay_s=round(delay, 3))
            self._delay = delay
            return None
        if self.outage.active:
            elapsed = self.outage.elapsed_s()
            self.log.info("store_back", elapsed_s=round(elapsed, 3), attempts=self.outage.attempts)
            self.outages += 1
            self.longest_outage_s = max(self.longest_outage_s, elapsed)
            self.outage.clear()
        return True
