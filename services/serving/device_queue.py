"""One model's device, lent to its generations one at a time, and the bounded queue in
front of it: what keeps a queued call from disturbing the measurement that is running.

A generation's timed region must see nothing but itself (design, timing semantics): while
one call holds the device, no other call of the queue does any work in this process. So a
call (`DeviceQueue.run(prepare, work, call)`) goes through these steps:
1. admission: at most `max_queued` calls wait per model; one more is refused at once with
   ResourceExhausted(GENERATION_QUEUE_FULL), before any work is done for it.
2. preparation, in a gap: `prepare()` (checks, drawing the prompt) runs only while no call
   holds the device; a call that arrives while the device is held blocks until it is
   released. The device is not lent again while any preparation is under way.
3. waiting, in FIFO order, blocked on the call's own condition variable: no polling, and
   nobody but the call that is next is woken when the device is released (a timed wait
   only for the call's deadline or the release guard below).
4. holding: `work(prepared)` runs with the device (the backend's own preparation, the
   timed region, the result).
5. release: on return for an in-process call; for a call with `Call(hold=True)` (the
   servicer's), once the answer has gone out: `Call.terminated()`, which the servicer
   registers as the RPC's termination callback, so that the previous call's conversion,
   logging, serialization and send never land in the next call's timed region. If that
   signal does not come within HOLD_GUARD_S of the work's end, the next call takes the
   device anyway and the overrun is logged (`device_hold_overrun`).
A call whose caller is gone (`Call.terminated()`: cancelled, or its RPC's deadline
expired) or whose deadline passes before it holds the device leaves the queue without
running (Unavailable GENERATION_CANCELLED / GENERATION_DEADLINE_EXPIRED: the device was
busy, so trying again later is right). Closing the queue (the model is unloaded) sends
every waiting call away with the error its owner chose; `close` waits for the holder.

`stats()` and the `on_event` hook (tests) expose the order of events: admitted, prepared,
held, released, left. No gRPC here: `servicer.py` maps the RPC onto a `Call`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, TypeVar

from idealrt.core.errors import IdealrtError, ResourceExhausted, Unavailable
from idealrt.core.logging import get_logger
from idealrt.services.serving.reasons import (
    GENERATION_CANCELLED,
    GENERATION_DEADLINE_EXPIRED,
    GENERATION_QUEUE_FULL,
)

__all__ = [
    "DEFAULT_MAX_QUEUED",
    "HOLD_GUARD_S",
    "Call",
    "DeviceQueue",
    "QueueStats",
]

DEFAULT_MAX_QUEUED = 16
# How long a finished call may keep the device while its answer goes out (normally well
# under a millisecond: a small message on a local socket) before the next call proceeds.
HOLD_GUARD_S = 1.0

P = TypeVar("P")
R = TypeVar("R")
_State = Literal["gap", "preparing", "ready", "holding", "done", "left"]
_log = get_logger(__name__)


class Call:
    """The caller's side of one generation: its deadline (`time.monotonic()` seconds, None:
    none) and its end. `terminated()` (any thread, idempotent) says the caller is gone or
    has been answered: before the call holds the device it leaves the queue without
    running; after its work, with `hold`, the device is released. `hold=True` keeps the
    device after the work until `terminated()` (at most HOLD_GUARD_S). `alive` (e.g. grpc's
    `context.is_active`) is asked at the two moments that matter, when the device is handed
    to the call and when its work is done, in case a termination signal was lost (grpc.aio
    never runs a done-callback added after the RPC ended); it must not block."""

    __slots__ = ("_alive", "_lock", "_queue", "_terminated", "deadline", "hold")

    def __init__(
        self,
        deadline: float | None = None,
        *,
        hold: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.deadline = deadline
        self.hold = hold
        self._alive = alive
        self._lock = threading.Lock()
        self._terminated = False
        self._queue: DeviceQueue | None = None

    @property
    def is_terminated(self) -> bool:
        return self._terminated

    def gone(self) -> bool:
        """Terminated, or no longer alive."""
        return self._terminated or (self._alive is not None and not self._alive())

    def terminated(self) -> None:
        with self._lock:
            self._terminated = True
            queue = self._queue
        if queue is not None:
            queue._terminated(self)

    def _attach(self, queue: DeviceQueue) -> bool:
        """False when already terminated (the caller is gone before it was queued)."""
        with self._lock:
            if self._queue is not None:
                raise RuntimeError("a Call is used for one generation only")
            if self._terminated:
                return False
            self._queue = queue
            return True


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """A snapshot: calls waiting (for a gap, preparing, or prepared), whether the device
    is held, and counters since the queue was made."""

    waiting: int
    preparing: int
    held: bool
    admitted: int
    ran: int
    refused: int
    left: int


class _Ticket:
    __slots__ = ("call", "cond", "seq", "state")

    def __init__(self, call: Call, cond: threading.Condition, seq: int) -> None:
        self.call = call
        self.cond = cond
        self.seq = seq  # arrival order: the device goes to the earliest prepared call
        self.state: _State = "gap"


class DeviceQueue:
    """The device of one model (module docstring). `name`: for messages (the model id);
    `closed_error`: what a call gets once the queue is closed; `on_event(event, call)`:
    called under the queue's lock at each step (tests); it must not block."""

    def __init__(
        self,
        name: str,
        max_queued: int = DEFAULT_MAX_QUEUED,
        *,
        closed_error: Callable[[], IdealrtError],
        on_event: Callable[[str, Call], None] | None = None,
        hold_guard_s: float = HOLD_GUARD_S,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.name = name
        self.max_queued = max_queued
        self._closed_error = closed_error
        self._on_event = on_event
        self._hold_guard_s = hold_guard_s
        self._lock = threading.Lock()
        self._gap: deque[_Ticket] = deque()  # waiting for the device to be free to prepare
        self._ready: deque[_Ticket] = deque()  # prepared, waiting for the device
        self._tickets: dict[int, _Ticket] = {}  # id(call) -> ticket, while queued or holding
        self._preparing = 0
        self._holder: _Ticket | None = None
        self._hold_until: float | None = None  # set once the holder's work is done
        self._idle = threading.Condition(self._lock)  # close() waits here for the holder
        self._closed = False
        self._admitted = self._ran = self._refused = self._left = 0

    # ---- the one entry point ----
    def run(self, prepare: Callable[[], P], work: Callable[[P], R], call: Call | None = None) -> R:
        call = call or Call()
        ticket = self._admit(call)
        try:
            prepared = prepare()
        except BaseException:
            with self._lock:
                self._preparing -= 1
                self._leave(ticket, "left")
                self._dispatch()
            raise
        self._await_device(ticket)
        try:
            return work(prepared)
        finally:
            self._work_done(ticket)

    def stats(self) -> QueueStats:
        with self._lock:
            return QueueStats(
                waiting=len(self._gap) + self._preparing + len(self._ready),
                preparing=self._preparing,
                held=self._holder is not None,
                admitted=self._admitted,
                ran=self._ran,
                refused=self._refused,
                left=self._left,
            )

    def close(self) -> None:
        """Send every waiting call away (closed_error) and wait until no call holds the
        device (a running generation finishes; its answer is not waited for)."""
        with self._lock:
            self._closed = True
            for t in (*self._gap, *self._ready):
                t.cond.notify()
            while self._holder is not None and self._hold_until is None:
                self._idle.wait()
            if self._holder is not None:  # finished, its answer on the way: release
                self._release()

    # ---- steps (each under self._lock unless it says otherwise) ----
    def _admit(self, call: Call) -> _Ticket:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            waiting = len(self._gap) + self._preparing + len(self._ready)
            if waiting >= self.max_queued:
                self._refused += 1
                raise ResourceExhausted(
                    GENERATION_QUEUE_FULL,
                    f"model {self.name!r} already has {waiting} generations waiting for its "
                    f"device (max_queued_generations = {self.max_queued}); retry later",
                )
            if not call._attach(self):
                raise _cancelled()
            self._admitted += 1
            ticket = _Ticket(call, threading.Condition(self._lock), self._admitted)
            self._tickets[id(call)] = ticket
            self._event("admitted", call)
            if self._holder is None:
                ticket.state = "preparing"
                self._preparing += 1
            else:
                self._gap.append(ticket)
                self._wait(ticket, "preparing")
            return ticket

    def _await_device(self, ticket: _Ticket) -> None:
        with self._lock:
            self._preparing -= 1
            self._event("prepared", ticket.call)
            error = self._reason_to_leave(ticket, time.monotonic())
            if error is not None:
                self._leave(ticket, "left")
                self._dispatch()
                raise error
            ticket.state = "ready"
            # preparations end in any order; the device is lent in arrival order
            at = len(self._ready)
            while at and self._ready[at - 1].seq > ticket.seq:
                at -= 1
            self._ready.insert(at, ticket)
            self._dispatch()
            self._wait(ticket, "holding")
            if ticket.call.gone():  # gone while it waited, its end perhaps unsignalled
                self._holder = None
                self._leave(ticket, "left")
                self._release()
                raise _cancelled()

    def _work_done(self, ticket: _Ticket) -> None:
        with self._lock:
            ticket.state = "done"
            self._ran += 1
            self._idle.notify_all()
            if ticket.call.hold and not self._closed and not ticket.call.gone():
                self._hold_until = time.monotonic() + self._hold_guard_s
                self._wake_guard()
                return
            self._release()

    def _terminated(self, call: Call) -> None:
        """Call.terminated(): leave the queue, or release the device after the work."""
        with self._lock:
            ticket = self._tickets.get(id(call))
            if ticket is None:
                return
            if ticket.state in ("gap", "ready"):
                ticket.cond.notify()  # it leaves from its own thread (_wait)
            elif ticket.state == "done" and self._holder is ticket:
                self._release()

    def _wait(self, ticket: _Ticket, until: _State) -> None:
        """Block until the ticket reaches `until`; leave the queue (and raise) when the
        queue closes, the caller is gone or its deadline passes."""
        while ticket.state != until:
            now = time.monotonic()
            error = self._reason_to_leave(ticket, now)
            timeout = None if ticket.call.deadline is None else ticket.call.deadline - now
            if error is not None:
                self._leave(ticket, "left")
                self._dispatch()
                raise error
            if self._hold_until is not None and self._is_guard(ticket):
                if self._hold_until <= now:
                    _log.warning(
                        "device_hold_overrun", model_id=self.name, guard_s=self._hold_guard_s
                    )
                    self._release()
                    continue
                guard = self._hold_until - now
                timeout = guard if timeout is None else min(timeout, guard)
            ticket.cond.wait(timeout)

    def _reason_to_leave(self, ticket: _Ticket, now: float) -> IdealrtError | None:
        if self._closed:
            return self._closed_error()
        if ticket.call.is_terminated:
            return _cancelled()
        if ticket.call.deadline is not None and ticket.call.deadline <= now:
            return Unavailable(
                GENERATION_DEADLINE_EXPIRED,
                f"the deadline passed while the generation waited for model {self.name!r}'s "
                "device; it did not run",
            )
        return None

    def _is_guard(self, ticket: _Ticket) -> bool:
        """The one waiter that watches a finished holder's release: the next to prepare,
        else the next to hold."""
        first = self._gap[0] if self._gap else (self._ready[0] if self._ready else None)
        return first is ticket

    def _wake_guard(self) -> None:
        first = self._gap[0] if self._gap else (self._ready[0] if self._ready else None)
        if first is not None:
            first.cond.notify()

    def _release(self) -> None:
        holder = self._holder
        if holder is not None:
            self._event("released", holder.call)
            self._tickets.pop(id(holder.call), None)
        self._holder = None
        self._hold_until = None
        self._idle.notify_all()
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand out what is free: with no holder, a gap for every call waiting to prepare;
        once no preparation is under way, the device to the first prepared call."""
        if self._holder is not None:
            return
        if self._gap and not self._closed:
            while self._gap:
                t = self._gap.popleft()
                t.state = "preparing"
                self._preparing += 1
                t.cond.notify()
            return
        if self._preparing == 0 and self._ready and not self._closed:
            t = self._ready.popleft()
            t.state = "holding"
            self._holder = t
            self._event("held", t.call)
            t.cond.notify()

    def _leave(self, ticket: _Ticket, state: _State) -> None:
        for q in (self._gap, self._ready):
            if ticket in q:
                q.remove(ticket)
        ticket.state = state
        self._tickets.pop(id(ticket.call), None)
        self._left += 1
        self._event("left", ticket.call)
        if self._hold_until is not None:
            self._wake_guard()  # the guard may have been this ticket

    def _event(self, event: str, call: Call) -> None:
        if self._on_event is not None:
            self._on_event(event, call)


def _cancelled() -> Unavailable:
    return Unavailable(
        GENERATION_CANCELLED, "the caller went away before the generation ran; it did not run"
    )
