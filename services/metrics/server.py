"""Metrics server: `build_server(cfg) -> (server, port)`."""

from __future__ import annotations

from idealrt.clients.store import StoreClient
from idealrt.core.auth import Authenticator
from idealrt.core.config import MetricsConfig
from idealrt.core.grpc_server import GrpcServer, start_server
from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as pbg
from idealrt.services.metrics.engine import MetricsEngine
from idealrt.services.metrics.servicer import MetricsServicer
from idealrt.services.metrics.validate import RequestLimits

__all__ = ["SERVICE_NAME", "build_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MetricsService"].full_name


def build_server(cfg: MetricsConfig) -> tuple[GrpcServer, int]:
    if not cfg.store_target:
        raise ValueError("MetricsConfig.store_target is required")
    # mTLS between the suite's services: the client side of cfg.tls (ca_file,
    # client_cert_file/client_key_file); plaintext when it has none
    store = StoreClient(cfg.store_target, tls=cfg.tls, token=cfg.auth.service_token())
    servicer = MetricsServicer(MetricsEngine(store, limits=RequestLimits.from_config(cfg)))
    server = start_server(
        cfg.address,
        [lambda s: pbg.add_MetricsServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        metrics_port=cfg.metrics_port,
        tls=cfg.tls,
        allow_insecure=cfg.allow_insecure,
        auth=Authenticator(cfg.auth),
        max_message_bytes=cfg.max_message_bytes,
        model=cfg.server_model,
    )
    server.on_stop.append(store.close)
    return server, server.port
