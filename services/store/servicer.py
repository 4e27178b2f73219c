"""StoreService: converts, calls the domain `Store`, converts back.

Namespaces and authorization (issue 13): the caller is `current_principal()`
(idealrt.core.auth; put there by the server's interceptor). Reads see only the namespaces
where it holds the reader role, narrowed by the request's `namespaces` filter (`_visible`):
anything else is NOT_FOUND as if it did not exist, and lists and counts leave it out. A
write needs the writer role in the object's namespace: for a create, the namespace in the
request; for an update or an append, the stored one (`_write_scope`), which the request
cannot change. A namespace the caller can see but not write is PERMISSION_DENIED
(NAMESPACE_FORBIDDEN).

UpdateProfile and AppendSamples are the profiler's write path: only an operator (an admin
of every namespace: the suite's services with their service tokens) may call them
(core.namespaces.require_operator), so no team can forge samples into a profile, or move
its state, behind the profiler's back; and of the operators only the one that runs a
profile (whose subject claimed it by writing RUNNING; released by its QUEUED checkpoint)
may write it (PERMISSION_DENIED PROFILE_RUN_ELSEWHERE otherwise). With authentication off
every caller is the same anonymous operator.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from idealrt.core import convert as cv
from idealrt.core.auth import Role, current_principal
from idealrt.core.errors import InvalidArgument
from idealrt.core.namespaces import check_namespace_filter, intersect, require_operator
from idealrt.services.store._read_cache import ReadCache
from idealrt.services.store.reasons import TOO_MANY_STATES
from idealrt.services.store.repository import Store
from idealrt.store.v1 import store_service_pb2 as pb
from idealrt.store.v1 import store_service_pb2_grpc as pbg

__all__ = ["StoreServicer"]


def _visible(request_namespaces: Iterable[str] = ()) -> frozenset[str] | None:
    """The namespaces this RPC may read: the request's filter (empty: every namespace),
    intersected with those where the caller holds at least the reader role. None: every
    namespace; an empty set: none."""
    requested = check_namespace_filter(request_namespaces, "namespaces")
    return intersect(requested, current_principal().namespaces(Role.READER))


def _require_writer(namespace: str) -> None:
    current_principal().require(namespace, Role.WRITER)


class StoreServicer(pbg.StoreServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store
        # the stored profiles' messages, converted once per version (see ProfileMessages)
        self._profile_pb = cv.ProfileMessages()
        # GetProfile/ListProfiles answers while the database is unchanged (see _read_cache)
        self._gets: ReadCache[pb.GetProfileResponse] = ReadCache()
        self._lists: ReadCache[pb.ListProfilesResponse] = ReadCache()

    def _write_scope(self, profile_id: str, field: str) -> frozenset[str] | None:
        """The visibility set for a write to a stored profile: None when the caller may
        write everywhere; else the profile's own namespace, once the caller is known to see
        it (else NOT_FOUND, as for a missing id) and to hold the writer role there (else
        PERMISSION_DENIED)."""
        if current_principal().namespaces(Role.WRITER) is None:
            return None
        stored = self.store.get_profile(profile_id, _visible(), field=field)
        _require_writer(stored.namespace)
        return frozenset({stored.namespace})

    def CreateProfile(
        self, request: pb.CreateProfileRequest, context: grpc.ServicerContext
    ) -> pb.CreateProfileResponse:
        prof = cv.profile_from_pb(request.profile)
        if request.request_id:
            prof.request_id = request.request_id
        _require_writer(prof.namespace)
        stored, created = self.store.create_profile(prof)
        return pb.CreateProfileResponse(profile=self._profile_pb(stored), created=created)

    def GetProfile(
        self, request: pb.GetProfileRequest, context: grpc.ServicerContext
    ) -> pb.GetProfileResponse:
        visible = _visible()
        generation = self.store.read_generation()  # before the read (see _read_cache)
        key = (request.id, visible)
        hit = None if generation is None else self._gets.get(key, generation)
        if hit is not None:
            return hit
        profile = self.store.get_profile(request.id, visible)
        answer = pb.GetProfileResponse(profile=self._profile_pb(profile))
        if generation is not None:
            self._gets.put(key, generation, answer)
        return answer

    def UpdateProfile(
        self, request: pb.UpdateProfileRequest, context: grpc.ServicerContext
    ) -> pb.UpdateProfileResponse:
        require_operator()
        prof = cv.profile_from_pb(request.profile)
        updated = self.store.update_profile(
            prof, self._write_scope(prof.id, "id"), writer=current_principal().subject
        )
        return pb.UpdateProfileResponse(profile=self._profile_pb(updated))

    def ListProfiles(
        self, request: pb.ListProfilesRequest, context: grpc.ServicerContext
    ) -> pb.ListProfilesResponse:
        if len(request.states) > 1:
            raise InvalidArgument(TOO_MANY_STATES, "states: give at most one state", field="states")
        state = cv.profile_state_from_pb(request.states[0], "states") if request.states else None
        visible = _visible(request.namespaces)
        generation = self.store.read_generation()  # before the read (see _read_cache)
        key = (request.page_size, request.page_token, state, visible)
        hit = None if generation is None else self._lists.get(key, generation)
        if hit is not None:
            return hit
        items, token = self.store.list_profiles(
            request.page_size, request.page_token, state, visible
        )
        answer = pb.ListProfilesResponse(
            profiles=[self._profile_pb(p) for p in items], next_page_token=token
        )
        if generation is not None:
            self._lists.put(key, generation, answer)
        return answer

    def AppendSamples(
        self, request: pb.AppendSamplesRequest, context: grpc.ServicerContext
    ) -> pb.AppendSamplesResponse:
        require_operator()
        samples = cv.sample_batch_from_pb(request.samples, "samples")
        scope = self._write_scope(request.profile_id, "profile_id")
        done = self.store.append_batch(
            request.profile_id,
            request.batch_id,
            samples,
            scope,
            writer=current_principal().subject,
        )
        return pb.AppendSamplesResponse(appended=done.appended, total_samples=done.total_samples)

    def ListSamples(
        self, request: pb.ListSamplesRequest, context: grpc.ServicerContext
    ) -> pb.ListSamplesResponse:
        items, token = self.store.list_samples(
            request.profile_id, request.page_size, request.page_token, _visible()
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
        _require_writer(cm.namespace)
        # its profile must be one the caller can see (else NOT_FOUND) and in its namespace
        stored, created = self.store.create_cost_model(cm, _visible())
        return pb.CreateCostModelResponse(cost_model=cv.cost_model_to_pb(stored), created=created)

    def GetCostModel(
        self, request: pb.GetCostModelRequest, context: grpc.ServicerContext
    ) -> pb.GetCostModelResponse:
        cm = self.store.get_cost_model(request.id, _visible())
        return pb.GetCostModelResponse(cost_model=cv.cost_model_to_pb(cm))

    def ListCostModels(
        self, request: pb.ListCostModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListCostModelsResponse:
        items, token = self.store.list_cost_models(
            request.page_size, request.page_token, request.profile_id, _visible(request.namespaces)
        )
        return pb.ListCostModelsResponse(
            cost_models=[cv.cost_model_to_pb(c) for c in items], next_page_token=token
        )
