"""Run one service in the foreground: `idealrt serve NAME` and `python -m idealrt.services.NAME`."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_PORTS", "serve_service"]

DEFAULT_PORTS = {"store": 50051, "serving": 50052, "profiler": 50053, "metrics": 50054}


def serve_service(
    service: str,
    address: str = "",
    store_target: str = "",
    serving_target: str = "",
    store_url: str = "",
    data_dir: str = "",
) -> int:
    """Run one service in the foreground until SIGTERM (used by `idealrt serve` and by each
    service's `python -m idealrt.services.<name>`)."""
    from idealrt.core import config as c

    env = dict(os.environ)
    # standalone default: all interfaces on the service's well-known port (k8s manifests)
    env.setdefault(f"IDEALRT_{service.upper()}_ADDRESS", f"0.0.0.0:{DEFAULT_PORTS[service]}")
    if address:
        env[f"IDEALRT_{service.upper()}_ADDRESS"] = address
    if store_target:
        env["IDEALRT_STORE_TARGET"] = store_target
    if serving_target:
        env["IDEALRT_SERVING_TARGET"] = serving_target
    if store_url:
        env["IDEALRT_STORE_URL"] = store_url
    if data_dir:
        env["IDEALRT_DATA_DIR"] = data_dir
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
    print(f"{service} listening on port {port}", flush=True)
    server.install_sigterm()
    server.wait()
    return 0
