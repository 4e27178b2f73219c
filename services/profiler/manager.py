"""ProfileManager: the profiler's long-running work as resources (create, get, list, cancel,
watch), executed by a bounded pool of worker threads.

- create() validates the plan, stores the profile (idempotent by request_id: a repeated
  request returns the stored profile and starts nothing) and queues it.
- Workers (at most `max_concurrent`, ordinary non-daemon threads) take queued profiles in
  FIFO order and call `run_profile`; `shutdown()` cancels what runs, marks nothing as
  failed (a restarted manager resumes it: `resume_unfinished()`), and joins the workers.
- watch() yields a snapshot now and after every change (state or progress), woken by a
  Condition; it ends at a terminal state or when `timeout` passes. Changes that happen
  while the consumer is busy are coalesced: the next snapshot is the latest.
- Progress is written to the store at most every `persist_interval_s` and at every state
  change, outside any timed region.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from idealrt.core.clock import utcnow
from idealrt.core.domain import Profile, ProfileState, Sample
from idealrt.core.errors import FailedPrecondition, NotFound
from idealrt.core.reasons import PROFILE_NOT_FOUND, PROFILE_TERMINAL
from idealrt.services.profiler.plan import known_spec, total_samples, validate_plan
from idealrt.services.profiler.reasons import SHUTTING_DOWN
from idealrt.services.profiler.runner import RunnerOptions, error_text, run_profile
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["ProfileManager", "ProfileStore"]

log = structlog.get_logger(__name__)


class ProfileStore(Protocol):
    """What the manager needs from the store (`idealrt.services.store` or its client)."""

    def create_profile(self, profile: Profile) -> tuple[Profile, bool]: ...

    def get_profile(self, profile_id: str) -> Profile: ...

    def update_profile(self, profile: Profile) -> object: ...

    def list_profiles(
        self, page_size: int, page_token: str, state: ProfileState | None = None
    ) -> tuple[builtins.list[Profile], str]: ...

    def append_samples(self, profile_id: str, batch_id: str, samples: Sequence[Sample]) -> int: ...

    def all_samples(self, profile_id: str) -> list[Sample]: ...

    def count_samples(self, profile_id: str) -> int: ...

    def unfinished_profiles(self) -> list[Profile]: ...


@dataclasses.dataclass
class _Entry:
    profile: Profile
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    version: int = 0
    running: bool = False
    last_persist: float = 0.0


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
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.store = store
        self.target_factory = target_factory
        self.max_concurrent = max_concurrent
        self.options = dataclasses.replace(options or RunnerOptions(), lease_dir=lease_dir)
        self.persist_interval_s = persist_interval_s
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._workers: builtins.list[threading.Thread] = []
        self._closed = False

    # ------------------------------------------------------------ API

    def create(self, profile: Profile) -> Profile:
        """Validate (the plan against the model's context when the spec is known), store
        (idempotent by request_id) and queue a profile."""
        validate_plan(profile.plan, known_spec(profile.model, profile.target.kind))
        with self._cond:
            if self._closed:
                raise FailedPrecondition(SHUTTING_DOWN, "the profiler is shutting down")
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
        with self._cond:
            entry = self._entries.get(profile_id)
            if entry is not None:
                return dataclasses.replace(entry.profile)
        return self._load(profile_id)

    def list(
        self, page_size: int = 50, page_token: str = "", state: ProfileState | None = None
    ) -> tuple[builtins.list[Profile], str]:
        """A page from the store, with live progress for the profiles this manager runs."""
        page, token = self.store.list_profiles(page_size, page_token, state)
        with self._cond:
            live = [
                dataclasses.replace(self._entries[p.id].profile) if p.id in self._entries else p
                for p in page
            ]
        return live, token

    def cancel(self, profile_id: str) -> Profile:
        """Cancel a queued or running profile (NotFound; FailedPrecondition if finished).
        A running one stops between samples, keeping its samples; the returned snapshot
        may still say RUNNING until it has."""
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
        if snapshot is not None:
            self._persist(snapshot)
            self._forget(profile_id)
            return snapshot
        stored = self._load(profile_id)
        if stored.state.terminal:
            raise self._terminal_error(stored)
        # Unfinished in the store but not run here (e.g. left by a crashed process).
        stored = dataclasses.replace(stored, state=ProfileState.CANCELLED, end_time=utcnow())
        self._persist(stored)
        return stored

    def watch(
        self,
        profile_id: str,
        timeout: float | None = None,
        *,
        is_active: Callable[[], bool] | None = None,
        liveness_s: float = 1.0,
    ) -> Iterator[Profile]:
        """Snapshots: the current one, then one per change, until terminal or timeout.

        `is_active` (e.g. grpc's `context.is_active`) is asked at every wake-up and at
        least every `liveness_s` while nothing changes (a sleeping wait, not a poll of the
        profile), so a watcher whose client went away does not hold a thread forever."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            entry = self._entries.get(profile_id)
        if entry is None:
            yield self._load(profile_id)
            return
        seen = -1
        while True:
            with self._cond:
                while entry.version == seen:
                    if self._closed and not entry.running:
                        return  # shut down: it will not change here any more
                    if is_active is not None and not is_active():
                        return
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    if is_active is not None:
                        remaining = liveness_s if remaining is None else min(remaining, liveness_s)
                    self._cond.wait(remaining)
                seen = entry.version
                snapshot = dataclasses.replace(entry.profile)
            yield snapshot
            if snapshot.state.terminal:
                return

    def resume_unfinished(self) -> builtins.list[Profile]:
        """Queue every QUEUED/RUNNING profile of the store (call once at start-up)."""
        resumed = []
        for profile in self.store.unfinished_profiles():
            with self._cond:
                if profile.id in self._entries:
                    continue
            queued = dataclasses.replace(profile, state=ProfileState.QUEUED)
            self._persist(queued)
            self._enqueue(queued)
            resumed.append(queued)
            log.info("profile_resumed", profile_id=profile.id)
        return resumed

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking work, cancel running profiles (their state is left unfinished in
        the store so the next start resumes them) and join the workers."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            for entry in self._entries.values():
                if entry.running:
                    entry.cancel.set()
            self._cond.notify_all()
            workers = list(self._workers)
        for worker in workers:
            worker.join(timeout)

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
            raise NotFound(PROFILE_NOT_FOUND, f"no profile with id {profile_id!r}", field="id")
        return profile

    def _enqueue(self, profile: Profile) -> None:
        with self._cond:
            if self._closed:
                return
            self._entries[profile.id] = _Entry(profile)
            self._queue.append(profile.id)
            busy = sum(1 for e in self._entries.values() if e.running)
            alive = [w for w in self._workers if w.is_alive()]
            self._workers = alive
            if len(alive) < self.max_concurrent and len(alive) < busy + len(self._queue):
                worker = threading.Thread(
                    target=self._work, name=f"profiler-worker-{len(alive)}", daemon=False
                )
                self._workers.append(worker)
                worker.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                profile_id = self._queue.popleft()
                entry = self._entries[profile_id]
                entry.running = True
            self._run(entry)

    def _run(self, entry: _Entry) -> None:
        profile = entry.profile
        try:
            target = self.target_factory(profile)
        except Exception as exc:
            log.exception("target_factory_failed", profile_id=profile.id)
            final = dataclasses.replace(
                profile,
                state=ProfileState.FAILED,
                end_time=utcnow(),
                error=error_text(exc),
            )
        else:
            try:
                final = run_profile(
                    profile,
                    target,
                    self.store,
                    cancel=entry.cancel,
                    on_progress=lambda p: self._progress(entry, p),
                    options=self.options,
                )
            except Exception as exc:  # run_profile reports failures; this is a bug's net
                log.exception("run_profile_crashed", profile_id=profile.id)
                final = dataclasses.replace(
                    entry.profile,
                    state=ProfileState.FAILED,
                    end_time=utcnow(),
                    error=error_text(exc),
                )
        with self._cond:
            shutting_down = self._closed and final.state == ProfileState.CANCELLED
        if shutting_down:
            # Interrupted by shutdown, not by a user: leave it unfinished for resume.
            final = dataclasses.replace(final, state=ProfileState.QUEUED, end_time=None)
        self._persist(final)
        with self._cond:
            self._set_locked(entry, final)
            entry.running = False
        self._forget(profile.id)

    def _progress(self, entry: _Entry, profile: Profile) -> None:
        if profile.state.terminal:
            return  # published by _run once stored, so a watcher never outruns the store
        with self._cond:
            state_changed = profile.state != entry.profile.state
            self._set_locked(entry, profile)
            due = time.monotonic() - entry.last_persist >= self.persist_interval_s
            if state_changed or due:
                entry.last_persist = time.monotonic()
            else:
                return
        self._persist(profile)

    def _set_locked(self, entry: _Entry, profile: Profile) -> Profile:
        entry.profile = profile
        entry.version += 1
        self._cond.notify_all()
        return dataclasses.replace(profile)

    def _persist(self, profile: Profile) -> None:
        try:
            self.store.update_profile(profile)
        except Exception:
            log.exception("profile_persist_failed", profile_id=profile.id)

    def _forget(self, profile_id: str) -> None:
        with self._cond:
            entry = self._entries.get(profile_id)
            if entry is not None and entry.profile.state.terminal and not entry.running:
                del self._entries[profile_id]
