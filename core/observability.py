"""Prometheus metrics of the gRPC layer, served on a separate port (`IDEALRT_METRICS_PORT`)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Histogram, start_http_server

__all__ = ["RpcMetrics", "rpc_metrics", "serve_metrics"]


class RpcMetrics:
    def __init__(self) -> None:
        self.requests = Counter("idealrt_rpc_requests", "RPCs handled", ["method", "code"])
        self.duration = Histogram(
            "idealrt_rpc_duration_seconds",
            "RPC handling time",
            ["method"],
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0, 600.0),
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.duration.labels(method=method).observe(seconds)


@functools.cache
def rpc_metrics() -> RpcMetrics:
    """The process's collectors (Prometheus registers each name once per process)."""
    return RpcMetrics()


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Expose /metrics on `port` (0: disabled)."""
    if port > 0:
        start_http_server(port, addr=host)
