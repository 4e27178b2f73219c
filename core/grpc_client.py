"""Client side of the error contract: every stub call goes through `call`, with a deadline,
and a failed RPC is raised as the mirrored `IdealrtError` (reason and field preserved)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.core.errors import IdealrtError, error_for_code

__all__ = ["DEFAULT_TIMEOUT_S", "call", "call_stream", "from_rpc_error", "open_channel"]

DEFAULT_TIMEOUT_S = 60.0
T = TypeVar("T")


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )


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
