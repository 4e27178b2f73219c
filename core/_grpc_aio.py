"""The grpc.aio server model: the same contract as the sync server of
`idealrt.core.grpc_server` (error mapping to rich statuses, one `rpc_finished` line per
RPC, authentication, the audit of writes, health, reflection, graceful stop) with grpc's
asyncio server on an event loop thread of its own.

Why a loop thread rather than an asyncio service: every service's domain is threaded and
blocking (the store's SQLAlchemy, the profiler's workers, the clients of other services),
and the process may hold several servers (the embedded suite). So the loop only carries
gRPC, and handlers run where they belong:
- `async def` handlers and async generators run on the loop and hold no thread while they
  wait: the profiler's WatchProfile, whose open streams cost a coroutine each, and grpc's
  own asyncio health servicer.
- plain handlers run on a bounded pool (`max_workers`), each call in a fresh copy of the
  contextvars context (as grpc's sync server gives each RPC a fresh context), with a
  context adapter (`_ThreadContext`) offering the sync ServicerContext calls the services
  make; a client stream reaches them as a blocking iterator (`_BlockingIterator`).
- plain handlers named in `inline` (full method names: handlers that neither block nor
  run long, such as an estimate on a cached cost model) run on the loop: no thread hop.

One module because it is one idea: the asyncio transport of the server bootstrap."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_async  # health.aio: its asyncio servicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from idealrt.core.auth import Authenticator, Principal, acting_as
from idealrt.core.errors import IdealrtError
from idealrt.core.grpc_server import (
    NOBODY,
    UNAUTHENTICATED_METHODS,
    GrpcServer,
    Register,
    _audit,
    _bearer,
    _internal_status,
    _iterate_as,
    _request_id,
    abort_status,
    health_address,
    is_write,
    log,
    log_started,
)
from idealrt.core.observability import rpc_metrics
from idealrt.core.tls import TlsConfig

__all__ = ["AioErrorInterceptor", "AioGrpcServer", "start_aio_server"]

_END = object()


class _Aborted(Exception):
    """A plain handler called `abort` / `abort_with_status`: the status to send."""

    def __init__(self, status: Any) -> None:
        super().__init__()
        self.status = status


class _Status:
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()


class _ThreadContext:
    """The sync `grpc.ServicerContext` calls the services make, for a plain handler that
    runs on a pool thread of the aio server."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop):
        self._context = context
        self._loop = loop

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def is_active(self) -> bool:
        return not self._context.done()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        def add() -> None:
            self._context.add_done_callback(lambda _ctx: callback())  # type: ignore[arg-type]

        self._loop.call_soon_threadsafe(add)
        return True

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(metadata)

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(_Status(code, details))

    def abort_with_status(self, status: Any) -> None:
        raise _Aborted(status)


class _BlockingIterator:
    """A client stream (an async iterator on the loop) read from a pool thread."""

    def __init__(self, messages: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._messages = messages
        self._loop = loop

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        async def receive() -> Any:
            return await self._messages.__anext__()

        try:
            return asyncio.run_coroutine_threadsafe(receive(), self._loop).result()
        except StopAsyncIteration:
            raise StopIteration from None


def _is_async(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


class AioErrorInterceptor(grpc.aio.ServerInterceptor):
    """`idealrt.core.grpc_server.ErrorInterceptor` for the aio server: maps domain errors to
    rich statuses, logs one `rpc_finished` line per RPC, authenticates (health and
    reflection excepted) and runs the handler as the caller, and audits writes; and it
    puts each handler where it belongs (module docstring)."""

    def __init__(
        self,
        auth: Authenticator | None,
        pool: futures.ThreadPoolExecutor,
        inline: frozenset[str] = frozenset(),
    ) -> None:
        self._auth = auth if auth is not None and auth.enabled else None
        self._pool = pool
        self._inline = inline
        self._metrics = rpc_metrics()
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (handler, wrapped)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _Rpc(self, method).wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _Rpc:
    """The wrappers of one method's handler (built once per method)."""

    def __init__(self, owner: AioErrorInterceptor, method: str) -> None:
        self.method = method
        self.auth = None if method.startswith(UNAUTHENTICATED_METHODS) else owner._auth
        self.pool = owner._pool
        self.inline = method in owner._inline
        self.metrics = owner._metrics
        self.audited = is_write(method)

    # ---- shared steps

    def finish(self, start: float, code: str, request_id: str) -> None:
        seconds = time.perf_counter() - start
        self.metrics.observe(self.method, code, seconds)
        log.info(
            "rpc_finished",
            method=self.method,
            code=code,
            duration_ms=round(seconds * 1e3, 3),
            request_id=request_id,
        )

    def authenticate(self, context: Any) -> Principal | None:
        if self.auth is None:
            return None
        try:
            return self.auth.authenticate(_bearer(context))
        except IdealrtError as exc:
            log.warning("auth_failed", method=self.method, error=exc.message, peer=context.peer())
            raise

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The caller, authenticated on the pool (a JWKS refresh may fetch keys)."""
        if self.auth is None:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.authenticate, context)

    async def fail(
        self, exc: BaseException, context: grpc.aio.ServicerContext, start: float, rid: str
    ) -> None:
        """Answer `exc` (abort: raises grpc.aio's AbortError), or return when the client
        went away mid-stream."""
        if isinstance(exc, _Aborted):
            code = getattr(exc.status.code, "name", "UNKNOWN")
            self.finish(start, code, rid)
            st = exc.status
            await context.abort(st.code, st.details, tuple(st.trailing_metadata or ()))
        if isinstance(exc, IdealrtError):
            self.finish(start, exc.code.name, rid)
            st = abort_status(exc)
            await context.abort(st.code, st.details, st.trailing_metadata)
        if isinstance(exc, grpc.RpcError) and context.done():
            self.finish(start, "CANCELLED", rid)
            return
        log.error("rpc_internal_error", method=self.method, exc_info=exc)
        self.finish(start, "INTERNAL", rid)
        st = _internal_status()
        await context.abort(st.code, st.details, st.trailing_metadata)

    def audit(self, principal: Principal | None, request: Any, response: Any, code: str) -> None:
        if self.audited:
            who = principal if principal is not None or self.auth is None else NOBODY
            _audit(self.method, who, request, response, code)

    # ---- wrappers

    def wrap(self, handler: Any) -> Any:
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, self.unary),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, self.stream),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, self.unary),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, self.stream),
        )
        for attr, make, wrapper in kinds:
            fn = getattr(handler, attr)
            if fn:
                return make(
                    wrapper(fn),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def unary(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if _is_async(fn):
            call = self._async_unary(fn)
        elif self.inline:
            call = self._inline_unary(fn)
        else:
            call = self._pooled_unary(fn)

        async def inner(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            streamed = hasattr(request, "__anext__")
            rid = "" if streamed else _request_id(request)
            holder: list[Principal | None] = [None]
            try:
                resp = await call(request, context, holder)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                self.finish(start, "CANCELLED", rid)
                raise
            except Exception as exc:
                if not isinstance(exc, _Aborted):
                    code = exc.code.name if isinstance(exc, IdealrtError) else "INTERNAL"
                    self.audit(holder[0], None if streamed else request, None, code)
                await self.fail(exc, context, start, rid)
                raise
            self.finish(start, "OK", rid)
            self.audit(holder[0], None if streamed else request, resp, "OK")
            return resp

        return inner

    def _async_unary(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Any, holder: list[Principal | None]) -> Any:
            holder[0] = principal = await self.principal(context)
            if principal is None:
                return await fn(request, context)
            with acting_as(principal):
                return await fn(request, context)

        return call

    def _inline_unary(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Any, holder: list[Principal | None]) -> Any:
            holder[0] = principal = await self.principal(context)
            tctx = _ThreadContext(context, asyncio.get_running_loop())
            if principal is None:
                return fn(request, tctx)
            with acting_as(principal):
                return fn(request, tctx)

        return call

    def _pooled_unary(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Any, holder: list[Principal | None]) -> Any:
            loop = asyncio.get_running_loop()
            tctx = _ThreadContext(context, loop)
            if hasattr(request, "__anext__"):
                request = _BlockingIterator(request, loop)

            def run() -> Any:
                holder[0] = principal = self.authenticate(tctx)
                if principal is None:
                    return fn(request, tctx)
                with acting_as(principal):
                    return fn(request, tctx)

            return await loop.run_in_executor(self.pool, contextvars.copy_context().run, run)

        return call

    def stream(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        is_async = _is_async(fn)

        async def inner(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            rid = _request_id(request)
            try:
                if is_async:
                    principal = await self.principal(context)
                    if principal is None:
                        async for item in fn(request, context):
                            yield item
                    else:
                        with acting_as(principal):
                            async for item in fn(request, context):
                                yield item
                else:
                    async for item in self._pooled_stream(fn, request, context):
                        yield item
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                self.finish(start, "CANCELLED", rid)
                raise
            except Exception as exc:
                await self.fail(exc, context, start, rid)
                raise
            self.finish(start, "OK", rid)

        return inner

    async def _pooled_stream(
        self, fn: Callable[..., Iterator[Any]], request: Any, context: Any
    ) -> AsyncIterator[Any]:
        """A plain generator handler stepped on the pool: a thread only while it computes
        the next message (or waits for it: a plain handler that waits holds one)."""
        loop = asyncio.get_running_loop()
        tctx = _ThreadContext(context, loop)
        if hasattr(request, "__anext__"):
            request = _BlockingIterator(request, loop)
        ctx = contextvars.copy_context()

        def begin() -> Iterator[Any]:
            principal = self.authenticate(tctx)
            it = fn(request, tctx)
            return it if principal is None else _iterate_as(principal, it)

        it = await loop.run_in_executor(self.pool, ctx.run, begin)
        try:
            while True:
                item = await loop.run_in_executor(self.pool, ctx.run, _step, it)
                if item is _END:
                    return
                yield item
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                await loop.run_in_executor(self.pool, ctx.run, close)


def _step(it: Iterator[Any]) -> Any:
    return next(it, _END)


class _LoopThread:
    """An event loop running forever on a thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run `coro` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class AioGrpcServer(GrpcServer):
    """A started grpc.aio server on its loop thread, with the sync `GrpcServer` interface:
    `stop`, `wait`, `install_sigterm`, the drain and stop hooks, from any thread."""

    def __init__(
        self,
        loop: _LoopThread,
        pool: futures.ThreadPoolExecutor,
        server: grpc.aio.Server,
        port: int,
        health_servicer: Any,
        service_names: Sequence[str],
        health_server: grpc.aio.Server | None,
    ) -> None:
        super().__init__(server, port, health_servicer, service_names, health_server)
        self.model = "aio"
        self._loop = loop
        self._pool = pool
        self._terminated = threading.Event()

    def _set_health(self, name: str, status: int) -> None:
        self._loop.call(self.health.set(name, status))

    def _enter_graceful_shutdown(self) -> None:
        self._loop.call(self.health.enter_graceful_shutdown())

    def _stop_servers(self, grace_s: float) -> None:
        if self._terminated.is_set():
            return

        async def stop() -> None:
            await self.server.stop(grace_s)
            if self.health_server is not None:
                await self.health_server.stop(0)

        try:
            self._loop.call(stop())
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._loop.close()
            self._terminated.set()

    def wait(self) -> None:
        # timed waits: the main thread stays responsive to SIGTERM/SIGINT
        while not self._terminated.wait(0.5):
            pass


def start_aio_server(
    address: str,
    register: Sequence[Register],
    service_names: Sequence[str],
    *,
    max_workers: int,
    tls: TlsConfig,
    credentials: grpc.ServerCredentials | None,
    auth: Authenticator | None,
    options: Sequence[tuple[str, Any]],
    inline: frozenset[str],
) -> AioGrpcServer:
    """`idealrt.core.grpc_server.start_server` for model "aio" (checked arguments)."""
    loop = _LoopThread(f"grpc-aio-{address}")
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-aio")

    async def build() -> tuple[grpc.aio.Server, int, Any, grpc.aio.Server | None]:
        server = grpc.aio.server(
            interceptors=[AioErrorInterceptor(auth, pool, inline)], options=list(options)
        )
        for reg in register:
            reg(server)  # type: ignore[arg-type]  # the generated adders take either server
        health_servicer = health_async.HealthServicer()
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
            health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            listen = health_address(address, tls.health_port)
            try:
                if health_server.add_insecure_port(listen) == 0:
                    raise RuntimeError(f"could not bind {listen}")
            except RuntimeError as exc:
                raise RuntimeError(f"could not bind the health port {listen}: {exc}") from None
        await server.start()
        if health_server is not None:
            await health_server.start()
        for name in (*service_names, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return server, port, health_servicer, health_server

    try:
        server, port, health_servicer, health_server = loop.call(build())
    except BaseException:
        pool.shutdown(wait=False)
        loop.close()
        raise
    log_started(address, port, service_names, tls, auth, "aio")
    return AioGrpcServer(loop, pool, server, port, health_servicer, service_names, health_server)
