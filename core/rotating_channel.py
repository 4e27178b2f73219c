"""A client channel that follows certificate rotation: cert-manager renews the files a
service presents to the others (IDEALRT_TLS_CLIENT_CERT / _KEY) and the CA it trusts
(IDEALRT_TLS_CA) in place, and grpc reads channel credentials once, when the channel is
made. `RotatingChannel` checks the files' (mtime, size) at most every `check_every_s` when
a call starts; when they changed it makes a new channel from them and sends new calls
there (calls under way finish on the old one, closed with this channel). A new file that
cannot be read or does not make credentials keeps the old channel and logs
`tls_client_reload_failed` once per change (a half-written file is read again at the
next check after it changes again).

Every call of a stub made on this channel is resolved at call time (`_Deferred`), so
stubs made once, as the clients do, follow the rotation too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog

__all__ = ["RotatingChannel", "file_stamp"]

log = structlog.get_logger(__name__)


def file_stamp(paths: Sequence[Path | None]) -> tuple[object, ...]:
    """(mtime_ns, size) of each file, None for one that is missing or unset."""
    out: list[object] = []
    for p in paths:
        try:
            st = p.stat() if p is not None else None
        except OSError:
            st = None
        out.append(None if st is None else (st.st_mtime_ns, st.st_size))
    return tuple(out)


class _Deferred:
    """A multicallable that asks the rotating channel for the current channel at each call
    (and makes that channel's multicallable once per channel)."""

    def __init__(self, owner: RotatingChannel, factory: Callable[[grpc.Channel], Any]) -> None:
        self._owner = owner
        self._factory = factory
        self._for: grpc.Channel | None = None
        self._callable: Any = None

    def _get(self) -> Any:
        channel = self._owner.current()
        if channel is not self._for:  # a race makes it twice at worst: both are equal
            self._callable, self._for = self._factory(channel), channel
        return self._callable

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().future(*args, **kwargs)


class RotatingChannel(grpc.Channel):
    """`make()` builds a channel from the files whose `stamp()` it watches."""

    def __init__(
        self,
        make: Callable[[], grpc.Channel],
        stamp: Callable[[], tuple[object, ...]],
        *,
        check_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make = make
        self._stamp = stamp
        self._every = check_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = stamp()
        self._inner = make()
        self._retired: list[grpc.Channel] = []
        self._next_check = clock() + check_every_s
        self.rotations = 0

    def current(self) -> grpc.Channel:
        """The channel for a call starting now (a new one after the files changed)."""
        now = self._clock()
        if now < self._next_check:
            return self._inner
        with self._lock:
            self._next_check = now + self._every
            stamp = self._stamp()
            if stamp == self._seen:
                return self._inner
            self._seen = stamp
            try:
                fresh = self._make()
            except (OSError, ValueError) as exc:  # unreadable or not PEM: keep the working
                # channel, say why once per change
                log.error("tls_client_reload_failed", error=str(exc))
                return self._inner
            self._retired.append(self._inner)
            self._inner = fresh
            self.rotations += 1
            log.info("tls_client_reloaded", rotations=self.rotations)
            return self._inner

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Deferred(self, lambda ch: ch.unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Deferred(self, lambda ch: ch.unary_stream(method, *args, **kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Deferred(self, lambda ch: ch.stream_unary(method, *args, **kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Deferred(self, lambda ch: ch.stream_stream(method, *args, **kwargs))

    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        self.current().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        self._inner.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            channels = [*self._retired, self._inner]
            self._retired = []
        for ch in channels:
            ch.close()

    def __enter__(self) -> RotatingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
