"""ProfileManager: the profiler's long-running work as resources (create, get, list, cancel,
watch), executed by a bounded pool of worker threads.

- create() validates the plan, stores the profile (idempotent by request_id: a repeated
  request returns the stored profile and starts nothing) and queues it.
- Workers (ordinary non-daemon threads) take queued profiles in FIFO order and hand each
  to its executor (executor/): `local` (runner.run_profile in this process, at most
  `max_concurrent` at once) or, when the profiler has one, the `remote` (kubernetes)
  executor for profiles that name no serving address and no HTTP target (a model to run
  on a GPU node; at most `remote_max_concurrent` followed at once, its own fair queue
  decides their order). `shutdown()` cancels what runs locally and closes the remote
  executor (its Jobs run on; a restart adopts them), marks nothing as failed (a restarted
  manager resumes it: `resume_unfinished()`), and joins the workers.
- watch() yields a snapshot now and after every change (state or progress), woken by a
  Condition; it ends at a terminal state or when `timeout` passes. Changes that happen
  while the consumer is busy are coalesced: the next snapshot is the latest. At most
  `max_watch_streams` watches are open at once; one more is ResourceExhausted
  WATCH_STREAMS_EXHAUSTED at once. watch_async() is the same on an asyncio loop (the
  profiler's grpc.aio WatchProfile): an open watch there is a coroutine waiting on an
  asyncio.Event that every change sets (one call into the loop per change), no thread.
- create() refuses a plan beyond `max_plan_samples` samples (plan.py `planned_samples`)
  and target fields beyond their sizes (plan.py `validate_target`), and hands the profile
  to `admit` (the server's: an HTTP target's base URL and credential against the outbound
  policy, outbound.py), all before anything is stored.
- Progress is written to the store at most every `persist_interval_s` and at every state
  change, by a thread of its own (`_ProgressWriter`), so that a slow store never holds up
  the measuring thread; when writes fall behind, only the latest snapshot of a profile is
  written. A progress write the store does not take is skipped (the next one carries the
  latest). Before a profile's terminal (or, at shutdown, QUEUED) state is written, its
  pending progress is dropped and a progress write under way is waited for, so a stale
  RUNNING never lands after it. A terminal state is always written eventually: when
  the store does not take it (UNAVAILABLE / DEADLINE_EXCEEDED), a thread retries with
  backoff (the options' retry_base_s / retry_cap_s, full jitter, waiting with the options'
  sleep) until it does, and until then the profile stays in memory, so that Get and
  Watch answer with its terminal state. `shutdown()` makes one last try of each.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import dataclasses
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from idealrt.core.clock import utcnow
from idealrt.core.config import ProfilerConfig
from idealrt.core.domain import Profile, ProfileState, Sample, TargetKind
from idealrt.core.errors import (
    FailedPrecondition,
    IdealrtError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from idealrt.core.namespaces import (
    profile_not_found,
    readable,
    require_writer,
    visible_profile,
)
from idealrt.core.reasons import PROFILE_TERMINAL
from idealrt.services.profiler._outage import Outage, RetryPolicy, is_transient
from idealrt.services.profiler.executor.base import Executor, Recovery
from idealrt.services.profiler.executor.local import LocalExecutor
from idealrt.services.profiler.plan import (
    known_spec,
    total_samples,
    validate_plan,
    validate_target,
)
from idealrt.services.profiler.quotas import Quotas, usage_of
from idealrt.services.profiler.reasons import (
    PLACEMENT_NEEDS_KUBERNETES,
    SHUTTING_DOWN,
    WATCH_STREAMS_EXHAUSTED,
)
from idealrt.services.profiler.runner import RunnerOptions, error_text
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["ProfileManager", "ProfileStore"]

log = structlog.get_logger(__name__)


class ProfileStore(Protocol):
    """What the manager needs from the store (`idealrt.services.store` or its client)."""

    def create_profile(self, profile: Profile) -> tuple[Profile, bool]: ...

    def get_profile(self, profile_id: str) -> Profile: ...

    def update_profile(self, profile: Profile) -> object: ...

    def list_profiles(
        self,
        page_size: int,
        page_token: str,
        state: ProfileState | None = None,
        *,
        namespaces: frozenset[str] = ...,
    ) -> tuple[builtins.list[Profile], str]: ...

    def append_samples(self, profile_id: str, batch_id: str, samples: Sequence[Sample]) -> int: ...

    def all_samples(self, profile_id: str) -> list[Sample]: ...

    def count_samples(self, profile_id: str) -> int: ...

    def unfinished_profiles(self) -> list[Profile]: ...


class _ProgressWriter:
    """Writes progress snapshots with `persist` on one thread (started at the first):
    the latest per profile, in the order the profiles were first put. Not `background`:
    at once, in the caller's thread (RunnerOptions.background_writes)."""

    def __init__(self, persist: Callable[[Profile], object], background: bool = True) -> None:
        self.persist = persist
        self.background = background
        self._cond = threading.Condition()
        self._pending: dict[str, Profile] = {}
        self._writing: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def put(self, profile: Profile) -> None:
        if not self.background:
            self.persist(profile)
            return
        with self._cond:
            if self._closed:
                return
            self._pending[profile.id] = profile
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="profiler-progress-writer", daemon=False
                )
                self._thread.start()
            self._cond.notify_all()

    def settle(self, profile_id: str) -> None:
        """Drop the pending snapshot of `profile_id` and wait out a write of it under way."""
        with self._cond:
            self._pending.pop(profile_id, None)
            while self._writing == profile_id:
                self._cond.wait()

    def close(self) -> None:
        """Stop: what is pending is dropped (progress only; states that matter are
        written by their own calls), a write under way finishes."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                profile_id = next(iter(self._pending))
                profile = self._pending.pop(profile_id)
                self._writing = profile_id
            try:
                self.persist(profile)  # logs what the store did not take
            except Exception:  # the thread's top: log, and write the next one
                log.exception("progress_writer_error", profile_id=profile_id)
            finally:
                with self._cond:
                    self._writing = None
                    self._cond.notify_all()


class _LoopWakers:
    """The asyncio.Events of async watches (`ProfileManager.watch_async`), by event loop;
    changed and woken under the manager's lock. A change costs one call_soon_threadsafe
    per loop, however many watches wait on it."""

    def __init__(self) -> None:
        self._events: dict[asyncio.AbstractEventLoop, set[asyncio.Event]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._events.setdefault(loop, set()).add(event)

    def discard(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        events = self._events.get(loop)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[loop]

    def wake(self) -> None:
        for loop, events in self._events.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_set_all, list(events))


def _set_all(events: builtins.list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class _Condition(threading.Condition):
    """The manager's Condition; `notify_all` also wakes the async watches."""

    def __init__(self) -> None:
        super().__init__()
        self.wakers = _LoopWakers()

    def notify_all(self) -> None:
        super().notify_all()
        self.wakers.wake()


@dataclasses.dataclass
class _Entry:
    profile: Profile
    executor: Executor
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    version: int = 0
    running: bool = False
    last_persist: float = 0.0
    unsaved: bool = False  # a terminal state the store has not taken yet


class ProfileManager:
    def __init__(
        self,
        store: ProfileStore,
        target_factory: Callable[[Profile], GenerationTarget],
        lease_dir: Path,
        max_concurrent: int = 1,
        *,
        options: RunnerOptions | None = None,
        persist_interval_s: float = 1.0,
        max_plan_samples: int = ProfilerConfig.max_plan_samples,
        max_watch_streams: int = ProfilerConfig.max_watch_streams,
        max_plan_tokens: int = ProfilerConfig.max_plan_tokens,
        admit: Callable[[Profile], None] | None = None,
        quotas: Quotas | None = None,
        remote: Executor | None = None,
        remote_max_concurrent: int = 256,
    ) -> None:
        if max_concurrent < 1 or remote_max_concurrent < 1:
            raise ValueError("max_concurrent and remote_max_concurrent must be >= 1")
        if max_watch_streams < 1:
            raise ValueError("max_watch_streams must be >= 1")
        self.store = store
        self.target_factory = target_factory
        self.max_concurrent = max_concurrent
        self.options = dataclasses.replace(options or RunnerOptions(), lease_dir=lease_dir)
        self.persist_interval_s = persist_interval_s
        self.max_plan_samples = max_plan_samples
        self.max_watch_streams = max_watch_streams
        self.max_plan_tokens = max_plan_tokens
        self.admit = admit
        self.quotas = quotas or Quotas()
        self.local: Executor = LocalExecutor(target_factory, store, self.options)
        self.remote = remote
        self._limits = {self.local.name: max_concurrent}
        if remote is not None:
            self._limits[remote.name] = remote_max_concurrent
        self._busy: collections.Counter[str] = collections.Counter()  # running, by executor
        self._create_lock = threading.Lock()  # a quota's check and the create it allows
        self._cond = _Condition()
        self._entries: dict[str, _Entry] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._workers: builtins.list[threading.Thread] = []
        self._savers: builtins.list[threading.Thread] = []
        self._stopping = threading.Event()  # set by shutdown(): savers make a last try
        self._watches = 0
        self._closed = False
        self._progress_writer = _ProgressWriter(
            self._persist, background=self.options.background_writes
        )

    # ------------------------------------------------------------ API

    def create(self, profile: Profile) -> Profile:
        """Validate (the plan against the model's context when the spec is known, and its
        size against `max_plan_samples`; the target's fields), store (idempotent by
        request_id) and queue a profile."""
        validate_target(profile.target)
        spec = known_spec(profile.model, profile.target.kind)
        validate_plan(
            profile.plan, spec, max_samples=self.max_plan_samples, max_tokens=self.max_plan_tokens
        )
        require_writer(profile.namespace)
        if not profile.placement.empty and self.executor_for(profile) is self.local:
            why = (
                "this profiler runs profiles in its own process (IDEALRT_PROFILER_EXECUTOR=local)"
                if self.remote is None
                else "a profile with a serving address or an HTTP target runs in the "
                "profiler's own process"
            )
            raise InvalidArgument(
                PLACEMENT_NEEDS_KUBERNETES,
                f"profile.placement must be empty: {why}; a placement (GPU product, node "
                "pool, whole node) needs the kubernetes executor and a profile without "
                "target.address",
                field="profile.placement",
            )
        if self.admit is not None:
            self.admit(profile)
        with self._cond:
            if self._closed:
                raise FailedPrecondition(SHUTTING_DOWN, "the profiler is shutting down")
        with self._create_lock:
            return self._create_within_quota(profile)

    def _create_within_quota(self, profile: Profile) -> Profile:
        if self.quotas.enabled:
            ns = profile.namespace
            usage = usage_of(self._namespace_profiles(ns), ns, utcnow())
            self.quotas.check_create(ns, usage, total_samples(profile.plan))
        fresh = dataclasses.replace(
            profile,
            state=ProfileState.QUEUED,
            create_time=profile.create_time or utcnow(),
            start_time=None,
            end_time=None,
            completed_samples=0,
            total_samples=total_samples(profile.plan),
            error="",
        )
        stored, created = self.store.create_profile(fresh)
        if created:
            log.info("profile_created", profile_id=stored.id, request_id=stored.request_id)
            self._enqueue(stored)
        return self.get(stored.id)  # live progress when it already runs here

    def get(self, profile_id: str) -> Profile:
        """The profile (live when it runs here); NOT_FOUND, as if it did not exist, when
        the caller may not read its namespace."""
        with self._cond:
            entry = self._entries.get(profile_id)
            found = dataclasses.replace(entry.profile) if entry is not None else None
        return visible_profile(found if found is not None else self._load(profile_id))

    def list(
        self, page_size: int = 50, page_token: str = "", state: ProfileState | None = None
    ) -> tuple[builtins.list[Profile], str]:
        """A page from the store, with live progress for the profiles this manager runs;
        only the namespaces the caller may read."""
        visible = readable()
        if visible is not None and not visible:
            return [], ""
        if visible is None:
            page, token = self.store.list_profiles(page_size, page_token, state)
        else:
            page, token = self.store.list_profiles(page_size, page_token, state, namespaces=visible)
        with self._cond:
            live = [
                dataclasses.replace(self._entries[p.id].profile) if p.id in self._entries else p
                for p in page
            ]
        return live, token

    def cancel(self, profile_id: str) -> Profile:
        """Cancel a queued or running profile (NotFound; FailedPrecondition if finished).
        A running one stops between samples, keeping its samples; the returned snapshot
        may still say RUNNING until it has. NOT_FOUND when the caller may not read its
        namespace, PERMISSION_DENIED when it may read but not write there."""
        require_writer(self.get(profile_id).namespace)
        with self._cond:
            entry = self._entries.get(profile_id)
            if entry is not None:
                if entry.profile.state.terminal:
                    raise self._terminal_error(entry.profile)
                entry.cancel.set()
                if entry.running:
                    return dataclasses.replace(entry.profile)
                if profile_id in self._queue:
                    self._queue.remove(profile_id)
                snapshot = self._set_locked(
                    entry,
                    dataclasses.replace(
                        entry.profile, state=ProfileState.CANCELLED, end_time=utcnow()
                    ),
                )
            else:
                snapshot = None
        if entry is not None and snapshot is not None:
            self._save_terminal(entry, snapshot)
            return snapshot
        stored = self._load(profile_id)
        if stored.state.terminal:
            raise self._terminal_error(stored)
        # Unfinished in the store but not run here (e.g. left by a crashed process): the
        # caller learns if the store does not take it (nothing here would retry it).
        stored = dataclasses.replace(stored, state=ProfileState.CANCELLED, end_time=utcnow())
        self.store.update_profile(stored)
        return stored

    def watch(
        self,
        profile_id: str,
        timeout: float | None = None,
        *,
        is_active: Callable[[], bool] | None = None,
        liveness_s: float = 1.0,
        on_close: Callable[[Callable[[], None]], object] | None = None,
    ) -> Iterator[Profile]:
        """Snapshots: the current one, then one per change, until terminal or timeout.

        At most `max_watch_streams` watches run at once: one more raises ResourceExhausted
        WATCH_STREAMS_EXHAUSTED when it starts (its first `next`), before any snapshot.

        `is_active` (e.g. grpc's `context.is_active`) is asked at every wake-up and at
        least every `liveness_s` while nothing changes (a sleeping wait, not a poll of the
        profile), so a watcher whose client went away does not hold a thread forever.
        `on_close` (e.g. grpc's `context.add_callback`) is given a function that wakes the
        watch, so that it ends, and frees its slot, as soon as the client goes away.
        `watch_async` is the same for an asyncio caller, without a thread."""
        self._open_watch()
        try:
            self.get(profile_id)  # NOT_FOUND unless the caller may read it
            if on_close is not None:
                on_close(self._wake)
            yield from self._watch(profile_id, timeout, is_active, liveness_s)
        finally:
            with self._cond:
                self._watches -= 1

    def _open_watch(self) -> None:
        with self._cond:
            if self._watches >= self.max_watch_streams:
                raise ResourceExhausted(
                    WATCH_STREAMS_EXHAUSTED,
                    f"{self._watches} WatchProfile streams are open, the limit "
                    f"(max_watch_streams, IDEALRT_MAX_WATCH_STREAMS) is "
                    f"{self.max_watch_streams}: close one, or poll GetProfile",
                )
            self._watches += 1

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _watch_step_locked(
        self, profile_id: str, entry: _Entry, seen: int
    ) -> tuple[int, Profile] | None:
        """Under the lock: (version, snapshot) when `entry` changed since version `seen`,
        else None; UNAVAILABLE when the profiler shut down mid-profile (it will not change
        here any more, and a plain end would read as "done": a client reconnects,
        ProfilerClient.watch, to the restarted profiler)."""
        if entry.version != seen:
            return entry.version, dataclasses.replace(entry.profile)
        if self._closed and not entry.running:
            raise Unavailable(
                SHUTTING_DOWN,
                f"the profiler is shutting down; profile {profile_id} is "
                "checkpointed and resumes when it is back: watch again",
                field="id",
            )
        return None

    def _watch(
        self,
        profile_id: str,
        timeout: float | None,
        is_active: Callable[[], bool] | None,
        liveness_s: float,
    ) -> Iterator[Profile]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            entry = self._entries.get(profile_id)
        if entry is None:
            yield self._load(profile_id)
            return
        seen = -1
        last: Profile | None = None
        while True:
            with self._cond:
                while (step := self._watch_step_locked(profile_id, entry, seen)) is None:
                    if is_active is not None and not is_active():
                        return
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    if is_active is not None:
                        remaining = liveness_s if remaining is None else min(remaining, liveness_s)
                    self._cond.wait(remaining)
            seen, snapshot = step
            if snapshot == last:
                continue  # a write that changed nothing a watcher sees (a checkpoint)
            last = snapshot
            yield snapshot
            if snapshot.state.terminal:
                return

    async def watch_async(
        self, profile_id: str, timeout: float | None = None
    ) -> AsyncIterator[Profile]:
        """`watch` for an asyncio caller (the profiler's grpc.aio WatchProfile): the same
        snapshots, limit and errors, waiting on its event loop, so an open watch holds no
        thread (a client that goes away cancels the task, which ends the watch). Only a
        profile not run here is read from the store, on a thread."""
        self._open_watch()
        try:
            with self._cond:
                entry = self._entries.get(profile_id)
                found = dataclasses.replace(entry.profile) if entry is not None else None
            if entry is None or found is None:
                # NOT_FOUND unless the caller may read it (to_thread: same principal)
                yield await asyncio.to_thread(self.get, profile_id)
                return
            visible_profile(found)  # NOT_FOUND unless the caller may read it
            async for snapshot in self._watch_async(profile_id, entry, timeout):
                yield snapshot
        finally:
            with self._cond:
                self._watches -= 1

    async def _watch_async(
        self, profile_id: str, entry: _Entry, timeout: float | None
    ) -> AsyncIterator[Profile]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        changed = asyncio.Event()
        with self._cond:
            self._cond.wakers.add(loop, changed)
        try:
            seen = -1
            last: Profile | None = None
            while True:
                changed.clear()  # before the check: a change after it sets it again
                with self._cond:
                    step = self._watch_step_locked(profile_id, entry, seen)
                if step is None:
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        return
                    try:
                        await asyncio.wait_for(changed.wait(), remaining)
                    except TimeoutError:
                        return
                    continue
                seen, snapshot = step
                if snapshot == last:
                    continue  # a write that changed nothing a watcher sees (a checkpoint)
                last = snapshot
                yield snapshot
                if snapshot.state.terminal:
                    return
        finally:
            with self._cond:
                self._cond.wakers.discard(loop, changed)

    def resume_unfinished(self) -> builtins.list[Profile]:
        """Queue every QUEUED/RUNNING profile of the store (call once at start-up). Each
        executor recovers its own first: the kubernetes one adopts the Jobs it finds by
        label and FAILs (JOB_GONE) a RUNNING profile whose Job is gone, so no profile
        stays QUEUED or RUNNING forever."""
        with self._cond:
            unfinished = [p for p in self.store.unfinished_profiles() if p.id not in self._entries]
        resumed = []
        for executor in (self.local, self.remote):
            if executor is None:
                continue
            mine = [p for p in unfinished if self.executor_for(p) is executor]
            if not mine:
                continue
            try:
                recovery = executor.recover(mine)
            except Exception:  # e.g. the API server is down: each run finds out itself
                log.exception("executor_recovery_failed", executor=executor.name)
                recovery = Recovery(resume=mine, failed=[], released=[])
            for lost in recovery.failed:
                log.warning("profile_lost", profile_id=lost.id, error=lost.error)
                self._persist(lost)  # not taken: the next start finds it again
            for profile in recovery.resume:
                queued = dataclasses.replace(profile, state=ProfileState.QUEUED)
                if profile.state is not ProfileState.RUNNING or executor is self.local:
                    self._persist(queued)  # a Job that runs on keeps its profile RUNNING
                self._enqueue(queued)
                resumed.append(queued)
                log.info("profile_resumed", profile_id=profile.id, executor=executor.name)
        return resumed

    def run_stored(self, profile_id: str) -> Profile:
        """Inside a profiling Job's pod (IDEALRT_PROFILER_RUN): run the stored profile
        `profile_id` here, as the cluster's profiler asked, writing its progress, samples
        and end under that id. A finished one is left as it is."""
        profile = self._load(profile_id)
        if profile.state.terminal:
            log.warning("run_stored_finished", profile_id=profile_id, state=profile.state.value)
            return profile
        queued = dataclasses.replace(profile, state=ProfileState.QUEUED, queue_position=0)
        with self._cond:
            self._entries[queued.id] = _Entry(queued, self.local)
            self._queue.append(queued.id)
            self._start_worker_locked()
        log.info("run_stored", profile_id=profile_id)
        return queued

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking work, cancel profiles running here (their state is left unfinished
        in the store so the next start resumes them), close the remote executor (its Jobs
        run on and the next start adopts them) and join the workers."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            for entry in self._entries.values():
                if entry.running and entry.executor is self.local:
                    entry.cancel.set()
            self._cond.notify_all()
            workers = list(self._workers)
        if self.remote is not None:
            self.remote.close()
        for worker in workers:
            worker.join(timeout)
        self._progress_writer.close()
        self._stopping.set()  # savers: one last try each (after the workers' own saves)
        with self._cond:
            savers = list(self._savers)
        for saver in savers:
            saver.join(timeout)

    def executor_for(self, profile: Profile) -> Executor:
        """Where `profile` runs: the remote (kubernetes) executor for a model to run on a
        stack (a serving target without an address), else this process."""
        t = profile.target
        if self.remote is not None and t.kind == TargetKind.SERVING and not t.address:
            return self.remote
        return self.local

    # ------------------------------------------------------------ internals

    @staticmethod
    def _terminal_error(profile: Profile) -> FailedPrecondition:
        return FailedPrecondition(
            PROFILE_TERMINAL,
            f"profile {profile.id} already finished ({profile.state.value}); nothing to cancel",
            field="id",
        )

    def _load(self, profile_id: str) -> Profile:
        profile = self.store.get_profile(profile_id)
        if profile is None:  # a store that returns None instead of raising
            raise profile_not_found(profile_id)
        return profile

    def _namespace_profiles(self, namespace: str) -> builtins.list[Profile]:
        """Every profile of `namespace` (the store's pages), live where it runs here: what
        its quotas count."""
        out: builtins.list[Profile] = []
        token = ""
        while True:
            page, token = self.store.list_profiles(
                500, token, None, namespaces=frozenset({namespace})
            )
            out.extend(page)
            if not token:
                break
        with self._cond:
            return [
                dataclasses.replace(self._entries[p.id].profile) if p.id in self._entries else p
                for p in out
            ]

    def _enqueue(self, profile: Profile) -> None:
        with self._cond:
            if self._closed:
                return
            self._entries[profile.id] = _Entry(profile, self.executor_for(profile))
            self._queue.append(profile.id)
            self._start_worker_locked()

    def _start_worker_locked(self) -> None:
        """One more worker when every worker is busy or about to be, up to the sum of the
        executors' limits (a worker takes only what its executor has room for)."""
        busy = sum(1 for e in self._entries.values() if e.running)
        alive = [w for w in self._workers if w.is_alive()]
        self._workers = alive
        if len(alive) < sum(self._limits.values()) and len(alive) < busy + len(self._queue):
            worker = threading.Thread(
                target=self._work, name=f"profiler-worker-{len(alive)}", daemon=False
            )
            self._workers.append(worker)
            worker.start()
        self._cond.notify_all()

    def _next_locked(self) -> _Entry | None:
        """The first queued profile whose executor has room (FIFO otherwise)."""
        for profile_id in self._queue:
            entry = self._entries[profile_id]
            name = entry.executor.name
            if self._busy[name] < self._limits[name]:
                self._queue.remove(profile_id)
                return entry
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (entry := self._next_locked()) is None:
                    self._cond.wait()
                if self._closed:
                    return
                assert entry is not None
                entry.running = True
                self._busy[entry.executor.name] += 1
            try:
                self._run(entry)
            except Exception:  # a thread's top: log it, and go on with the next profile
                log.exception("profile_worker_error", profile_id=entry.profile.id)
                with self._cond:
                    entry.running = False
            finally:
                with self._cond:
                    self._busy[entry.executor.name] -= 1
                    self._cond.notify_all()

    def _run(self, entry: _Entry) -> None:
        profile = entry.profile
        try:
            final = entry.executor.run(
                profile,
                cancel=entry.cancel,
                on_progress=lambda p: self._progress(entry, p),
            )
        except Exception as exc:  # executors report failures; this is a bug's net
            log.exception("run_profile_crashed", profile_id=profile.id)
            final = dataclasses.replace(
                entry.profile,
                state=ProfileState.FAILED,
                end_time=utcnow(),
                error=error_text(exc),
            )
        with self._cond:
            shutting_down = self._closed and (
                final.state == ProfileState.CANCELLED or not final.state.terminal
            )
        if shutting_down:
            self._progress_writer.settle(final.id)
            if final.state.terminal:
                # Interrupted by shutdown, not by a user: leave it unfinished for resume.
                final = dataclasses.replace(
                    final, state=ProfileState.QUEUED, end_time=None, error=""
                )
                self._persist(final)
            # else: a remote run left running (its Job runs on): stored as it is
            with self._cond:
                self._set_locked(entry, final)
                entry.running = False
            return
        self._save_terminal(entry, final)

    def _progress(self, entry: _Entry, profile: Profile) -> None:
        if profile.state.terminal:
            return  # published by _run once stored, so a watcher never outruns the store
        with self._cond:
            state_changed = (
                profile.state != entry.profile.state
                or profile.queue_position != entry.profile.queue_position
            )
            self._set_locked(entry, profile)
            due = time.monotonic() - entry.last_persist >= self.persist_interval_s
            if state_changed or due:
                entry.last_persist = time.monotonic()
            else:
                return
        self._progress_writer.put(profile)

    def _set_locked(self, entry: _Entry, profile: Profile) -> Profile:
        entry.profile = profile
        entry.version += 1
        self._cond.notify_all()
        return dataclasses.replace(profile)

    def _persist(self, profile: Profile) -> IdealrtError | None:
        """Write a profile; the error when the store did not take it (logged: a transient
        failure as a warning, any other with its traceback)."""
        try:
            self.store.update_profile(profile)
        except IdealrtError as exc:
            if is_transient(exc):
                log.warning(
                    "profile_persist_deferred",
                    profile_id=profile.id,
                    state=profile.state.value,
                    reason=exc.reason,
                )
            else:
                log.exception("profile_persist_failed", profile_id=profile.id)
            return exc
        return None

    def _save_terminal(self, entry: _Entry, final: Profile) -> None:
        """Write a terminal state, then publish it (so a watcher does not outrun the store
        when the store is up). When the store does not take it, publish it anyway and keep
        the entry in memory (Get and Watch answer from it); a transient failure is retried
        by a saver thread until the store takes it, any other answer is logged and the
        entry stays (retrying would get the same answer)."""
        self._progress_writer.settle(final.id)
        failure = self._persist(final)
        with self._cond:
            self._set_locked(entry, final)
            entry.running = False
            entry.unsaved = failure is not None
            if failure is not None and is_transient(failure):
                saver = threading.Thread(
                    target=self._save_until_stored,
                    args=(entry, final, failure),
                    name=f"profiler-saver-{final.id}",
                    daemon=False,
                )
                self._savers = [s for s in self._savers if s.is_alive()] + [saver]
                saver.start()
        if failure is None:
            self._forget(final.id)

    def _save_until_stored(self, entry: _Entry, final: Profile, failure: IdealrtError) -> None:
        """A saver thread: retry `final` with backoff (no window: until the store takes
        it), waiting with the options' sleep on the shutdown event; at shutdown, one last
        try. A failure that is not transient ends the retries (logged)."""
        opts = self.options
        policy = RetryPolicy(math.inf, opts.retry_base_s, opts.retry_cap_s)
        outage = Outage(policy, opts.clock, random.Random(f"idealrt-save:{final.id}"))
        try:
            while True:
                delay = outage.failed(failure) or 0.0  # never None: no window
                stopping = opts.sleep(self._stopping, delay)
                try:
                    self.store.update_profile(final)
                except IdealrtError as exc:
                    if not is_transient(exc):
                        log.exception("terminal_persist_rejected", profile_id=final.id)
                        return
                    if stopping:
                        log.error(
                            "terminal_state_not_stored",
                            profile_id=final.id,
                            state=final.state.value,
                            attempts=outage.attempts,
                            reason=exc.reason,
                        )
                        return
                    failure = exc
                    continue
                break
        except Exception:  # a thread's top: log, never die silently
            log.exception("terminal_saver_crashed", profile_id=final.id)
            return
        log.info(
            "terminal_state_stored",
            profile_id=final.id,
            state=final.state.value,
            attempts=outage.attempts + 1,
        )
        with self._cond:
            entry.unsaved = False
        self._forget(final.id)

    def _forget(self, profile_id: str) -> None:
        with self._cond:
            entry = self._entries.get(profile_id)
            if (
                entry is not None
                and entry.profile.state.terminal
                and not entry.running
                and not entry.unsaved
            ):
                del self._entries[profile_id]
