"""Store URLs: parsing, validation, and the SQLAlchemy engine each kind of URL gets.

Accepted URLs (`IDEALRT_STORE_URL`):

- ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` (SQLAlchemy's
  convention: three slashes then the path, so an absolute path shows four). Parent
  directories are created. ``~`` is expanded.
- ``sqlite://`` (or ``sqlite:///:memory:``): a private in-memory database, for tests.
- ``postgresql://user[:password]@host[:port]/dbname[?param=value]`` (``postgres://`` and
  ``postgresql+psycopg://`` are accepted too). The driver is psycopg 3, imported only here
  and only for such a URL; without it opening fails with FailedPrecondition naming
  ``pip install idealrt[postgres]``.

Durability (design: "nothing committed is lost on a crash"): SQLite runs in WAL mode with
``synchronous=FULL``, so a commit has been fsynced to the WAL before it returns. NORMAL
would survive a process crash but may lose the last commits on power loss or an OS crash;
the store commits once per sample batch, not per sample, so the extra fsync costs little.
PostgreSQL's defaults (fsync=on, synchronous_commit=on) give the same guarantee.

Connection pools (`PoolLimits`, from StoreConfig: IDEALRT_STORE_POOL_SIZE,
IDEALRT_STORE_MAX_OVERFLOW, IDEALRT_STORE_POOL_TIMEOUT_S): PostgreSQL and SQLite files get
a QueuePool of `size` connections kept open, up to `max_overflow` more opened under a burst
(and closed when returned), and a caller that finds all of them busy waits at most
`timeout_s`, then gets Unavailable STORE_POOL_EXHAUSTED (see `_dberrors`). A PostgreSQL
connection the server dropped (a restart, a terminated backend) fails the first statement
sent on it, which SQLAlchemy sees as a disconnect: it discards the pool's connections
older than that, and the Store runs the read, or begins the transaction, once more on a
fresh one, so a restarted database costs a reconnect, not an error. (Not SQLAlchemy's
pre-ping: a `SELECT 1` round trip on every checkout, which under load was as costly as the
reads themselves.) Every Store call holds at most one connection at
a time, for one short transaction, so a pool as large as the server's worker threads never
makes a call wait. The in-memory database is one shared connection (StaticPool).

Prepared statements: SQLAlchemy compiles each statement shape once (its compiled cache);
pysqlite keeps each connection's prepared statements (`cached_statements`, 128 by
default); psycopg prepares a statement on the server after it has run `prepare_threshold`
(5) times on a connection, so the store's hot statements run as server-side prepared
statements on every pooled connection.
"""

from __future__ import annotations

import dataclasses
import importlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import QueuePool, StaticPool

from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.store.reasons import POSTGRES_DRIVER_MISSING, STORE_URL_INVALID

__all__ = [
    "BEGIN_OPTION",
    "SQLITE_BEGIN_OPTION",
    "SQLITE_BUSY_TIMEOUT_S",
    "PoolLimits",
    "StoreUrl",
    "create_store_engine",
    "parse_store_url",
]

SQLITE_BUSY_TIMEOUT_S = 30.0
# Execution option read by the "begin" hook (both backends emit their own BEGIN):
# "DEFERRED" (the default) a plain transaction; "IMMEDIATE" takes SQLite's write lock at
# BEGIN (so a read-then-write transaction cannot fail with SQLITE_BUSY_SNAPSHOT half-way;
# on PostgreSQL a plain BEGIN); "NONE" no transaction at all: each statement commits by
# itself, for a read that is one statement (atomic alone: no BEGIN or COMMIT to pay, which
# on PostgreSQL are round trips).
BEGIN_OPTION = "idealrt_begin"
SQLITE_BEGIN_OPTION = BEGIN_OPTION  # its former name
_BEGIN_MODES = ("DEFERRED", "IMMEDIATE", "NONE")

_FIELD = "store_url"
_log = structlog.get_logger(__name__)
_HELP = (
    "expected sqlite:///PATH (relative), sqlite:////ABSOLUTE/PATH, sqlite:// (in memory) "
    "or postgresql://USER@HOST:PORT/DBNAME"
)


@dataclasses.dataclass(frozen=True)
class StoreUrl:
    """A validated store URL. `path` is None for an in-memory SQLite database."""

    backend: str  # "sqlite" | "postgresql"
    url: URL  # the SQLAlchemy URL, driver resolved
    path: Path | None = None

    @property
    def memory(self) -> bool:
        return self.backend == "sqlite" and self.path is None

    def redacted(self) -> str:
        """The URL with any password masked, for logs and messages."""
        return self.url.render_as_string(hide_password=True)


@dataclasses.dataclass(frozen=True)
class PoolLimits:
    """The connection pool of a PostgreSQL store or an SQLite file (see the module
    docstring). The defaults are StoreConfig's: 16, the sync server's worker threads
    (idealrt.core.grpc_server.UNARY_WORKERS), each of which holds at most one connection
    at a time; 8 more for callers beyond them (an embedded suite's profiler and metrics
    threads, an aio server's executor); 10 s, well inside a client's deadline, so that a
    store that cannot keep up answers a retryable UNAVAILABLE rather than a timeout."""

    size: int = 16
    max_overflow: int = 8
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.size < 1 or self.max_overflow < 0 or not self.timeout_s > 0:
            raise ValueError(
                f"pool limits must have size >= 1, max_overflow >= 0 and timeout_s > 0, got {self}"
            )


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(STORE_URL_INVALID, message, field=_FIELD)


def parse_store_url(raw: str) -> StoreUrl:
    """Validate `raw` and resolve it to a StoreUrl. Raises InvalidArgument(field=store_url)."""
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid(f"store_url is empty; {_HELP}")
    raw = raw.strip()
    try:
        url = make_url(raw)
    except ArgumentError:
        raise _invalid(f"store_url is not a URL; {_HELP}") from None
    backend, _, driver = url.drivername.partition("+")
    if backend == "sqlite":
        return _parse_sqlite(url, driver)
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise _invalid(f"store_url: PostgreSQL driver {driver!r} is not supported; use psycopg")
        return StoreUrl("postgresql", url.set(drivername="postgresql+psycopg"))
    raise _invalid(f"store_url scheme {url.drivername!r} is not supported; {_HELP}")


def _parse_sqlite(url: URL, driver: str) -> StoreUrl:
    if driver not in ("", "pysqlite"):
        raise _invalid(f"store_url: SQLite driver {driver!r} is not supported")
    if url.host or url.username or url.password or url.port:
        raise _invalid(f"store_url: a sqlite URL has no host or user; {_HELP}")
    if url.query:
        raise _invalid(f"store_url: sqlite URLs take no parameters, got {sorted(url.query)}")
    url = url.set(drivername="sqlite+pysqlite")
    if url.database in (None, "", ":memory:"):
        return StoreUrl("sqlite", url.set(database=None), None)
    if url.database.startswith("file:"):
        raise _invalid("store_url: sqlite file: URIs are not supported; give a path")
    path = Path(url.database).expanduser()
    if path.exists() and path.is_dir():
        raise _invalid(f"store_url: {path} is a directory; name a database file in it")
    return StoreUrl("sqlite", url.set(database=str(path)), path)


def create_store_engine(parsed: StoreUrl, pool: PoolLimits | None = None) -> Engine:
    """The engine for a parsed URL. SQLite: WAL + synchronous=FULL + foreign keys, BEGIN
    emitted by us (pysqlite's own transaction handling is bypassed). PostgreSQL: psycopg 3
    in autocommit mode, BEGIN emitted by us too (see `_install_postgres_hooks`). Both: a
    QueuePool sized by `pool` (default PoolLimits())."""
    limits = pool or PoolLimits()
    pooling: dict[str, Any] = {
        "poolclass": QueuePool,
        "pool_size": limits.size,
        "max_overflow": limits.max_overflow,
        "pool_timeout": limits.timeout_s,
    }
    if parsed.backend == "postgresql":
        try:
            importlib.import_module("psycopg")
        except ImportError:
            raise FailedPrecondition(
                POSTGRES_DRIVER_MISSING,
                "a postgresql:// store needs psycopg 3: pip install idealrt[postgres]",
                field=_FIELD,
            ) from None
        # no pre-ping (a SELECT 1 round trip per checkout, ~10 GIL releases in psycopg): a
        # dropped connection fails its first statement, and the Store retries that once
        # on a fresh one (see repository.Store._read and ._tx)
        engine = sa.create_engine(parsed.url, **pooling)
        _install_postgres_hooks(engine)
        return engine
    if parsed.path is not None:
        parsed.path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed.url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            **pooling,
        )
    else:
        # One connection shared by every thread (the database lives in it); the Store
        # serializes access with a lock.
        engine = sa.create_engine(
            parsed.url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    _install_sqlite_hooks(engine, wal=parsed.path is not None)
    return engine


def _enter_wal(cur: sqlite3.Cursor) -> None:
    """Put the database in WAL mode (persistent: a no-op once any connection did it).

    Switching the journal mode needs an exclusive lock, and SQLite answers SQLITE_BUSY at
    once, without calling the busy handler, when another connection is reading or switching
    it at the same moment (several processes or threads opening a fresh database). So retry,
    with backoff, for as long as the busy timeout would have waited."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    pause = 0.001
    while True:
        try:
            row = cur.execute("PRAGMA journal_mode=WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            continue
        mode = str(row[0]).lower() if row is not None else "unknown"
        if mode != "wal":  # e.g. a filesystem without shared memory: rollback journal
            _log.warning("sqlite_wal_unavailable", journal_mode=mode)
        return


def _install_sqlite_hooks(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if wal:
                _enter_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        mode = _begin_mode(conn)
        if mode != "NONE":
            conn.exec_driver_sql(f"BEGIN {mode}")


def _begin_mode(conn: sa.Connection) -> str:
    mode = conn.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
    if mode not in _BEGIN_MODES:
        raise ValueError(f"bad {BEGIN_OPTION}: {mode!r}")
    return str(mode)


def _install_postgres_hooks(engine: Engine) -> None:
    """psycopg connections in autocommit mode, every transaction begun by an explicit BEGIN
    (as on SQLite), so that a one-statement read (BEGIN_OPTION "NONE") is one round trip:
    psycopg would otherwise send a BEGIN before it and SQLAlchemy a COMMIT after it.
    commit() and rollback() still end a transaction a BEGIN opened (psycopg looks at the
    connection's transaction status, not at its autocommit flag)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.autocommit = True

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        if _begin_mode(conn) != "NONE":
            conn.exec_driver_sql("BEGIN")
