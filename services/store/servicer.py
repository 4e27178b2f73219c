"""StoreService: converts, calls the domain `Store`, converts back."""

from __future__ import annotations

import grpc

from idealrt.core import convert as cv
from idealrt.core.errors import InvalidArgument
from idealrt.services.store.reasons import TOO_MANY_STATES
from idealrt.services.store.repository import Store
from idealrt.store.v1 import store_service_pb2 as pb
from idealrt.store.v1 import store_service_pb2_grpc as pbg

__all__ = ["StoreServicer"]


class StoreServicer(pbg.StoreServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    def CreateProfile(
        self, request: pb.CreateProfileRequest, context: grpc.ServicerContext
    ) -> pb.CreateProfileResponse:
        prof = cv.profile_from_pb(request.profile)
        if request.request_id:
            prof.request_id = request.request_id
        stored, created = self.store.create_profile(prof)
        return pb.CreateProfileResponse(profile=cv.profile_to_pb(stored), created=created)

    def GetProfile(
        self, request: pb.GetProfileRequest, context: grpc.ServicerContext
    ) -> pb.GetProfileResponse:
        return pb.GetProfileResponse(profile=cv.profile_to_pb(self.store.get_profile(request.id)))

    def UpdateProfile(
        self, request: pb.UpdateProfileRequest, context: grpc.ServicerContext
    ) -> pb.UpdateProfileResponse:
        updated = self.store.update_profile(cv.profile_from_pb(request.profile))
        return pb.UpdateProfileResponse(profile=cv.profile_to_pb(updated))

    def ListProfiles(
        self, request: pb.ListProfilesRequest, context: grpc.ServicerContext
    ) -> pb.ListProfilesResponse:
        if len(request.states) > 1:
            raise InvalidArgument(TOO_MANY_STATES, "states: give at most one state", field="states")
        state = cv.profile_state_from_pb(request.states[0], "states") if request.states else None
        items, token = self.store.list_profiles(request.page_size, request.page_token, state)
        return pb.ListProfilesResponse(
            profiles=[cv.profile_to_pb(p) for p in items], next_page_token=token
        )

    def AppendSamples(
        self, request: pb.AppendSamplesRequest, context: grpc.ServicerContext
    ) -> pb.AppendSamplesResponse:
        samples = [cv.sample_from_pb(s, f"samples[{i}]") for i, s in enumerate(request.samples)]
        n = self.store.append_samples(request.profile_id, request.batch_id, samples)
        return pb.AppendSamplesResponse(
            appended=n, total_samples=self.store.count_samples(request.profile_id)
        )

    def ListSamples(
        self, request: pb.ListSamplesRequest, context: grpc.ServicerContext
    ) -> pb.ListSamplesResponse:
        items, token = self.store.list_samples(
            request.profile_id, request.page_size, request.page_token
        )
        return pb.ListSamplesResponse(
            samples=[cv.sample_to_pb(s) for s in items], next_page_token=token
        )

    def CreateCostModel(
        self, request: pb.CreateCostModelRequest, context: grpc.ServicerContext
    ) -> pb.CreateCostModelResponse:
        cm = cv.cost_model_from_pb(request.cost_model)
        if request.request_id:
            cm.request_id = request.request_id
        stored, created = self.store.create_cost_model(cm)
        return pb.CreateCostModelResponse(cost_model=cv.cost_model_to_pb(stored), created=created)

    def GetCostModel(
        self, request: pb.GetCostModelRequest, context: grpc.ServicerContext
    ) -> pb.GetCostModelResponse:
        return pb.GetCostModelResponse(
            cost_model=cv.cost_model_to_pb(self.store.get_cost_model(request.id))
        )

    def ListCostModels(
        self, request: pb.ListCostModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListCostModelsResponse:
        items, token = self.store.list_cost_models(
            request.page_size, request.page_token, request.profile_id
        )
        return pb.ListCostModelsResponse(
            cost_models=[cv.cost_model_to_pb(c) for c in items], next_page_token=token
        )
