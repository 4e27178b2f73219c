"""Store server: `build_server(cfg) -> (server, port)`."""

from __future__ import annotations

from idealrt.core.auth import Authenticator
from idealrt.core.config import StoreConfig
from idealrt.core.grpc_server import GrpcServer, start_server
from idealrt.services.store.repository import PageLimits, PoolLimits, Store, open_store
from idealrt.services.store.servicer import StoreServicer
from idealrt.store.v1 import store_service_pb2 as pb
from idealrt.store.v1 import store_service_pb2_grpc as pbg

__all__ = ["SERVICE_NAME", "build_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StoreService"].full_name


def build_server(cfg: StoreConfig, store: Store | None = None) -> tuple[GrpcServer, int]:
    """Start the store on cfg.address. The caller owns `store` if it passes one."""
    limits = PageLimits(objects=cfg.max_page_size, samples=cfg.max_sample_page_size)
    pool = PoolLimits(
        size=cfg.pool_size, max_overflow=cfg.max_overflow, timeout_s=cfg.pool_timeout_s
    )
    st = store if store is not None else open_store(cfg.resolved_url, page_limits=limits, pool=pool)
    servicer = StoreServicer(st)
    server = start_server(
        cfg.address,
        [lambda s: pbg.add_StoreServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        metrics_port=cfg.metrics_port,
        tls=cfg.tls,
        allow_insecure=cfg.allow_insecure,
        auth=Authenticator(cfg.auth),
        max_message_bytes=cfg.max_message_bytes,
        model=cfg.server_model,
    )
    if store is None:
        server.on_stop.append(st.close)
    return server, server.port
