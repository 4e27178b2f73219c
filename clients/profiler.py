"""Client of the ProfilerService."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from idealrt.core import convert as cv
from idealrt.core.domain import Profile
from idealrt.core.grpc_client import DEFAULT_TIMEOUT_S, call, call_stream, open_channel
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg

__all__ = ["ProfilerClient"]


class ProfilerClient:
    def __init__(self, target: str | grpc.Channel, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._own = isinstance(target, str)
        self._channel = open_channel(target) if isinstance(target, str) else target
        self._stub = pbg.ProfilerServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        if self._own:
            self._channel.close()

    def create_profile(self, profile: Profile) -> Profile:
        r = call(
            self._stub.CreateProfile,
            pb.CreateProfileRequest(
                request_id=profile.request_id, profile=cv.profile_to_pb(profile)
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

    def watch(self, id: str, timeout: float | None = None) -> Iterator[Profile]:
        """Yields the profile on every change until it reaches a terminal state."""
        for r in call_stream(self._stub.WatchProfile, pb.WatchProfileRequest(id=id), timeout):
            yield cv.profile_from_pb(r.profile)

    def cancel(self, id: str) -> Profile:
        r = call(self._stub.CancelProfile, pb.CancelProfileRequest(id=id), self.timeout)
        return cv.profile_from_pb(r.profile)
