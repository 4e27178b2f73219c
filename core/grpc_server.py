"""gRPC server bootstrap shared by every service: error mapping, logging, health, reflection.

`ErrorInterceptor` maps `IdealrtError` to `google.rpc.Status` carrying
`ErrorInfo(reason, domain="idealrt", metadata={"field": ...})`; any other exception becomes
INTERNAL "internal error" and is logged with its traceback. One `rpc_finished` line per RPC.
Given an enabled `Authenticator` (idealrt.core.auth), it also authenticates every RPC but
health and reflection from its `authorization: Bearer <token>` metadata before the handler
runs (UNAUTHENTICATED otherwise), and the handler runs as that principal
(`idealrt.core.auth.current_principal()`; a streaming handler for its whole iteration).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from idealrt.core.auth import Authenticator, Principal, acting_as, audit
from idealrt.core.errors import DOMAIN, IdealrtError
from idealrt.core.observability import rpc_metrics, serve_metrics
from idealrt.core.tls import ENV_VARS, INSECURE_VAR, TlsConfig, server_credentials

__all__ = [
    "SUPERVISOR_PIPE_VAR",
    "UNARY_WORKERS",
    "UNAUTHENTICATED_METHODS",
    "ErrorInterceptor",
    "GrpcServer",
    "abort_status",
    "is_loopback",
    "start_server",
    "stop_when_stdin_closes",
]

log = structlog.get_logger("idealrt.grpc")

Register = Callable[[grpc.Server], None]

# Workers a sync server keeps for unary calls and health. Each RPC holds a pool thread for
# its whole life, a server-streaming one too: a service with long-lived streams bounds them
# itself and passes max_workers = that bound + UNARY_WORKERS, so that streams at their limit
# still leave these workers to everything else.
UNARY_WORKERS = 16


# a message or field echoing a huge input must not push the status past gRPC's metadata
# limit (8 KiB by default: the client would see RESOURCE_EXHAUSTED instead of the error)
MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 256


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


def abort_status(err: IdealrtError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN)
    if err.field:
        info.metadata["field"] = _cap(err.field, MAX_FIELD_CHARS)
    detail = any_pb2.Any()
    detail.Pack(info)
    code_value: int = err.code.value[0]
    message = _cap(err.message, MAX_MESSAGE_CHARS)
    st = status_pb2.Status(code=code_value, message=message, details=[detail])
    return rpc_status.to_status(st)


def _internal_status() -> grpc.Status:
    st = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    return rpc_status.to_status(st)


# services whose RPCs need no token: Kubernetes' probes and grpcurl-style discovery
UNAUTHENTICATED_METHODS = (
    f"/{health.SERVICE_NAME}/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _bearer(context: grpc.ServicerContext) -> str | None:
    """The `authorization` metadata value; two of them are as malformed as a bad one."""
    values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
    if len(values) > 1:
        return "malformed: repeated"
    if not values:
        return None
    value = values[0]
    return value if isinstance(value, str) else "malformed: binary"


def _request_id(request: Any) -> str:
    rid = getattr(request, "request_id", "")
    return rid if isinstance(rid, str) else ""


# the RPCs that write (by name), each audited: who, what, where, how it ended
WRITE_PREFIXES = (
    "Create",
    "Update",
    "Append",
    "Cancel",
    "Fit",
    "Denoise",
    "Import",
    "Load",
    "Unload",
)
_OBJECT_FIELDS = ("profile", "cost_model", "model")
_ID_FIELDS = ("id", "profile_id", "cost_model_id", "model_id")


def is_write(method: str) -> bool:
    return method.rsplit("/", 1)[-1].startswith(WRITE_PREFIXES)


def _object_of(request: Any, response: Any) -> tuple[str, str]:
    """(object id, namespace) of a write: the stored object of the response when there
    is one, else the ids and namespace the request names."""
    for msg in (response, request):
        fields = getattr(getattr(msg, "DESCRIPTOR", None), "fields_by_name", {})
        for name in _OBJECT_FIELDS:
            if name in fields and msg.HasField(name):
                obj = getattr(msg, name)
                oid = getattr(obj, "id", "") or getattr(obj, "model_id", "")
                return str(oid), str(getattr(obj, "namespace", ""))
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    for name in _ID_FIELDS:
        if name in fields and getattr(request, name):
            return str(getattr(request, name)), ""
    return "", ""


# the subject of an audit line whose caller did not authenticate
NOBODY = Principal("(unauthenticated)", {}, kind="unauthenticated")


def _audit(
    method: str, principal: Principal | None, request: Any, response: Any, outcome: str
) -> None:
    object_id, namespace = _object_of(request, response)
    if principal is None:
        audit(method, namespace, object_id, outcome)
    else:
        with acting_as(principal):
            audit(method, namespace, object_id, outcome)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to rich statuses and logs one `rpc_finished` line per RPC; with
    an enabled `auth`, authenticates each RPC (UNAUTHENTICATED_METHODS excepted) before its
    handler runs and runs the handler as the caller's principal."""

    def __init__(self, auth: Authenticator | None = None) -> None:
        self._auth = auth if auth is not None and auth.enabled else None

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        auth = None if method.startswith(UNAUTHENTICATED_METHODS) else self._auth

        metrics = rpc_metrics()
        audited = is_write(method)

        def principal_of(context: grpc.ServicerContext) -> Principal | None:
            if auth is None:
                return None
            try:
                return auth.authenticate(_bearer(context))
            except IdealrtError as exc:
                # what was wrong (never the token) and from where
                log.warning("auth_failed", method=method, error=exc.message, peer=context.peer())
                raise

        def finish(start: float, code: str, request_id: str) -> None:
            seconds = time.perf_counter() - start
            metrics.observe(method, code, seconds)
            log.info(
                "rpc_finished",
                method=method,
                code=code,
                duration_ms=round(seconds * 1e3, 3),
                request_id=request_id,
            )

        def handle(
            exc: BaseException, context: grpc.ServicerContext, start: float, rid: str
        ) -> None:
            if isinstance(exc, IdealrtError):
                finish(start, exc.code.name, rid)
                context.abort_with_status(abort_status(exc))
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                # the client went away mid-stream (its request iterator raised): nothing
                # failed here, and there is nobody to answer
                finish(start, "CANCELLED", rid)
                return
            log.error("rpc_internal_error", method=method, exc_info=exc)
            finish(start, "INTERNAL", rid)
            context.abort_with_status(_internal_status())

        def is_abort(exc: BaseException) -> bool:
            # context.abort raises a plain Exception after setting the status
            return type(exc) is Exception and not exc.args

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            def inner(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                streamed = hasattr(request, "__next__")
                rid = _request_id(request) if not streamed else ""
                principal: Principal | None = None
                try:
                    principal = principal_of(context)
                    if principal is None:
                        resp = fn(request, context)
                    else:
                        with acting_as(principal):
                            resp = fn(request, context)
                except Exception as exc:
                    if is_abort(exc):
                        raise
                    if audited:
                        code = exc.code.name if isinstance(exc, IdealrtError) else "INTERNAL"
                        who = principal if principal is not None or auth is None else NOBODY
                        _audit(method, who, None if streamed else request, None, code)
                    handle(exc, context, start, rid)
                    raise
                finish(start, "OK", rid)
                if audited:
                    _audit(method, principal, None if streamed else request, resp, "OK")
                return resp

            return inner

        def wrap_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def inner(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                rid = _request_id(request)
                try:
                    principal = principal_of(context)
                    if principal is None:
                        yield from fn(request, context)
                    else:
                        yield from _iterate_as(principal, fn(request, context))
                except Exception as exc:
                    if is_abort(exc):
                        raise
                    handle(exc, context, start, rid)
                    raise
                finish(start, "OK", rid)

            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _iterate_as(principal: Principal, it: Iterator[Any]) -> Iterator[Any]:
    """A handler's response stream with each step run as `principal` (grpc may resume a
    stream from a different thread, so the contextvar is set per step, not once)."""
    try:
        while True:
            with acting_as(principal):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            with acting_as(principal):
                close()


class GrpcServer:
    """A started gRPC server with health and reflection; `stop()` drains gracefully. This
    class drives grpc's sync server; `idealrt.core._grpc_aio.AioGrpcServer` the grpc.aio
    one, through the four transport methods at the end (`_set_health`,
    `_enter_graceful_shutdown`, `_stop_servers`, `wait`)."""

    def __init__(
        self,
        server: Any,
        port: int,
        health_servicer: Any,
        service_names: Sequence[str],
        health_server: Any = None,
    ) -> None:
        self.server = server
        # the plaintext health-only listener (TlsConfig.health_port), if any
        self.health_server = health_server
        self.port = port
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.model = "sync"
        # run when the drain begins (NOT_SERVING already, RPCs still answered): a service
        # stops its own long work there, so that it neither goes on through the grace
        # period nor holds streams open until it ends
        self.on_drain: list[Callable[[], None]] = []
        self.on_stop: list[Callable[[], None]] = []  # run after the server has drained
        self._stopped = False
        self._stop_lock = threading.Lock()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop gracefully: health says NOT_SERVING for every service (for good: a later
        `set` is ignored), new RPCs are refused, in-flight ones get `grace_s` to finish
        (those still running then are cancelled: UNAVAILABLE to their clients, which
        retry or reconnect), and then the `on_stop` hooks run in order (a service closes
        its clients there). The `on_drain` hooks run first, once health says NOT_SERVING
        and before the grace period (the profiler checkpoints its running profiles there,
        which also ends their watch streams). A second call returns at once."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        for name in (*self.service_names, ""):
            self._set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._enter_graceful_shutdown()
        log.info("server_draining", port=self.port, grace_s=grace_s)
        for fn in self.on_drain:
            fn()
        self._stop_servers(grace_s)
        for fn in self.on_stop:
            fn()
        log.info("server_stopped", port=self.port)

    # ---- the transport (overridden by the grpc.aio server)

    def _set_health(self, name: str, status: int) -> None:
        self.health.set(name, status)

    def _enter_graceful_shutdown(self) -> None:
        self.health.enter_graceful_shutdown()

    def _stop_servers(self, grace_s: float) -> None:
        self.server.stop(grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def install_sigterm(
        self, grace_s: float = 5.0, on_stop: Callable[[], None] | None = None
    ) -> None:
        """Graceful shutdown (`stop(grace_s)`) on SIGTERM/SIGINT (main thread only).

        The stop runs on a thread of its own (a signal handler must return at once), and
        that thread is not a daemon: `wait()` returns as soon as the server has drained,
        and the interpreter's exit then waits for the `on_stop` hooks (a profiler's
        checkpoint, a store's close) instead of cutting them off."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: Any) -> None:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            threading.Thread(
                target=self._shutdown, args=(grace_s, on_stop), name="grpc-shutdown"
            ).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _shutdown(self, grace_s: float, on_stop: Callable[[], None] | None) -> None:
        try:
            if on_stop is not None:
                on_stop()
            self.stop(grace_s)
        except Exception:  # the shutdown thread's top: log it, the server still stops
            log.exception("shutdown_failed", port=self.port)
            self._stop_servers(0)


def is_loopback(address: str) -> bool:
    """Whether a listen address ("host:port", "[::1]:port", "unix:...") is reachable from
    this machine only: 127.0.0.0/8, ::1, localhost, or a unix socket."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" (every interface), 0.0.0.0-like names, other host names
        return False


def start_server(
    address: str,
    register: Sequence[Register],
    service_names: Sequence[str],
    *,
    max_workers: int = UNARY_WORKERS,
    metrics_port: int = 0,
    tls: TlsConfig | None = None,
    allow_insecure: bool = False,
    auth: Authenticator | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    model: str = "sync",
    inline: Collection[str] = (),
) -> GrpcServer:
    """Build and start a server on `address` ("127.0.0.1:0" picks a free port) with a pool
    of `max_workers` threads (see UNARY_WORKERS); Prometheus metrics on `metrics_port`
    when > 0.

    `model` "sync": grpc's thread-pool server, every RPC on a pool thread for its whole
    life. "aio": grpc.aio on an event loop thread (idealrt.core._grpc_aio): `async def`
    handlers run on the loop and cost no thread (the profiler's WatchProfile), plain ones
    on the pool, and the plain ones named in `inline` (full method names, handlers that
    neither block nor run long) on the loop too.

    With `tls.cert_file` the port is TLS (mTLS when `tls.client_ca_file` is set; the files
    are reloaded when they change, see idealrt.core.tls); without, plaintext, which is
    refused on a non-loopback address unless `allow_insecure` (IDEALRT_INSECURE=1, read by
    the service's config). `tls.health_port` > 0 adds a plaintext listener on the same
    host that serves only grpc.health.v1, for Kubernetes' probes (they cannot speak TLS).

    `auth` (enabled: a tokens file or a JWKS configured) authenticates every RPC but health
    and reflection; None or not enabled: every caller is ANONYMOUS_ADMIN."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    tls = tls or TlsConfig()
    if not tls.server_tls and not allow_insecure and not is_loopback(address):
        raise ValueError(
            f"refusing to listen on {address} without TLS: it is not a loopback address. "
            f"Set {ENV_VARS['cert_file']} and {ENV_VARS['key_file']} (and "
            f"{ENV_VARS['client_ca_file']} for mTLS), or {INSECURE_VAR}=1 to allow "
            "plaintext on purpose"
        )
    if model not in ("sync", "aio"):
        raise ValueError(f"server model must be sync or aio, got {model!r}")
    # credentials first: a missing or broken certificate fails before anything is bound
    credentials = server_credentials(tls) if tls.server_tls else None
    serve_metrics(metrics_port)
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if model == "aio":
        from idealrt.core._grpc_aio import start_aio_server

        return start_aio_server(
            address,
            register,
            service_names,
            max_workers=max_workers,
            tls=tls,
            credentials=credentials,
            auth=auth,
            options=options,
            inline=frozenset(inline),
        )
    if inline:
        raise ValueError("inline handlers need the aio server model")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorInterceptor(auth)],
        options=options,
    )
    for reg in register:
        reg(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    health_server = None
    if tls.health_port:
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        listen = health_address(address, tls.health_port)
        try:
            if health_server.add_insecure_port(listen) == 0:
                raise RuntimeError(f"could not bind {listen}")
        except RuntimeError as exc:
            server.stop(0)
            raise RuntimeError(f"could not bind the health port {listen}: {exc}") from None
    server.start()
    if health_server is not None:
        health_server.start()
    for name in (*service_names, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_started(address, port, service_names, tls, auth, "sync")
    return GrpcServer(server, port, health_servicer, service_names, health_server)


def log_started(
    address: str,
    port: int,
    service_names: Sequence[str],
    tls: TlsConfig,
    auth: Authenticator | None,
    model: str,
) -> None:
    log.info(
        "server_started",
        address=address,
        port=port,
        services=list(service_names),
        model=model,
        tls=tls.server_tls,
        mtls=tls.mtls,
        health_port=tls.health_port,
        auth=auth is not None and auth.enabled,
    )


def health_address(address: str, port: int) -> str:
    host = address.rpartition(":")[0] if ":" in address else ""
    return f"{host or '0.0.0.0'}:{port}"


# "1": the service's stdin is a pipe its supervisor holds open (the embedded suite's serving
# child, services/_service_process.py); end of file on it means the supervisor is gone
SUPERVISOR_PIPE_VAR = "IDEALRT_SUPERVISOR_PIPE"


def stop_when_stdin_closes() -> threading.Thread:
    """Send this process SIGTERM (the graceful stop of `install_sigterm`) once its stdin
    reaches end of file: the supervisor holding the pipe's other end closed it or exited,
    however it exited (the kernel closes a SIGKILLed process's pipes too), so the service
    never outlives it. The watching thread blocks in read(2): it costs nothing meanwhile."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass  # the supervisor writes nothing; anything it did write is ignored
        except OSError:
            pass  # stdin unreadable: treated as gone
        log.info("supervisor_gone")
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread


def serve_until_sigterm(service: str, server: GrpcServer, port: int) -> int:
    """Run a started service in the foreground until SIGTERM/SIGINT; the exit status. The
    handler is installed before the port line is printed: a supervisor that stops the
    service as soon as it says it listens gets a graceful stop, not the default SIGTERM.
    With SUPERVISOR_PIPE_VAR=1 in the environment, end of file on stdin stops it the same
    way (`stop_when_stdin_closes`)."""
    server.install_sigterm()
    if os.environ.get(SUPERVISOR_PIPE_VAR) == "1":
        stop_when_stdin_closes()
    print(f"{service} listening on port {port}", flush=True)
    server.wait()
    return 0
