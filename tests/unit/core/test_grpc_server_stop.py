"""GrpcServer.stop over a real server on 127.0.0.1: the order of a graceful stop.

`on_drain` hooks run once health says NOT_SERVING and while the server still answers
(before the grace period: the profiler checkpoints its profiles there, so that they are
not measured on through the grace period); `on_stop` hooks run after the server stopped.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from idealrt.core.grpc_server import start_server


def _health(port: int) -> str:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def test_drain_hooks_run_before_the_grace_period_and_stop_hooks_after() -> None:
    server = start_server("127.0.0.1:0", [], ["idealrt.test.v1.Nothing"])
    order: list[tuple[str, str]] = []
    server.on_drain.append(lambda: order.append(("drain", _health(server.port))))
    server.on_stop.append(lambda: order.append(("stop", _health(server.port))))
    assert _health(server.port) == "SERVING"
    server.stop(grace_s=5.0)
    assert order == [("drain", "NOT_SERVING"), ("stop", "UNAVAILABLE")]
    server.stop()  # a second call returns at once, hooks not run again
    assert len(order) == 2
