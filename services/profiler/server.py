"""Profiler server: `build_server(cfg) -> (server, port)`."""

from __future__ import annotations

from idealrt.clients.serving import ServingClient
from idealrt.clients.store import StoreClient
from idealrt.core.config import ProfilerConfig
from idealrt.core.domain import Profile
from idealrt.core.errors import InvalidArgument
from idealrt.core.grpc_server import GrpcServer, start_server
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.reasons import SERVING_TARGET_REQUIRED
from idealrt.services.profiler.servicer import ProfilerServicer
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["SERVICE_NAME", "build_server", "make_target_factory"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProfilerService"].full_name


def make_target_factory(cfg: ProfilerConfig):  # type: ignore[no-untyped-def]
    def factory(profile: Profile) -> GenerationTarget:
        from idealrt.core.domain import TargetKind

        if profile.target.kind == TargetKind.HTTP:
            from idealrt.services.profiler.http_target import HttpTarget

            return HttpTarget.from_profile(profile)
        address = profile.target.address or cfg.serving_target
        if not address:
            raise InvalidArgument(
                SERVING_TARGET_REQUIRED,
                "profile.target.address is empty and the profiler has no default serving endpoint",
                field="profile.target.address",
            )
        from idealrt.services.profiler.serving_target import ServingTarget

        return ServingTarget(ServingClient(address), profile, owns_serving=True)

    return factory


def build_server(cfg: ProfilerConfig) -> tuple[GrpcServer, int]:
    if not cfg.store_target:
        raise ValueError("ProfilerConfig.store_target is required")
    store = StoreClient(cfg.store_target)
    manager = ProfileManager(store, make_target_factory(cfg), cfg.lease_dir)
    servicer = ProfilerServicer(manager)
    server = start_server(
        cfg.address,
        [lambda s: pbg.add_ProfilerServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        metrics_port=cfg.metrics_port,
    )
    server.on_stop.append(manager.shutdown)
    server.on_stop.append(store.close)
    if cfg.resume:
        manager.resume_unfinished()
    return server, server.port
