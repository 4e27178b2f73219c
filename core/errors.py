"""Domain errors. Each carries a gRPC status code and a stable UPPER_SNAKE `reason`.

The server interceptor (`idealrt.core.grpc_server`) maps them to `google.rpc.Status` with
`ErrorInfo(reason, domain="idealrt", metadata={"field": ...})`; clients mirror them back.
Anything that is not an IdealrtError becomes INTERNAL "internal error" and is logged.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "FailedPrecondition",
    "IdealrtError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_for_code",
    "invalid",
]

DOMAIN = "idealrt"


class IdealrtError(Exception):
    """Base of the tree. `reason` is stable and machine-readable; `message` is for people:
    what was wrong, the allowed range, the field."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, reason: str, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgument(IdealrtError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(IdealrtError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(IdealrtError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(IdealrtError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(IdealrtError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(IdealrtError):
    """No valid credentials: a missing, malformed, unknown, expired or badly signed token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(IdealrtError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(IdealrtError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(IdealrtError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(IdealrtError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[IdealrtError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        Internal,
    )
}


def error_for_code(code: grpc.StatusCode) -> type[IdealrtError]:
    """The error class mirroring a gRPC status code (IdealrtError for unmapped codes)."""
    return _BY_CODE.get(code, IdealrtError)


def invalid(field: str, reason: str, message: str) -> InvalidArgument:
    """The one shorthand for bad input: InvalidArgument naming the field first, then the
    stable reason (a constant of the area's `reasons` module), then what a person should
    know (what was wrong, the allowed range)."""
    return InvalidArgument(reason, message, field=field)
