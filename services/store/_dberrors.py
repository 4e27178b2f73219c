"""Database errors -> domain errors: which DBAPI failures mean "the store is unavailable"
(connection failures, lock timeouts, I/O errors) and the context manager that turns them
into Unavailable STORE_UNAVAILABLE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from idealrt.core.errors import Unavailable
from idealrt.core.reasons import STORE_UNAVAILABLE
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
    (retryable); anything else propagates."""
    try:
        yield
    except DBAPIError as exc:
        if not _is_unavailable(exc, parsed.backend):
            raise
        raise Unavailable(
            STORE_UNAVAILABLE, f"store {parsed.redacted()} is unavailable: {exc.orig}"
        ) from exc
