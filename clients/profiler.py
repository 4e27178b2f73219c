"""Client of the ProfilerService."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import grpc
import structlog

from idealrt.clients._channel import ClientChannel
from idealrt.core import convert as cv
from idealrt.core.domain import Profile
from idealrt.core.errors import Unavailable
from idealrt.core.grpc_client import (
    DEFAULT_TIMEOUT_S,
    Token,
    call,
    call_stream,
    request_id_or_new,
)
from idealrt.core.tls import TlsConfig
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg

__all__ = [
    "RECONNECT_BACKOFF_CAP_S",
    "RECONNECT_BACKOFF_S",
    "WATCH_RECONNECT_WINDOW_S",
    "ProfilerClient",
]

log = structlog.get_logger(__name__)

WATCH_RECONNECT_WINDOW_S = 300.0  # how long watch() waits for a restarted profiler
RECONNECT_BACKOFF_S = 0.1
RECONNECT_BACKOFF_CAP_S = 5.0


def _key(p: Profile) -> tuple[object, ...]:
    """What makes a watch update new: the profile's mutable fields."""
    return (
        p.state,
        p.completed_samples,
        p.total_samples,
        p.start_time,
        p.end_time,
        p.error,
        p.queue_position,
    )


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class ProfilerClient(ClientChannel):
    _STUB = pbg.ProfilerServiceStub
    _stub: pbg.ProfilerServiceStub

    def __init__(
        self,
        target: str | grpc.Channel,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        watch_reconnect_window_s: float = WATCH_RECONNECT_WINDOW_S,
        tls: TlsConfig | None = None,
        token: Token | None = None,
    ) -> None:
        """`watch_reconnect_window_s`: see `watch`; the rest: see ClientChannel."""
        super().__init__(target, timeout, tls=tls, token=token)
        self.watch_reconnect_window_s = watch_reconnect_window_s

    def create_profile(self, profile: Profile) -> Profile:
        """Sends the client's parts of `profile`: model, stack, plan, target, namespace,
        request_id and `placement` (where a kubernetes executor may run it; a local
        executor refuses a non-empty one). The server sets state, progress and
        `queue_position` (what `profile` holds there is ignored)."""
        r = call(
            self._stub.CreateProfile,
            pb.CreateProfileRequest(
                request_id=request_id_or_new(profile.request_id),
                profile=cv.profile_to_pb(profile),
            ),
            self.timeout,
        )
        return cv.profile_from_pb(r.profile)

    def get_profile(self, id: str) -> Profile:
        r = call(self._stub.GetProfile, pb.GetProfileRequest(id=id), self.timeout)
        return cv.profile_from_pb(r.profile)

    def list_profiles(self, page_size: int = 0, page_token: str = "") -> tuple[list[Profile], str]:
        r = call(
            self._stub.ListProfiles,
            pb.ListProfilesRequest(page_size=page_size, page_token=page_token),
            self.timeout,
        )
        return [cv.profile_from_pb(p) for p in r.profiles], r.next_page_token

    def watch(
        self, id: str, timeout: float | None = None, *, reconnect_window_s: float | None = None
    ) -> Iterator[Profile]:
        """Yields the profile on every change until it reaches a terminal state.

        Rides out a restart of the profiler: when the stream breaks with UNAVAILABLE it
        backs off (RECONNECT_BACKOFF_S doubling to RECONNECT_BACKOFF_CAP_S, jittered),
        re-Gets the profile, yields it if it changed, and watches again; a snapshot equal to
        the last one yielded (state, progress, times, error, queue position) is not yielded
        twice, and a terminal one is never lost. It gives up, raising the UNAVAILABLE error,
        when the profiler has not answered for `reconnect_window_s` (default: the client's
        `watch_reconnect_window_s`). `timeout` bounds the whole watch (DEADLINE_EXCEEDED).
        """
        window = self.watch_reconnect_window_s if reconnect_window_s is None else reconnect_window_s
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple[object, ...] | None = None
        while True:
            try:
                for r in call_stream(
                    self._stub.WatchProfile, pb.WatchProfileRequest(id=id), _left(deadline)
                ):
                    profile = cv.profile_from_pb(r.profile)
                    if _key(profile) != last:
                        last = _key(profile)
                        yield profile
                    if profile.state.terminal:
                        return
                return  # the server ended the watch
            except Unavailable as err:
                profile = self._reget(id, err, window, deadline)
            if _key(profile) != last:
                last = _key(profile)
                yield profile
            if profile.state.terminal:
                return

    def _reget(self, id: str, err: Unavailable, window: float, deadline: float | None) -> Profile:
        """The profile once the profiler answers again, retried with backoff; raises `err`
        (the latest UNAVAILABLE) after `window` seconds without an answer."""
        outage_start = time.monotonic()
        backoff = RECONNECT_BACKOFF_S
        while True:
            left = window - (time.monotonic() - outage_start)
            if left <= 0:
                raise err
            pause = min(backoff * random.uniform(0.5, 1.0), left)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            log.info("watch_reconnecting", profile_id=id, in_s=round(pause, 3), reason=err.reason)
            time.sleep(pause)
            backoff = min(backoff * 2, RECONNECT_BACKOFF_CAP_S)
            timeout = self.timeout if deadline is None else min(self.timeout, _left(deadline) or 0)
            try:
                r = call(self._stub.GetProfile, pb.GetProfileRequest(id=id), timeout)
            except Unavailable as again:
                err = again
                continue
            return cv.profile_from_pb(r.profile)

    def cancel(self, id: str) -> Profile:
        r = call(self._stub.CancelProfile, pb.CancelProfileRequest(id=id), self.timeout)
        return cv.profile_from_pb(r.profile)
