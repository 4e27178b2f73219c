"""Serving server: `build_server(cfg) -> (server, port)`."""

from __future__ import annotations

from idealrt.core.auth import Authenticator
from idealrt.core.config import ServingConfig
from idealrt.core.grpc_server import UNARY_WORKERS, GrpcServer, start_server
from idealrt.services.serving.registry import ModelRegistry
from idealrt.services.serving.servicer import ServingServicer
from idealrt.services.serving.validate import ServingLimits
from idealrt.serving.v1 import serving_service_pb2 as pb
from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

__all__ = ["SERVICE_NAME", "build_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ServingService"].full_name


def build_server(cfg: ServingConfig) -> tuple[GrpcServer, int]:
    # the limits are read once, here: cpus is the affinity the server started with
    limits = ServingLimits.from_config(cfg)
    registry = ModelRegistry(limits=limits)
    servicer = ServingServicer(registry)
    # Workers: every Generate that may wait for a model's device (its queue, device_queue,
    # bounded by max_queued_generations, with reasons) plus the running one, and
    # UNARY_WORKERS for health, ListModels and loads. A smaller pool would queue calls in
    # grpc's executor instead, unbounded, unordered and in front of health. Waiting calls
    # sleep without polling, so the extra threads cost the measurement nothing. The sync
    # model by default (IDEALRT_SERVER_MODEL): on grpc.aio, Generate would still hold a pool
    # thread for its whole measurement (a blocking handler), plus a hop to reach it.
    server = start_server(
        cfg.address,
        [lambda s: pbg.add_ServingServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        metrics_port=cfg.metrics_port,
        tls=cfg.tls,
        allow_insecure=cfg.allow_insecure,
        auth=Authenticator(cfg.auth),
        max_message_bytes=cfg.max_message_bytes,
        model=cfg.server_model,
        max_workers=limits.max_queued_generations + 1 + UNARY_WORKERS,
    )
    server.on_stop.append(registry.close)
    return server, server.port
