"""The store: idealrt's system of record for profiles, samples and cost models.

`open_store(url)` parses the URL (see `url`), opens one engine and applies migrations
(see `schema`). `Store` is thread-safe; every method is one short transaction, validated
before it writes and rolled back on any error, so bad input never corrupts stored data.

Idempotency: creates carry a client `request_id` (a replay returns the stored row and
created=False; the same request_id with a different body is AlreadyExists
REQUEST_ID_REUSED); sample appends carry a `batch_id` per profile (a replay returns the
batch's count and writes nothing; a different body is AlreadyExists BATCH_ID_REUSED).

Write serialization: SQLite writes begin IMMEDIATE (its one writer lock, taken up front) and
an in-process lock spares threads SQLite's busy-wait; concurrent appends there share one
transaction and one fsync (`_group_commit`), each in its own savepoint. On PostgreSQL an
append locks its profile row (SELECT ... FOR UPDATE), so appends to different profiles run
side by side and sequence numbers stay contiguous under concurrency. The in-memory SQLite
database lives in one connection, so there every call is serialized. Database connection
failures surface as Unavailable STORE_UNAVAILABLE; a connection pool with none free within
its timeout as Unavailable STORE_POOL_EXHAUSTED (`url.PoolLimits`, `_dberrors`).

Ingest (`append_batch`, the hot path): a batch arrives as a columnar `SampleBatch` (the
servicer converts protobuf straight to columns) or a list of Samples; it is validated a
column at a time (`_validate.check_sample_batch`; anything off the common case goes sample
by sample, for the exact error) and turned into column values before the transaction; in
it, two indexed lookups built once as statements (`_queries`), the batch row, and the
samples in one statement (`_bulk`). Counting a profile's samples is one index lookup
(seqs are 0..n-1). Measured with bench/_svc_ingest.py.

Reads (the hot ones: a profile, a page of profiles): one statement each, built once per
shape (`_queries`), run outside a transaction (`_read`), its rows read as JSON text and
decoded once per distinct text (`_jsonrows`), a profile's payload once per distinct text
(`_rows`). So the Profiles returned share their frozen parts (model, stack, plan, target,
provenance, model_spec, and the dicts in them) with other reads of the same stored
payload: treat them as read-only, as frozen dataclasses are meant to be (replace, don't
mutate). The Profile objects themselves are new on every call. `read_generation` is
SQLite's commit counter, which lets the servicer keep answers while the database is
unchanged (`_read_cache`).

Why one module of ~650 lines: it is the Store's one public surface, every method a short
transaction over the same engine, locks and page rules; the pieces that stand alone (row
mapping, lookups, validation, bulk insert, group commit) live in their own `_` modules.

Pages (AIP-158): page_size 0 means the default; larger than the maximum is coerced to the
maximum; negative is InvalidArgument. Profiles and cost models list newest first
(create_time, id descending); samples in seq order.

Namespaces: a profile or cost model is created in its `namespace` and stays there; its
samples belong to it. Reads (get, list, samples, counts) and the lookups of writes (update,
append, a cost model's profile) take `namespaces`, a visibility set (None: every namespace,
as before namespaces existed; an empty set: none): an object outside it is NOT_FOUND exactly
as if it did not exist (same reason, message and field), and lists are filtered. An update
never moves an object: the stored namespace wins and the namespace in the request is
ignored (a client that predates namespaces sends "default" for everything). A cost model
that names a profile must be in the profile's namespace (InvalidArgument NAMESPACE_MISMATCH).
Authorization is the caller's: which set to pass, and whether it may write in a namespace.
Ids and request ids are unique store-wide, not per namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import sqlite3
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from idealrt.core import paging
from idealrt.core.clock import utcnow
from idealrt.core.domain import CostModel, Profile, ProfileState, Sample, SampleBatch
from idealrt.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    invalid,
)
from idealrt.core.namespaces import profile_not_found
from idealrt.core.reasons import PROFILE_TERMINAL
from idealrt.services.store import _queries, _rows, _serde, _validate
from idealrt.services.store._bulk import BulkInsert
from idealrt.services.store._dberrors import unavailable_on_db_error
from idealrt.services.store._group_commit import GroupCommit
from idealrt.services.store.reasons import (
    BATCH_ID_INVALID,
    COST_MODEL_ALREADY_EXISTS,
    NAMESPACE_MISMATCH,
    PROFILE_ALREADY_EXISTS,
    PROFILE_RUN_ELSEWHERE,
    STORE_CLOSED,
)
from idealrt.services.store.schema import cost_models, migrate, profiles, samples
from idealrt.services.store.url import (
    BEGIN_OPTION,
    PoolLimits,
    StoreUrl,
    create_store_engine,
    parse_store_url,
)

__all__ = [
    "PROFILE_PAGE",
    "SAMPLE_PAGE",
    "Appended",
    "PageLimits",
    "PoolLimits",
    "Store",
    "open_store",
]

# (default, maximum) page sizes
PROFILE_PAGE = (50, 1000)
SAMPLE_PAGE = (1000, 10000)

_log = structlog.get_logger(__name__)
# PostgreSQL 13+; the snapshot as text ("xmin:xmax:xip,...") is read_generation's value
_SNAPSHOT_SQL = "SELECT pg_current_snapshot()::text"


@dataclasses.dataclass(frozen=True)
class PageLimits:
    """The largest page a list returns: of profiles and cost models, of samples (a larger
    page_size is coerced to it, AIP-158, before any query)."""

    objects: int = PROFILE_PAGE[1]
    samples: int = SAMPLE_PAGE[1]


@dataclasses.dataclass(frozen=True)
class Appended:
    """What an append did: `appended`, the batch's size (a replay: the stored batch's), and
    `total_samples`, the profile's samples after it."""

    appended: int
    total_samples: int


# Columns of the samples insert, in the order of its row tuples.
_SAMPLE_INSERT = ("profile_id", "seq", "batch_id", "namespace", *_rows.SAMPLE_COLUMNS)
Namespaces = frozenset[str] | None  # a visibility set: None is every namespace
T = TypeVar("T")


def open_store(
    url: str, *, page_limits: PageLimits | None = None, pool: PoolLimits | None = None
) -> Store:
    """Open (creating and migrating as needed) the store at `url`; `page_limits`: the
    largest pages its lists return (StoreConfig: IDEALRT_MAX_PAGE_SIZE,
    IDEALRT_MAX_SAMPLE_PAGE_SIZE); `pool`: its database connection pool (StoreConfig:
    IDEALRT_STORE_POOL_SIZE, IDEALRT_STORE_MAX_OVERFLOW, IDEALRT_STORE_POOL_TIMEOUT_S;
    see `url.PoolLimits`)."""
    parsed = parse_store_url(url)
    engine = create_store_engine(parsed, pool)
    try:
        with unavailable_on_db_error(parsed):
            migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, parsed, page_limits or PageLimits())


@contextlib.contextmanager
def _begun(engine: Engine) -> Iterator[sa.Connection]:
    """A connection of `engine` in a transaction, committed on exit (rolled back on an
    error). A connection the database had dropped fails its BEGIN (the first statement a
    transaction sends): nothing was done, so it begins once more on a fresh one."""
    conn = engine.connect()
    try:
        try:
            tx = conn.begin()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            conn.close()
            conn = engine.connect()
            tx = conn.begin()
        with tx:
            yield conn
    finally:
        conn.close()


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def _refuse_other_runner(profile_id: str, runner: str, writer: str | None) -> None:
    """PERMISSION_DENIED when `writer` is given and another subject runs the profile (the
    runner's name is not told: it is another team's business)."""
    if writer is not None and runner and runner != writer:
        raise PermissionDenied(
            PROFILE_RUN_ELSEWHERE,
            f"profile {profile_id} is being run by another profiler; only the profiler "
            "that runs a profile writes its samples and state",
            field="profile_id",
        )


def _listing_filter(base: str, namespaces: Namespaces) -> str:
    """A page token's filter: `base` alone for every namespace (tokens issued before
    namespaces stay valid), else `base` and a short digest of the set (a set of many
    63-character names would not fit a token)."""
    if namespaces is None:
        return base
    return f"{base}|ns:{_serde.digest(sorted(namespaces))[:16]}"


class Store:
    """See the module docstring. Construct with `open_store`."""

    def __init__(
        self, engine: Engine, parsed: StoreUrl, page_limits: PageLimits | None = None
    ) -> None:
        limits = page_limits or PageLimits()
        # (default, maximum) page sizes of the lists: profiles and cost models, samples
        self._object_page = (min(PROFILE_PAGE[0], limits.objects), limits.objects)
        self._sample_page = (min(SAMPLE_PAGE[0], limits.samples), limits.samples)
        self._engine = engine
        self._parsed = parsed
        self._write_engine = engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
        # reads that are one statement run outside a transaction (see `_read`)
        self._read_engine = engine.execution_options(**{BEGIN_OPTION: "NONE"})
        sqlite = parsed.backend == "sqlite"
        self._all_lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if parsed.memory else contextlib.nullcontext()
        )
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if sqlite and not parsed.memory else contextlib.nullcontext()
        )
        # SQLite: appends are group-committed (one writer, an fsync per commit); PostgreSQL
        # runs them side by side, each locking only its own profile's row
        self._appends: GroupCommit | None = (
            GroupCommit(lambda: self._tx(write=True)) if sqlite else None
        )
        self._sample_insert = BulkInsert(samples, _SAMPLE_INSERT, engine.dialect)
        self._closed = False
        # read_generation's connection (sqlite3 or psycopg), never used to write
        self._watch: Any = None
        self._watch_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The store URL, password masked."""
        return self._parsed.redacted()

    @property
    def backend(self) -> str:
        return self._parsed.backend

    def close(self) -> None:
        self._closed = True
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
        self._engine.dispose()

    def read_generation(self) -> Hashable | None:
        """A value that changes with every commit to the database, by any connection of
        any process, or None where the store has none: read it before a read whose answer
        is kept, and keep the answer only while it reads the same (see `_read_cache`).

        A file SQLite: `PRAGMA data_version` on a connection of its own that never writes
        changes whenever another connection has committed (SQLite's documented contract;
        ~3 us, no I/O in WAL mode).
        PostgreSQL: the current snapshot, `pg_current_snapshot()` ("xmin:xmax:xip,..."),
        on a connection of its own (autocommit, one cheap round trip, no table read). A
        transaction that writes is given an id, which is in the snapshot's in-progress
        list (or beyond its xmax) until it ends: a commit anywhere in the database (any
        store replica, any other client) changes it. Read-only transactions get no id and
        leave it as it is. So a snapshot that reads the same means that nothing committed
        in between; other writers to the same database only cost cache misses.
        An in-memory SQLite (one connection) has none."""
        self._check_open()
        if self._parsed.backend == "sqlite" and self._parsed.path is None:
            return None
        with self._watch_lock:
            try:
                if self._watch is None:
                    self._watch = self._open_watch()
                if self._parsed.backend == "sqlite":
                    return int(self._watch.execute("PRAGMA data_version").fetchone()[0])
                with self._watch.cursor() as cur:
                    cur.execute(_SNAPSHOT_SQL)
                    return str(cur.fetchone()[0])
            except self._driver_errors() as exc:  # the database driver's own errors
                # no counter now: this call reads the database, which reports the failure
                # (or recovers); the next call opens a new watch connection
                _log.warning("store_read_generation_failed", error=f"{type(exc).__name__}: {exc}")
                if self._watch is not None:
                    with contextlib.suppress(*self._driver_errors()):  # already broken
                        self._watch.close()
                    self._watch = None
                return None

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        """What the watch connection's driver raises (sqlite3, or psycopg 3)."""
        if self._parsed.backend == "sqlite":
            return (sqlite3.Error,)
        import psycopg  # present: this store is open on PostgreSQL

        # the connection comes from the engine's pool (an exhausted pool: sa TimeoutError)
        return (psycopg.Error, OSError, sa.exc.SQLAlchemyError)

    def _open_watch(self) -> Any:
        """read_generation's own connection: never used to write, outside the pool."""
        if self._parsed.backend == "sqlite":
            return sqlite3.connect(
                str(self._parsed.path), isolation_level=None, check_same_thread=False
            )
        pooled = self._engine.raw_connection()
        raw: Any = pooled.driver_connection
        pooled.detach()  # ours from now on: the pool neither counts nor recycles it
        raw.autocommit = True
        return raw

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(STORE_CLOSED, "the store has been closed")

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[sa.Connection]:
        self._check_open()
        engine = self._write_engine if write else self._engine
        with (
            self._all_lock,
            self._write_lock if write else contextlib.nullcontext(),
            unavailable_on_db_error(self._parsed),
            _begun(engine) as conn,
        ):
            yield conn

    def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        """`fn(conn)`, a read that is ONE statement, run outside a transaction: a
        statement sees one snapshot by itself on both backends, so the BEGIN and COMMIT a
        transaction costs (round trips on PostgreSQL) buy nothing. Never for two
        statements that must agree (use `_tx`). A read whose connection the database had
        dropped is run once more, on a fresh one (see `url`: no pre-ping)."""
        self._check_open()
        with self._all_lock, unavailable_on_db_error(self._parsed):
            try:
                with self._read_engine.connect() as conn:
                    return fn(conn)
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
            with self._read_engine.connect() as conn:
                return fn(conn)

    # ---- profiles ----------------------------------------------------------------------

    def create_profile(self, profile: Profile) -> tuple[Profile, bool]:
        """Store a new profile; returns (stored, created). Idempotent on request_id."""
        p = _validate.check_profile(profile)
        p = dataclasses.replace(p, id=p.id or _new_id("prof"), create_time=utcnow())
        try:
            with self._tx(write=True) as conn:
                if p.request_id and (existing := _queries.profile_by_request(conn, p)):
                    return existing, False
                conn.execute(profiles.insert().values(_rows.profile_row(p, update_time=utcnow())))
                return _queries.get_profile(conn, p.id, "id"), True
        except IntegrityError:  # lost a race on request_id, or the id is taken
            with self._tx(write=False) as conn:
                if p.request_id and (existing := _queries.profile_by_request(conn, p)):
                    return existing, False
            raise AlreadyExists(
                PROFILE_ALREADY_EXISTS, f"a profile with id {p.id!r} exists", field="id"
            ) from None

    def get_profile(
        self, profile_id: str, namespaces: Namespaces = None, *, field: str = "id"
    ) -> Profile:
        """`field` names the id in errors (a caller looking up the profile of another
        request's `profile_id` passes "profile_id")."""
        _validate.check_id(profile_id, field)
        ns = _validate.check_namespaces(namespaces)
        row = self._read(lambda conn: _queries.profile_row(conn, profile_id, ns))
        if row is None:
            raise profile_not_found(profile_id, field)
        return _rows.profile_from_row(row)

    def update_profile(
        self, profile: Profile, namespaces: Namespaces = None, *, writer: str | None = None
    ) -> Profile:
        """Write the mutable fields (state, counters, start/end time, error, provenance,
        model_spec, queue_position); model/stack/plan/target/placement/request_id/
        create_time/namespace are kept as stored. A terminal profile is final: only an
        identical update (a retry) is accepted. A profile outside `namespaces` is NOT_FOUND.
        `writer` (the caller's subject, from the servicer): a profile being run by another
        writer is PERMISSION_DENIED; writing RUNNING claims the profile for `writer`,
        writing QUEUED (a checkpoint) releases it, so another profiler may resume it."""
        p = _validate.check_profile(profile)
        _validate.check_id(p.id, "id")
        ns = _validate.check_namespaces(namespaces)
        with self._tx(write=True) as conn:
            current = _queries.get_profile(conn, p.id, "id", lock=True, namespaces=ns)
            runner = self._check_runner(conn, p.id, writer)
            updated = dataclasses.replace(
                current,
                state=p.state,
                completed_samples=p.completed_samples,
                total_samples=p.total_samples,
                queue_position=p.queue_position,
                start_time=p.start_time,
                end_time=p.end_time,
                error=p.error,
                provenance=p.provenance,
                model_spec=p.model_spec,
            )
            if current.state.terminal:
                if _queries.mutable(updated) == _queries.mutable(current):
                    return current
                raise FailedPrecondition(
                    PROFILE_TERMINAL,
                    f"profile {p.id} is {current.state.value}; a finished profile cannot change",
                    field="state",
                )
            row = _rows.profile_row(updated, update_time=utcnow())
            del row["id"], row["request_id"], row["create_time"], row["namespace"]
            if writer is not None and p.state == ProfileState.RUNNING:
                row["runner"] = writer
            elif writer is not None and p.state == ProfileState.QUEUED:
                row["runner"] = ""
            else:
                row["runner"] = runner
            conn.execute(profiles.update().where(profiles.c.id == p.id).values(row))
            return _queries.get_profile(conn, p.id, "id")

    @staticmethod
    def _check_runner(conn: sa.Connection, profile_id: str, writer: str | None) -> str:
        """The profile's runner; PERMISSION_DENIED when `writer` is given and another
        subject runs it (see `_refuse_other_runner`)."""
        runner = conn.execute(
            sa.select(profiles.c.runner).where(profiles.c.id == profile_id)
        ).scalar_one()
        _refuse_other_runner(profile_id, runner, writer)
        return str(runner)

    def list_profiles(
        self,
        page_size: int,
        page_token: str,
        state: ProfileState | None = None,
        namespaces: Namespaces = None,
    ) -> tuple[list[Profile], str]:
        """Newest first, only those in `namespaces`. Returns (profiles, next_page_token);
        "" when there are no more."""
        size = paging.page_size(page_size, *self._object_page)
        ns = _validate.check_namespaces(namespaces)
        state_filt = "" if state is None else _validate.check_state(state).value
        equal = {} if state is None else {"state": state_filt}
        filt = _listing_filter(state_filt, ns)
        return self._newest_first(
            profiles, equal, ns, size, page_token, "profiles", filt, _rows.profile_from_row
        )

    def unfinished_profiles(self, namespaces: Namespaces = None) -> list[Profile]:
        """QUEUED and RUNNING profiles, oldest first (to resume at profiler start-up)."""
        ns = _validate.check_namespaces(namespaces)
        found = self._read(lambda conn: _queries.unfinished_rows(conn, ns))
        return [_rows.profile_from_row(r) for r in found]

    def _newest_first(
        self,
        table: sa.Table,
        equal: dict[str, Any],
        namespaces: frozenset[str] | None,
        size: int,
        page_token: str,
        kind: str,
        filt: str,
        convert: Any,
        *,
        merge: bool = True,
    ) -> tuple[list[Any], str]:
        """A page of `table`'s rows whose columns `equal` have those values and visible in
        `namespaces`, newest first ((create_time, id) descending), after the page token's
        cursor: one index range read in index order, a namespace set of several (`merge`)
        one range per namespace, merged (see `_queries.newest_first`)."""
        cursor = paging.decode_token(page_token, kind, filt)
        after = None
        if cursor is not None:
            try:
                after = (
                    _serde.from_jsonable(datetime, cursor[0]),
                    _validate.check_id(cursor[1], "page_token"),
                )
            # OverflowError: a time that leaves years 1..9999 when converted to UTC
            except (TypeError, ValueError, OverflowError, IndexError, InvalidArgument):
                raise paging.invalid_token() from None
        rows = self._read(
            lambda conn: _queries.page_rows(conn, table, equal, namespaces, after, size + 1, merge)
        )
        items = [convert(r) for r in rows[:size]]
        if len(rows) <= size:
            return items, ""
        last = rows[size - 1]
        return items, paging.encode_token(
            kind, filt, [_serde.to_jsonable(last["create_time"]), last["id"]]
        )

    # ---- samples -----------------------------------------------------------------------

    def append_samples(
        self,
        profile_id: str,
        batch_id: str,
        samples_: Sequence[Sample] | SampleBatch,
        namespaces: Namespaces = None,
        *,
        writer: str | None = None,
    ) -> int:
        """Append a batch atomically, assigning contiguous seq numbers; returns its size.
        See `append_batch`."""
        return self.append_batch(profile_id, batch_id, samples_, namespaces, writer=writer).appended

    def append_batch(
        self,
        profile_id: str,
        batch_id: str,
        samples_: Sequence[Sample] | SampleBatch,
        namespaces: Namespaces = None,
        *,
        writer: str | None = None,
    ) -> Appended:
        """Append a batch atomically, assigning contiguous seq numbers; returns its size
        and the profile's samples after it. Idempotent on (profile_id, batch_id): a replay
        returns the stored batch's size and writes nothing; the same batch_id with other
        samples is AlreadyExists BATCH_ID_REUSED. A finished profile takes no new batches;
        one outside `namespaces` is NOT_FOUND; one run by another `writer` than the caller's
        subject is PERMISSION_DENIED (see update_profile).

        The hot path of ingest: the samples are validated and turned into column values
        before the transaction; in it, indexed lookups of the profile, the batch id and the
        profile's last seq (one statement on SQLite; on PostgreSQL the profile's row locked
        first, then the other two in one statement) and two inserts, the samples in one
        statement (`_bulk`). On SQLite, concurrent appends share a transaction and its
        fsync (`_group_commit`)."""
        _validate.check_id(profile_id, "profile_id")
        _validate.check_request_id(batch_id, "batch_id", allow_empty=False, reason=BATCH_ID_INVALID)
        batch = _validate.check_sample_batch(samples_)
        ns = _validate.check_namespaces(namespaces)
        # the samples' column values, built before the transaction (SAMPLE_COLUMNS order)
        columns = _rows.batch_columns(batch)
        n = len(batch)

        def append(conn: sa.Connection) -> Appended:
            target, prior, first = _queries.write_lookup(conn, profile_id, batch_id, ns)
            _refuse_other_runner(profile_id, target.runner, writer)
            if prior is not None:
                _queries.check_replay(conn, profile_id, batch_id, *prior, columns)
                return Appended(prior[1], first)
            if ProfileState(target.state).terminal:
                raise FailedPrecondition(
                    PROFILE_TERMINAL,
                    f"profile {profile_id} is {target.state}; it takes no new samples",
                    field="profile_id",
                )
            conn.execute(
                _queries.INSERT_BATCH,
                {
                    "profile_id": profile_id,
                    "batch_id": batch_id,
                    "first_seq": first,
                    "count": n,
                    "create_time": utcnow(),
                    "namespace": target.namespace,
                },
            )
            self._sample_insert.run(
                conn,
                [
                    [profile_id] * n,
                    range(first, first + n),
                    [batch_id] * n,
                    [target.namespace] * n,
                    *columns,
                ],
            )
            return Appended(n, first + n)

        if self._appends is not None:
            # append raises its domain errors before its first write: no savepoint needed
            return self._appends.run(append, checks_first=True)
        with self._tx(write=True) as conn:
            return append(conn)

    def list_samples(
        self, profile_id: str, page_size: int, page_token: str, namespaces: Namespaces = None
    ) -> tuple[list[Sample], str]:
        """In seq order. Returns (samples, next_page_token); "" when there are no more. A
        profile outside `namespaces` is NOT_FOUND."""
        _validate.check_id(profile_id, "profile_id")
        ns = _validate.check_namespaces(namespaces)
        size = paging.page_size(page_size, *self._sample_page)
        cursor = paging.decode_token(page_token, "samples", profile_id)
        query = sa.select(samples).where(samples.c.profile_id == profile_id)
        if cursor is not None:
            query = query.where(samples.c.seq > _validate.check_seq_cursor(cursor))
        with self._tx(write=False) as conn:
            _queries.require_profile(conn, profile_id, ns)
            rows = list(conn.execute(query.order_by(samples.c.seq).limit(size + 1)).mappings())
        items = [_rows.sample_from_row(r) for r in rows[:size]]
        if len(rows) <= size:
            return items, ""
        return items, paging.encode_token("samples", profile_id, [items[-1].seq])

    def all_samples(self, profile_id: str, namespaces: Namespaces = None) -> list[Sample]:
        """Every sample of the profile, in seq order."""
        _validate.check_id(profile_id, "profile_id")
        ns = _validate.check_namespaces(namespaces)
        query = sa.select(samples).where(samples.c.profile_id == profile_id)
        with self._tx(write=False) as conn:
            _queries.require_profile(conn, profile_id, ns)
            rows = conn.execute(query.order_by(samples.c.seq)).mappings()
            return [_rows.sample_from_row(r) for r in rows]

    def count_samples(self, profile_id: str, namespaces: Namespaces = None) -> int:
        """The profile's samples: its next seq (seqs are 0..n-1, contiguous: one index
        lookup, not a count of n rows)."""
        _validate.check_id(profile_id, "profile_id")
        ns = _validate.check_namespaces(namespaces)
        with self._tx(write=False) as conn:
            _queries.require_profile(conn, profile_id, ns)
            return _queries.next_seq(conn, profile_id)

    # ---- cost models -------------------------------------------------------------------

    def create_cost_model(
        self, cost_model: CostModel, namespaces: Namespaces = None
    ) -> tuple[CostModel, bool]:
        """Store a fitted cost model; returns (stored, created). Idempotent on request_id.
        A non-empty profile_id must name a stored profile in `namespaces` (else NOT_FOUND),
        and the cost model must be in that profile's namespace (else NAMESPACE_MISMATCH)."""
        cm = _validate.check_cost_model(cost_model)
        ns = _validate.check_namespaces(namespaces)
        cm = dataclasses.replace(cm, id=cm.id or _new_id("cm"), create_time=utcnow())
        try:
            with self._tx(write=True) as conn:
                if cm.request_id and (existing := _queries.cost_model_by_request(conn, cm)):
                    return existing, False
                if cm.profile_id:
                    profile = _queries.get_profile(conn, cm.profile_id, "profile_id", namespaces=ns)
                    if profile.namespace != cm.namespace:
                        raise invalid(
                            "namespace",
                            NAMESPACE_MISMATCH,
                            f"a cost model's namespace must be its profile's: profile "
                            f"{cm.profile_id} is in namespace {profile.namespace!r}, the cost "
                            f"model in {cm.namespace!r}",
                        )
                conn.execute(cost_models.insert().values(_rows.cost_model_row(cm)))
                return _queries.get_cost_model(conn, cm.id), True
        except IntegrityError:
            with self._tx(write=False) as conn:
                if cm.request_id and (existing := _queries.cost_model_by_request(conn, cm)):
                    return existing, False
            raise AlreadyExists(
                COST_MODEL_ALREADY_EXISTS, f"a cost model with id {cm.id!r} exists", field="id"
            ) from None

    def get_cost_model(self, cost_model_id: str, namespaces: Namespaces = None) -> CostModel:
        _validate.check_id(cost_model_id, "id")
        ns = _validate.check_namespaces(namespaces)
        return self._read(lambda conn: _queries.get_cost_model(conn, cost_model_id, ns))

    def list_cost_models(
        self,
        page_size: int,
        page_token: str,
        profile_id: str = "",
        namespaces: Namespaces = None,
    ) -> tuple[list[CostModel], str]:
        """Newest first, only those in `namespaces`, optionally only those fitted to
        `profile_id` (a profile outside `namespaces` simply lists nothing)."""
        _validate.check_id(profile_id, "profile_id", allow_empty=True)
        ns = _validate.check_namespaces(namespaces)
        size = paging.page_size(page_size, *self._object_page)
        if profile_id:
            # one profile's cost models: the (profile_id, create_time, id) range, with the
            # namespaces as a filter on it (a profile is in one namespace): not merged
            return self._newest_first(
                cost_models,
                {"profile_id": profile_id},
                ns,
                size,
                page_token,
                "cost_models",
                _listing_filter(profile_id, ns),
                _rows.cost_model_from_row,
                merge=False,
            )
        return self._newest_first(
            cost_models, {}, ns, size, page_token, "cost_models",
            _listing_filter(profile_id, ns), _rows.cost_model_from_row,
        )  # fmt: skip
