"""Client of the StoreService exposing the same methods as the domain `Store`, so services
(profiler, metrics) work the same over gRPC as in-process."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from idealrt.clients._channel import ClientChannel
from idealrt.core import convert as cv
from idealrt.core.domain import CostModel, Profile, ProfileState, Sample
from idealrt.core.grpc_client import (
    call,
    request_id_or_new,
)
from idealrt.store.v1 import store_service_pb2 as pb
from idealrt.store.v1 import store_service_pb2_grpc as pbg

__all__ = ["StoreClient"]


class StoreClient(ClientChannel):
    """ClientChannel(target, timeout, tls=, token=) on the StoreService."""

    _STUB = pbg.StoreServiceStub
    _stub: pbg.StoreServiceStub

    def create_profile(self, profile: Profile) -> tuple[Profile, bool]:
        r = call(
            self._stub.CreateProfile,
            pb.CreateProfileRequest(
                request_id=request_id_or_new(profile.request_id),
                profile=cv.profile_to_pb(profile),
            ),
            self.timeout,
        )
        return cv.profile_from_pb(r.profile), r.created

    def get_profile(self, id: str) -> Profile:
        r = call(self._stub.GetProfile, pb.GetProfileRequest(id=id), self.timeout)
        return cv.profile_from_pb(r.profile)

    def update_profile(self, profile: Profile) -> Profile:
        r = call(
            self._stub.UpdateProfile,
            pb.UpdateProfileRequest(profile=cv.profile_to_pb(profile)),
            self.timeout,
        )
        return cv.profile_from_pb(r.profile)

    def list_profiles(
        self,
        page_size: int = 0,
        page_token: str = "",
        state: ProfileState | None = None,
        namespaces: Iterable[str] = (),
    ) -> tuple[list[Profile], str]:
        """`namespaces`: only profiles in these (empty: every one the caller may read)."""
        req = pb.ListProfilesRequest(
            page_size=page_size, page_token=page_token, namespaces=list(namespaces)
        )
        if state is not None:
            req.states.append(cv.profile_state_to_pb(state))
        r = call(self._stub.ListProfiles, req, self.timeout)
        return [cv.profile_from_pb(p) for p in r.profiles], r.next_page_token

    def unfinished_profiles(self) -> list[Profile]:
        out: list[Profile] = []
        for state in (ProfileState.QUEUED, ProfileState.RUNNING):
            token = ""
            while True:
                page, token = self.list_profiles(500, token, state)
                out.extend(page)
                if not token:
                    break
        return out

    def append_samples(self, profile_id: str, batch_id: str, samples: Sequence[Sample]) -> int:
        r = call(
            self._stub.AppendSamples,
            pb.AppendSamplesRequest(
                profile_id=profile_id,
                batch_id=batch_id,
                samples=[cv.sample_to_pb(s) for s in samples],
            ),
            self.timeout,
        )
        return int(r.appended)

    def list_samples(
        self, profile_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Sample], str]:
        r = call(
            self._stub.ListSamples,
            pb.ListSamplesRequest(
                profile_id=profile_id, page_size=page_size, page_token=page_token
            ),
            self.timeout,
        )
        return [cv.sample_from_pb(s) for s in r.samples], r.next_page_token

    def all_samples(self, profile_id: str) -> list[Sample]:
        out: list[Sample] = []
        token = ""
        while True:
            page, token = self.list_samples(profile_id, 1000, token)
            out.extend(page)
            if not token:
                return out

    def count_samples(self, profile_id: str) -> int:
        return len(self.all_samples(profile_id))

    def create_cost_model(self, cm: CostModel) -> tuple[CostModel, bool]:
        r = call(
            self._stub.CreateCostModel,
            pb.CreateCostModelRequest(
                request_id=request_id_or_new(cm.request_id), cost_model=cv.cost_model_to_pb(cm)
            ),
            self.timeout,
        )
        return cv.cost_model_from_pb(r.cost_model), r.created

    def get_cost_model(self, id: str) -> CostModel:
        r = call(self._stub.GetCostModel, pb.GetCostModelRequest(id=id), self.timeout)
        return cv.cost_model_from_pb(r.cost_model)

    def list_cost_models(
        self,
        page_size: int = 0,
        page_token: str = "",
        profile_id: str = "",
        namespaces: Iterable[str] = (),
    ) -> tuple[list[CostModel], str]:
        """`namespaces`: only cost models in these (empty: every one the caller may read)."""
        r = call(
            self._stub.ListCostModels,
            pb.ListCostModelsRequest(
                page_size=page_size,
                page_token=page_token,
                profile_id=profile_id,
                namespaces=list(namespaces),
            ),
            self.timeout,
        )
        return [cv.cost_model_from_pb(c) for c in r.cost_models], r.next_page_token
