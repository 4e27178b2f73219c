"""Serving server: `build_server(cfg) -> (server, port)`."""

from __future__ import annotations

from idealrt.core.auth import Authenticator
from idealrt.core.config import ServingConfig
from idealrt.core.grpc_server import GrpcServer, start_server
from idealrt.services.serving.registry import ModelRegistry
from idealrt.services.serving.servicer import ServingServicer
from idealrt.services.serving.validate import ServingLimits
from idealrt.serving.v1 import serving_service_pb2 as pb
from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

__all__ = ["SERVICE_NAME", "build_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ServingService"].full_name


def build_server(cfg: ServingConfig) -> tuple[GrpcServer, int]:
    # the limits are read once, here: cpus is the affinity the server started with
    registry = ModelRegistry(limits=ServingLimits.from_config(cfg))
    servicer = ServingServicer(registry)
    # Few workers: generations are serialized per model anyway, and extra threads would only
    # compete with the measurement for cores.
    server = start_server(
        cfg.address,
        [lambda s: pbg.add_ServingServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        metrics_port=cfg.metrics_port,
        tls=cfg.tls,
        allow_insecure=cfg.allow_insecure,
        auth=Authenticator(cfg.auth),
        max_message_bytes=cfg.max_message_bytes,
        max_workers=4,
    )
    server.on_stop.append(registry.close)
    return server, server.port
