"""ProfilerService: converts, calls the ProfileManager, converts back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from idealrt.core import convert as cv
from idealrt.core.errors import InvalidArgument
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.reasons import PROFILE_REQUIRED

__all__ = ["ProfilerServicer"]


class ProfilerServicer(pbg.ProfilerServiceServicer):
    def __init__(self, manager: ProfileManager) -> None:
        self.manager = manager

    def CreateProfile(
        self, request: pb.CreateProfileRequest, context: grpc.ServicerContext
    ) -> pb.CreateProfileResponse:
        if not request.HasField("profile"):
            raise InvalidArgument(PROFILE_REQUIRED, "profile is required", field="profile")
        prof = cv.profile_from_pb(request.profile, new=True)
        prof.request_id = request.request_id or request.profile.request_id
        return pb.CreateProfileResponse(profile=cv.profile_to_pb(self.manager.create(prof)))

    def GetProfile(
        self, request: pb.GetProfileRequest, context: grpc.ServicerContext
    ) -> pb.GetProfileResponse:
        return pb.GetProfileResponse(profile=cv.profile_to_pb(self.manager.get(request.id)))

    def ListProfiles(
        self, request: pb.ListProfilesRequest, context: grpc.ServicerContext
    ) -> pb.ListProfilesResponse:
        items, token = self.manager.list(request.page_size, request.page_token)
        return pb.ListProfilesResponse(
            profiles=[cv.profile_to_pb(p) for p in items], next_page_token=token
        )

    async def WatchProfile(
        self, request: pb.WatchProfileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchProfileResponse]:
        # async: on the profiler's grpc.aio server an open watch holds no thread
        async for prof in self.manager.watch_async(request.id):
            yield pb.WatchProfileResponse(profile=cv.profile_to_pb(prof))

    def CancelProfile(
        self, request: pb.CancelProfileRequest, context: grpc.ServicerContext
    ) -> pb.CancelProfileResponse:
        return pb.CancelProfileResponse(profile=cv.profile_to_pb(self.manager.cancel(request.id)))
