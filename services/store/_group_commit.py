"""Group commit: concurrent write jobs run in one shared transaction and one commit.

SQLite has one writer at a time and, at synchronous=FULL, an fsync per commit (about a
millisecond or more, with the write lock held). Eight writers appending batches would
spend most of that lock waiting on fsyncs; here the appends that arrive while a commit is
under way are committed together by the next one, so the fsync is paid once per group,
and nothing returns before the commit that holds it is durable.

The queue works as LevelDB's writer queue: a caller enqueues its job and waits; the caller
whose job is at the head becomes the leader, takes the head's jobs (up to `max_jobs`), runs
each in its own savepoint of one transaction, commits, hands every caller its outcome and
wakes the next head, which leads the next group. No thread of its own, no idle cost: with
one writer a group is one job, exactly as without the queue.

Outcomes: a job that raises a domain error (IdealrtError: not found, a reused batch id, a
finished profile) has its savepoint rolled back and gets the error; the group goes on. Any
other failure (the database, the commit) fails the whole transaction: nothing of the group
is stored and every job of it gets the error (a copy, so that no two threads raise one
exception object), so a client retries, which idempotency makes safe.

A job run with `checks_first=True` promises to raise its domain errors before it writes
anything (an append: its lookups and checks, then its inserts), so it runs without a
savepoint (a SAVEPOINT and a RELEASE statement less per job); the promise is checked (the
connection's count of changed rows before and after a failed job): a job that wrote and
then raised one fails its whole group, as any other failure does, rather than commit what
it left half done.

A job runs on the leader's thread: it must only use the connection it is given (it does
no logging of its own, which would carry the leader's RPC context).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from idealrt.core.errors import IdealrtError

__all__ = ["GroupCommit"]

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("checks_first", "done", "error", "fn", "result", "turn")

    def __init__(
        self, fn: Callable[[sa.Connection], T], mutex: threading.Lock, checks_first: bool
    ) -> None:
        self.fn = fn
        self.checks_first = checks_first
        self.turn = threading.Condition(mutex)
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]  # set when error is None


def _own_copy(error: BaseException) -> BaseException:
    """The error for one more thread to raise: a copy chained to the original."""
    try:
        mine = copy.copy(error)
    except Exception:  # an exception type that cannot be copied: share it
        return error
    mine.__cause__ = error
    return mine


class GroupCommit:
    """Runs write jobs in shared transactions (see the module docstring). `begin` opens a
    write transaction (a context manager yielding its connection; commit on exit)."""

    def __init__(
        self,
        begin: Callable[[], contextlib.AbstractContextManager[sa.Connection]],
        *,
        max_jobs: int = 64,
    ) -> None:
        self._begin = begin
        self._max_jobs = max_jobs
        self._mutex = threading.Lock()
        self._queue: collections.deque[_Job[Any]] = collections.deque()

    def run(self, fn: Callable[[sa.Connection], T], *, checks_first: bool = False) -> T:
        """Run `fn(conn)` in a write transaction, maybe with others' jobs; its result once
        committed, or its error. `checks_first`: see the module docstring."""
        job: _Job[T] = _Job(fn, self._mutex, checks_first)
        with self._mutex:
            self._queue.append(job)
            while not job.done and job is not self._queue[0]:
                job.turn.wait()
            if job.done:  # a leader ran it
                return job.outcome()
            group = list(itertools.islice(self._queue, self._max_jobs))
        try:
            self._commit(group)
        finally:
            with self._mutex:
                for j in group:
                    self._queue.popleft()
                    j.done = True
                    j.turn.notify()
                if self._queue:  # the next head leads the next group
                    self._queue[0].turn.notify()
        return job.outcome()

    def _commit(self, group: list[_Job[Any]]) -> None:
        if len(group) == 1:  # alone: its own transaction, no savepoint
            try:
                with self._begin() as conn:
                    group[0].result = group[0].fn(conn)
            except BaseException as exc:
                group[0].result, group[0].error = None, exc
                if not isinstance(exc, Exception):
                    raise
            return
        try:
            with self._begin() as conn:
                for j in group:
                    if j.checks_first and (changes := _changes(conn)) is not None:
                        try:
                            j.result = j.fn(conn)
                        except IdealrtError as exc:
                            if _changes(conn) != changes:
                                raise RuntimeError(
                                    "a write job that checks first wrote, then failed"
                                ) from exc
                            j.error = exc
                        continue
                    try:
                        with _savepoint(conn):
                            j.result = j.fn(conn)
                    except IdealrtError as exc:
                        j.error = exc
        except BaseException as exc:  # nothing of the group was committed
            for i, j in enumerate(group):
                j.result, j.error = None, exc if i == 0 else _own_copy(exc)
            if not isinstance(exc, Exception):
                raise


def _changes(conn: sa.Connection) -> int | None:
    """The rows changed on the connection so far (sqlite3's total_changes), or None where
    the driver does not count them."""
    count = getattr(conn.connection.dbapi_connection, "total_changes", None)
    return count if isinstance(count, int) else None


@contextlib.contextmanager
def _savepoint(conn: sa.Connection) -> Iterator[None]:
    nested = conn.begin_nested()
    try:
        yield
    except BaseException:
        nested.rollback()
        raise
    nested.commit()
