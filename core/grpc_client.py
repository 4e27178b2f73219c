"""Client side of the error contract: every stub call goes through `call`, with a deadline,
and a failed RPC is raised as the mirrored `IdealrtError` (reason and field preserved).

Retries (grpc's own, from the channel's service config; no hand-written loops, after
grpc/grpc examples/python/retry): every channel from `open_channel` retries the idempotent
RPCs of all four services on UNAVAILABLE, so that a client rides out a restart of the
server. The retried methods are every RPC of the generated descriptors except
`NOT_RETRIED` (Generate measures; a client-streaming call cannot be retried by grpc), so a
new RPC is classified the moment it is generated (tests/unit/test_retry_policy.py checks
that each retried one is a read or carries a request_id/batch_id or is idempotent by
design). Creates are idempotent on their request_id: the clients fill in a fresh one
(`request_id_or_new`) when the caller gives none, so a retry replays rather than duplicates.
A server-streaming RPC (WatchProfile) is retried only before its first response message;
after that, `ProfilerClient.watch` reconnects itself.

Authentication: given a token (a string, or a callable such as `idealrt.core.auth.
TokenFile` that returns the current one), a channel sends `authorization: Bearer <token>`
metadata on every call (`with_token`, a client interceptor). Per-call metadata rather than
grpc call credentials, which grpc sends only over TLS channels: the embedded suite's
loopback channels are plaintext.
"""

from __future__ import annotations

import collections
import json
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, TypeAlias, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.core.errors import IdealrtError, error_for_code
from idealrt.core.rotating_channel import RotatingChannel, file_stamp
from idealrt.core.tls import TlsConfig, channel_credentials
from idealrt.metrics.v1 import metrics_service_pb2
from idealrt.profiler.v1 import profiler_service_pb2
from idealrt.serving.v1 import serving_service_pb2
from idealrt.store.v1 import store_service_pb2

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NOT_RETRIED",
    "RETRY_POLICY",
    "Token",
    "all_methods",
    "call",
    "call_stream",
    "from_rpc_error",
    "open_channel",
    "request_id_or_new",
    "retried_methods",
    "service_config",
    "with_token",
]

DEFAULT_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
T = TypeVar("T")

# The generated modules whose services the clients call.
_PROTO_MODULES: tuple[ModuleType, ...] = (
    store_service_pb2,
    serving_service_pb2,
    metrics_service_pb2,
    profiler_service_pb2,
)

# RPCs grpc must never retry, as "package.Service/Method". Generate: a measurement, and a
# replay would run (and time) a second generation. StreamEstimateRuntime: client-streaming,
# which grpc cannot retry once the stream has started.
NOT_RETRIED = frozenset(
    {
        "idealrt.serving.v1.ServingService/Generate",
        "idealrt.metrics.v1.MetricsService/StreamEstimateRuntime",
    }
)

# The grpc retryPolicy of every retried method: UNAVAILABLE only (the server is not there
# yet, or went away); the deadline of the call bounds all attempts together.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def all_methods() -> tuple[str, ...]:
    """Every RPC of every service, "package.Service/Method", from the descriptors."""
    return tuple(
        f"{svc.full_name}/{m.name}"
        for mod in _PROTO_MODULES
        for svc in mod.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    )


def retried_methods() -> tuple[str, ...]:
    """The RPCs the service config retries: all of them but NOT_RETRIED."""
    return tuple(m for m in all_methods() if m not in NOT_RETRIED)


def service_config() -> str:
    """The channel's `grpc.service_config` JSON: one methodConfig with RETRY_POLICY."""
    names = []
    for full in retried_methods():
        service, method = full.split("/")
        names.append({"service": service, "method": method})
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


_SERVICE_CONFIG = service_config()


# a bearer token, or what returns the current one (a token file re-read when it changes)
Token: TypeAlias = str | Callable[[], str]


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: Token) -> None:
        self._token = token

    def _details(self, details: Any) -> _CallDetails:
        token = self._token() if callable(self._token) else self._token
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"] + [
            ("authorization", f"Bearer {token}")
        ]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def with_token(channel: grpc.Channel, token: Token | None) -> grpc.Channel:
    """`channel` sending `authorization: Bearer <token>` on every call (unchanged when
    `token` is None). Closing the returned channel closes `channel`."""
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerInterceptor(token))


def open_channel(
    address: str, tls: TlsConfig | None = None, token: Token | None = None
) -> grpc.Channel:
    """A channel to `address` with the retry policy above: secure when `tls` has a client
    side (`ca_file` to verify the server, `client_cert_file`/`client_key_file` for mTLS;
    see idealrt.core.tls), plaintext otherwise. Reconnection backs off like the retries do
    (from 0.1 s, not grpc's default 1 s), so that a retry finds a server that has just come
    back. `token`: sent as a bearer token on every call (`with_token`)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        # a request is retried only while grpc still holds all of it
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    channel: grpc.Channel
    if tls is not None and tls.client_tls:
        # a renewed client certificate or CA on disk is used from the next call on
        channel = RotatingChannel(
            lambda: grpc.secure_channel(address, channel_credentials(tls), options=options),
            lambda: file_stamp([tls.ca_file, tls.client_cert_file, tls.client_key_file]),
        )
    else:
        channel = grpc.insecure_channel(address, options=options)
    return with_token(channel, token)


def request_id_or_new(request_id: str) -> str:
    """The caller's request_id, or a fresh one: a retried create then replays (the server
    is idempotent on request_id) instead of creating twice."""
    return request_id or uuid.uuid4().hex


def from_rpc_error(err: grpc.RpcError) -> IdealrtError:
    """Rebuild the domain error from a failed RPC (ErrorInfo reason/field when present)."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    reason, field = code.name, ""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except Exception:
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or reason
                field = info.metadata.get("field", "")
    cls = error_for_code(code)
    exc = cls(reason, message or code.name, field=field)
    exc.code = code
    return exc


def call(method: Callable[..., T], request: Any, timeout: float = DEFAULT_TIMEOUT_S) -> T:
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


def call_stream(
    method: Callable[..., Iterator[T]], request: Any, timeout: float | None = None
) -> Iterator[T]:
    try:
        yield from method(request, timeout=timeout)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
