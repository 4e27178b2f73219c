"""Run one service in the foreground: `idealrt serve NAME` (each service's own
`python -m idealrt.services.NAME` does the same for itself)."""

from __future__ import annotations

from idealrt.core.config import DEFAULT_PORTS, standalone_env
from idealrt.core.grpc_server import GrpcServer, serve_until_sigterm

__all__ = ["DEFAULT_PORTS", "serve_service"]


def serve_service(service: str, **flags: str) -> int:
    """Run one service in the foreground until SIGTERM. `flags`: address, store_target,
    serving_target, store_url, data_dir (`standalone_env`); empty ones are not set.
    Transport security comes from the environment, as in a deployment: IDEALRT_TLS_*
    (idealrt.core.tls) and IDEALRT_INSECURE=1 (plaintext on a non-loopback address)."""
    from idealrt.core import config as c

    env = standalone_env(service, flags)
    server: GrpcServer
    if service == "store":
        from idealrt.services.store.server import build_server as b_store

        server, port = b_store(c.StoreConfig.from_env(env))
    elif service == "serving":
        from idealrt.services.serving.server import build_server as b_serving

        server, port = b_serving(c.ServingConfig.from_env(env))
    elif service == "profiler":
        from idealrt.services.profiler.server import build_server as b_profiler

        server, port = b_profiler(c.ProfilerConfig.from_env(env))
    elif service == "metrics":
        from idealrt.services.metrics.server import build_server as b_metrics

        server, port = b_metrics(c.MetricsConfig.from_env(env))
    else:
        raise SystemExit(f"unknown service {service!r}")
    return serve_until_sigterm(service, server, port)
