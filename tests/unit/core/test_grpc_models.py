"""The two server models of idealrt.core.grpc_server (grpc's sync server and grpc.aio, see
idealrt.core._grpc_aio) keep one contract, over real servers on 127.0.0.1:0: domain errors
as rich statuses (code, ErrorInfo reason and field), anything else INTERNAL "internal
error", handler aborts, client and server streams, authentication and the caller's
principal in the handler, health, the drain order of a graceful stop. The aio model adds
async handlers and `inline` ones, and an open async stream holds no thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from idealrt.core.auth import AuthConfig, Authenticator, current_principal, token_sha256
from idealrt.core.errors import InvalidArgument
from idealrt.core.grpc_server import GrpcServer, start_server

pytestmark = pytest.mark.timeout(120)

TOKEN = "model-test-token-0123456789abcdef"
T = 10.0  # deadline of every call, seconds
SERVICE = "test.Models"


def _unary_ok(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"ok:" + request + b":" + current_principal().subject.encode()


def _unary_invalid(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise InvalidArgument("QUERIES_INVALID", "queries: bad", field="queries")


def _unary_bug(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise RuntimeError("a bug")


def _unary_abort(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "aborted by the handler")
    raise AssertionError("abort returned")


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"".join(requests)


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(3):
        yield f"{current_principal().subject}:{i}".encode()
    raise InvalidArgument("TOO_FAR", "the fourth item", field="n")


async def _async_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(0)
    return b"async:" + current_principal().subject.encode()


async def _async_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.Event().wait()  # until the client goes away
    yield b"never"


def _on_loop(request: bytes, context: grpc.ServicerContext) -> bytes:
    return threading.current_thread().name.encode()


def _handlers(model: str) -> grpc.GenericRpcHandler:
    methods = {
        "Ok": grpc.unary_unary_rpc_method_handler(_unary_ok),
        "Invalid": grpc.unary_unary_rpc_method_handler(_unary_invalid),
        "Bug": grpc.unary_unary_rpc_method_handler(_unary_bug),
        "Abort": grpc.unary_unary_rpc_method_handler(_unary_abort),
        "Join": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Count": grpc.unary_stream_rpc_method_handler(_server_stream),
        "Pooled": grpc.unary_unary_rpc_method_handler(_on_loop),
    }
    if model == "aio":
        methods |= {
            "AsyncOk": grpc.unary_unary_rpc_method_handler(_async_unary),
            "AsyncStream": grpc.unary_stream_rpc_method_handler(_async_stream),
            "Inline": grpc.unary_unary_rpc_method_handler(_on_loop),
        }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


@pytest.fixture(params=["sync", "aio"])
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nsha256 = "{token_sha256(TOKEN)}"\nsubject = "carol"\n'
        'roles = { "*" = "reader" }\n'
    )
    return Authenticator(AuthConfig(tokens_file=tokens))


def _start(model: str, auth: Authenticator | None = None) -> GrpcServer:
    handler = _handlers(model)
    return start_server(
        "127.0.0.1:0",
        [lambda s: s.add_generic_rpc_handlers((handler,))],
        [SERVICE],
        model=model,
        auth=auth,
        max_workers=4,
        inline=[f"/{SERVICE}/Inline"] if model == "aio" else (),
    )


def _md() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKEN}"),)


def _info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def test_the_contract_holds_on_both_models(model: str) -> None:
    server = _start(model)
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        assert ch.unary_unary(f"/{SERVICE}/Ok")(b"x", timeout=T) == b"ok:x:anonymous"
        with pytest.raises(grpc.RpcError) as bad:
            ch.unary_unary(f"/{SERVICE}/Invalid")(b"", timeout=T)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = _info(bad.value)
        assert info is not None and info.reason == "QUERIES_INVALID"
        assert info.domain == "idealrt" and info.metadata["field"] == "queries"
        with pytest.raises(grpc.RpcError) as bug:
            ch.unary_unary(f"/{SERVICE}/Bug")(b"", timeout=T)
        assert bug.value.code() == grpc.StatusCode.INTERNAL
        assert bug.value.details() == "internal error"
        with pytest.raises(grpc.RpcError) as aborted:
            ch.unary_unary(f"/{SERVICE}/Abort")(b"", timeout=T)
        assert aborted.value.code() == grpc.StatusCode.NOT_FOUND
        assert ch.stream_unary(f"/{SERVICE}/Join")(iter([b"a", b"b", b"c"]), timeout=T) == b"abc"
        got: list[bytes] = []
        with pytest.raises(grpc.RpcError) as far:
            for item in ch.unary_stream(f"/{SERVICE}/Count")(b"", timeout=T):
                got.append(item)
        assert got == [b"anonymous:0", b"anonymous:1", b"anonymous:2"]
        assert far.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = _info(far.value)
        assert info is not None and info.reason == "TOO_FAR"
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        ch.close()
        server.stop(0)


def test_callers_authenticate_and_handlers_run_as_them(model: str, auth: Authenticator) -> None:
    server = _start(model, auth)
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        with pytest.raises(grpc.RpcError) as anon:
            ch.unary_unary(f"/{SERVICE}/Ok")(b"x", timeout=T)
        assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = ch.unary_unary(f"/{SERVICE}/Ok")(b"x", timeout=T, metadata=_md())
        assert ok == b"ok:x:carol"
        stream = ch.unary_stream(f"/{SERVICE}/Count")(b"", timeout=T, metadata=_md())
        assert next(stream) == b"carol:0"
        stream.cancel()
        # health needs no token (Kubernetes' probes)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T)
        if model == "aio":
            assert ch.unary_unary(f"/{SERVICE}/AsyncOk")(b"", timeout=T, metadata=_md()) == (
                b"async:carol"
            )
    finally:
        ch.close()
        server.stop(0)


def test_aio_runs_inline_handlers_on_the_loop_and_plain_ones_on_the_pool() -> None:
    server = _start("aio")
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        assert ch.unary_unary(f"/{SERVICE}/Inline")(b"", timeout=T).startswith(b"grpc-aio-127")
        assert ch.unary_unary(f"/{SERVICE}/Pooled")(b"", timeout=T).startswith(b"grpc-aio_")
    finally:
        ch.close()
        server.stop(0)


def test_open_async_streams_hold_no_thread() -> None:
    """200 open streams of an async handler: the server's threads do not grow with them
    (a sync server would hold one pool thread per stream)."""
    server = _start("aio")
    channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(4)]
    streams = []
    try:
        before = threading.active_count()
        for i in range(200):
            s = channels[i % 4].unary_stream(f"/{SERVICE}/AsyncStream")(b"", timeout=60)
            assert next(s) == b"first"
            streams.append(s)
        # the client's own channels add a few threads; 200 streams would add 200
        assert threading.active_count() - before < 20
        assert _health(server.port) == "SERVING"
    finally:
        for s in streams:
            s.cancel()
        for ch in channels:
            ch.close()
        server.stop(0)


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


def test_aio_stop_drains_in_order_and_ends_open_streams() -> None:
    server = _start("aio")
    order: list[tuple[str, str]] = []
    server.on_drain.append(lambda: order.append(("drain", _health(server.port))))
    server.on_stop.append(lambda: order.append(("stop", _health(server.port))))
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stream = ch.unary_stream(f"/{SERVICE}/AsyncStream")(b"", timeout=60)
    assert next(stream) == b"first"
    server.stop(grace_s=0.5)
    assert order == [("drain", "NOT_SERVING"), ("stop", "UNAVAILABLE")]
    with pytest.raises(grpc.RpcError) as ended:
        next(stream)
    assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    ch.close()
    server.stop()  # a second call returns at once
    assert len(order) == 2


def test_unknown_server_model_is_refused() -> None:
    with pytest.raises(ValueError, match="sync or aio"):
        start_server("127.0.0.1:0", [], [SERVICE], model="fibers")
    with pytest.raises(ValueError, match="aio"):
        start_server("127.0.0.1:0", [], [SERVICE], inline=["/x/Y"])
