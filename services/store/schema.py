"""The store's relational schema (SQLAlchemy Core) and its ordered migrations.

`schema_version` holds one row per applied migration; the database's version is the largest.
`migrate(engine)` runs at every open, in one transaction that holds a lock (SQLite: BEGIN
IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock), so concurrent openers neither
race nor half-apply: it creates `schema_version` if missing, applies each migration newer
than the database, and refuses (FailedPrecondition SCHEMA_TOO_NEW) a database written by a
newer idealrt. Opening an up-to-date database is one SELECT.

Adding a migration: append `(N, "what it does", fn)` to MIGRATIONS and bump SCHEMA_VERSION;
never edit an applied one. `_create_v1` builds its tables from `_v1_metadata()`, a frozen
copy of the v1 shape; the module-level tables below describe the *current* shape
(`_current_metadata()`: v1 plus what later migrations added), and a fresh database reaches
it through the same migrations as an old one.

Versions: 1 the tables; 2 namespaces: a NOT NULL `namespace` column (server default
'default', so every existing row lands in the default namespace) on profiles and cost_models,
with (namespace, ...) indexes for listing one namespace newest first. Samples and sample
batches carry no namespace of their own: they belong to their profile, and every read of
them goes through it. 3 timing evidence: samples get `timing` (how the times were
obtained, `SampleTiming`'s value) and `chunks` (stream chunks that carried text); existing
rows read 'server_steps' and 0, except those whose own times show they were not timed step
by step (no prefill, or no decode steps for o >= 2: an HTTP target's), which become
'totals_only'.

Conventions: times are UTCDateTime (PostgreSQL timestamptz; SQLite fixed-width text in UTC,
which sorts chronologically); JSON payloads are TEXT (see `_serde`); sample decode steps are
an int64 little-endian blob.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.types import TypeDecorator

from idealrt.core.clock import utcnow
from idealrt.core.domain import DEFAULT_NAMESPACE
from idealrt.core.errors import FailedPrecondition
from idealrt.core.namespaces import NAMESPACE_MAX_LEN
from idealrt.services.store._serde import to_utc
from idealrt.services.store.reasons import SCHEMA_TOO_NEW
from idealrt.services.store.url import BEGIN_OPTION

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "UTCDateTime",
    "cost_models",
    "current_version",
    "metadata",
    "migrate",
    "profiles",
    "sample_batches",
    "samples",
    "schema_version",
]

SCHEMA_VERSION = 3
ID_LEN = 64
REQUEST_ID_LEN = 256
NAME_LEN = 256
_PG_MIGRATION_LOCK = 0x1DEA1_57_0E  # advisory lock key: any constant unique to idealrt


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = to_utc(value)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else to_utc(value)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """SQLAlchemy's (process_bind_param, then the dialect's own), with a shortcut on
        SQLite for what the store writes: a datetime in UTC becomes the very text of
        SQLite's DATETIME ("YYYY-MM-DD HH:MM:SS.ffffff", its default storage format) by
        one str() call, a third of the general path's cost (a sample's start_time is
        bound once per appended sample). The shortcut is checked against the general path
        when the processor is built and left out if they ever differ."""
        general = super().bind_processor(dialect)
        if dialect.name != "sqlite" or general is None:
            return general
        probes = (datetime(1, 1, 1, tzinfo=UTC), datetime(2026, 5, 17, 3, 4, 5, 60, tzinfo=UTC))
        if any(_sqlite_text(t) != general(t) for t in probes):
            return general  # pragma: no cover - another storage format

        def process(value: Any) -> Any:
            if type(value) is datetime and value.tzinfo is UTC:
                return _sqlite_text(value)
            return general(value)

        return process


def _sqlite_text(value: datetime) -> str:
    """A UTC datetime as SQLite's DATETIME text: str() is isoformat(" "), less its
    "+00:00" (and the microseconds it leaves out when they are 0); faster than asking
    isoformat for microseconds."""
    text = str(value)[:-6]
    return text if value.microsecond else text + ".000000"


def _v1_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "schema_version",
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.String(NAME_LEN), nullable=False),
        sa.Column("applied_time", UTCDateTime, nullable=False),
    )
    sa.Table(
        "profiles",
        md,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("request_id", sa.String(REQUEST_ID_LEN), nullable=True, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.Column("start_time", UTCDateTime, nullable=True),
        sa.Column("end_time", UTCDateTime, nullable=True),
        sa.Column("completed_samples", sa.BigInteger, nullable=False),
        sa.Column("total_samples", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        # {"model", "stack", "plan", "target", "provenance", "model_spec"}
        sa.Column("payload", sa.Text, nullable=False),
        sa.Index("ix_profiles_create_time_id", "create_time", "id"),
        sa.Index("ix_profiles_state_create_time_id", "state", "create_time", "id"),
    )
    sa.Table(
        "sample_batches",
        md,
        sa.Column("profile_id", sa.String(ID_LEN), sa.ForeignKey("profiles.id"), primary_key=True),
        sa.Column("batch_id", sa.String(REQUEST_ID_LEN), primary_key=True),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
    )
    sa.Table(
        "samples",
        md,
        sa.Column("profile_id", sa.String(ID_LEN), sa.ForeignKey("profiles.id"), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("batch_id", sa.String(REQUEST_ID_LEN), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("prefill_ns", sa.BigInteger, nullable=False),
        sa.Column("total_ns", sa.BigInteger, nullable=False),
        sa.Column("decode_ns", sa.LargeBinary, nullable=False),  # int64 LE per step
        sa.Column("rpc_ns", sa.BigInteger, nullable=False),
        sa.Column("heldout", sa.Boolean, nullable=False),
        sa.Column("repeat", sa.Integer, nullable=False),
        sa.Column("flag", sa.String(16), nullable=False),
        sa.Column("contention", sa.Text, nullable=False),  # JSON, non-default fields only
        sa.Column("start_time", UTCDateTime, nullable=True),
    )
    sa.Table(
        "cost_models",
        md,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("request_id", sa.String(REQUEST_ID_LEN), nullable=True, unique=True),
        sa.Column("profile_id", sa.String(ID_LEN), sa.ForeignKey("profiles.id"), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(NAME_LEN), nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),  # the CostModel's other fields
        sa.Index("ix_cost_models_create_time_id", "create_time", "id"),
        sa.Index("ix_cost_models_profile_create_time_id", "profile_id", "create_time", "id"),
    )
    return md


def _namespace_column() -> sa.Column[str]:
    return sa.Column(
        "namespace",
        sa.String(NAMESPACE_MAX_LEN),
        nullable=False,
        server_default=DEFAULT_NAMESPACE,
    )


def _current_metadata() -> sa.MetaData:
    """v1 plus what migrations 2.. added (keep in step with them: a test compares this
    with a migrated database)."""
    md = _v1_metadata()
    prof, cms = md.tables["profiles"], md.tables["cost_models"]
    # v2: namespaces
    for table in (prof, cms, md.tables["sample_batches"], md.tables["samples"]):
        table.append_column(_namespace_column())
    prof.append_column(sa.Column("runner", sa.String(256), nullable=False, server_default=""))
    sa.Index(
        "ix_profiles_namespace_create_time_id", prof.c.namespace, prof.c.create_time, prof.c.id
    )
    sa.Index(
        "ix_profiles_namespace_state_create_time_id",
        prof.c.namespace, prof.c.state, prof.c.create_time, prof.c.id,
    )  # fmt: skip
    sa.Index(
        "ix_cost_models_namespace_create_time_id", cms.c.namespace, cms.c.create_time, cms.c.id
    )
    # v3: timing evidence
    smp = md.tables["samples"]
    smp.append_column(
        sa.Column("timing", sa.String(16), nullable=False, server_default="server_steps")
    )
    smp.append_column(sa.Column("chunks", sa.Integer, nullable=False, server_default="0"))
    return md


# The current shape.
metadata = _current_metadata()
schema_version = metadata.tables["schema_version"]
profiles = metadata.tables["profiles"]
sample_batches = metadata.tables["sample_batches"]
samples = metadata.tables["samples"]
cost_models = metadata.tables["cost_models"]


def _create_v1(conn: sa.Connection) -> None:
    md = _v1_metadata()
    tables = [t for t in md.sorted_tables if t.name != "schema_version"]
    md.create_all(conn, tables=tables, checkfirst=False)  # a clashing table is an error


def _add_namespaces_v2(conn: sa.Connection) -> None:
    """A namespace column on every table (profiles, cost_models, and, copied from their
    profile when appended, sample_batches and samples), NOT NULL DEFAULT 'default'
    (existing rows take the default, which is their profile's: before v2 every profile is
    in 'default'; one ALTER each on SQLite and PostgreSQL, no row rewrite on PostgreSQL
    11+), and the listing indexes. Frozen: it spells out its own DDL."""
    for table in ("profiles", "cost_models", "sample_batches", "samples"):
        conn.exec_driver_sql(
            f"ALTER TABLE {table} ADD COLUMN namespace VARCHAR(63) DEFAULT 'default' NOT NULL"
        )
    # the subject of the profiler that runs a profile (claimed when it writes RUNNING,
    # released when it writes QUEUED): only it writes the profile's samples and state
    conn.exec_driver_sql("ALTER TABLE profiles ADD COLUMN runner VARCHAR(256) DEFAULT '' NOT NULL")
    conn.exec_driver_sql(
        "CREATE INDEX ix_profiles_namespace_create_time_id ON profiles (namespace, create_time, id)"
    )
    conn.exec_driver_sql(
        "CREATE INDEX ix_profiles_namespace_state_create_time_id "
        "ON profiles (namespace, state, create_time, id)"
    )
    conn.exec_driver_sql(
        "CREATE INDEX ix_cost_models_namespace_create_time_id "
        "ON cost_models (namespace, create_time, id)"
    )


def _add_sample_timing_v3(conn: sa.Connection) -> None:
    """samples.timing VARCHAR(16) NOT NULL DEFAULT 'server_steps' and samples.chunks
    INTEGER NOT NULL DEFAULT 0 (one ALTER each, no row rewrite on PostgreSQL 11+); then
    the rows whose own times say they were not timed step by step (prefill 0, or no
    decode steps though o >= 2: what an HTTP target stored for a non-streamed or a
    several-tokens-a-chunk response) become 'totals_only', so that no old row claims
    evidence it never had. Frozen: it spells out its own DDL."""
    conn.exec_driver_sql(
        "ALTER TABLE samples ADD COLUMN timing VARCHAR(16) DEFAULT 'server_steps' NOT NULL"
    )
    conn.exec_driver_sql("ALTER TABLE samples ADD COLUMN chunks INTEGER DEFAULT 0 NOT NULL")
    conn.exec_driver_sql(
        "UPDATE samples SET timing = 'totals_only' "
        "WHERE prefill_ns = 0 OR (output_tokens >= 2 AND length(decode_ns) = 0)"
    )


Migration = tuple[int, str, Callable[[sa.Connection], None]]
MIGRATIONS: tuple[Migration, ...] = (
    (1, "profiles, samples, sample_batches, cost_models", _create_v1),
    (2, "a namespace column on every table (existing rows: default)", _add_namespaces_v2),
    (3, "samples: timing and chunks (timing evidence)", _add_sample_timing_v3),
)
assert [m[0] for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def current_version(conn: sa.Connection) -> int:
    """The database's schema version (0: empty database)."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    value = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(value or 0)


def _too_new(found: int) -> FailedPrecondition:
    return FailedPrecondition(
        SCHEMA_TOO_NEW,
        f"the store's schema is version {found}, newer than this idealrt understands "
        f"({SCHEMA_VERSION}); upgrade idealrt to open it",
        field="store_url",
    )


def migrate(engine: Engine) -> int:
    """Bring the database up to SCHEMA_VERSION; returns the version found before."""
    with engine.connect() as probe:  # fast path, no lock: already current (or too new)
        found = current_version(probe)
        probe.rollback()
    if found > SCHEMA_VERSION:
        raise _too_new(found)
    if found == SCHEMA_VERSION:
        return found
    locked = engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
    with locked.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
        schema_version.create(conn, checkfirst=True)
        found = current_version(conn)  # again, under the lock
        if found > SCHEMA_VERSION:
            raise _too_new(found)
        for version, description, apply in MIGRATIONS:
            if version > found:
                apply(conn)
                conn.execute(
                    schema_version.insert().values(
                        version=version, description=description, applied_time=utcnow()
                    )
                )
    return found
