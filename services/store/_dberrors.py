"""Database errors -> domain errors: which DBAPI failures mean "the store is unavailable"
(connection failures, lock timeouts, I/O errors) and the context manager that turns them
into Unavailable STORE_UNAVAILABLE; and a connection pool with no connection free within its
timeout, Unavailable STORE_POOL_EXHAUSTED.

Why UNAVAILABLE for an exhausted pool, not RESOURCE_EXHAUSTED: the condition is transient
and the server's, not the caller's (no quota of theirs is spent, nothing in the request is
too large); the call did nothing (no transaction began), so it is safe to retry, and
UNAVAILABLE is the code gRPC defines for "retry with a backoff" and the one every idealrt
channel retries (idealrt.core.grpc_client.RETRY_POLICY: exponential backoff, at most 5
attempts within the call's deadline). RESOURCE_EXHAUSTED is not retried and would turn a
burst into failed calls. The reason tells it apart from a database that is down."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from idealrt.core.errors import Unavailable
from idealrt.core.reasons import STORE_UNAVAILABLE
from idealrt.services.store.reasons import STORE_POOL_EXHAUSTED
from idealrt.services.store.url import StoreUrl

__all__ = ["unavailable_on_db_error"]

# SQLite reports lock timeouts and I/O trouble as OperationalError, but also SQL mistakes;
# only the former mean "the database is unavailable".
_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o", "readonly", "disk is full")


def _is_unavailable(exc: DBAPIError, backend: str) -> bool:
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return False
    if backend == "sqlite":
        return any(word in str(exc.orig).lower() for word in _SQLITE_UNAVAILABLE)
    return True


@contextlib.contextmanager
def unavailable_on_db_error(parsed: StoreUrl) -> Iterator[None]:
    """Connection failures, lock timeouts and I/O errors become Unavailable STORE_UNAVAILABLE
    (retryable), a pool with no free connection Unavailable STORE_POOL_EXHAUSTED; anything
    else propagates."""
    try:
        yield
    except sa.exc.TimeoutError as exc:  # QueuePool: no connection within pool_timeout
        raise Unavailable(
            STORE_POOL_EXHAUSTED,
            f"store {parsed.redacted()} is busy: no database connection became free in time "
            "(IDEALRT_STORE_POOL_SIZE, IDEALRT_STORE_MAX_OVERFLOW, IDEALRT_STORE_POOL_TIMEOUT_S); "
            "retry with a backoff",
        ) from exc
    except DBAPIError as exc:
        if not _is_unavailable(exc, parsed.backend):
            raise
        raise Unavailable(
            STORE_UNAVAILABLE, f"store {parsed.redacted()} is unavailable: {exc.orig}"
        ) from exc
