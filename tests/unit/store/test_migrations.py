from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from idealrt.core.domain import Profile
from idealrt.core.errors import FailedPrecondition
from idealrt.services.store import schema
from idealrt.services.store.repository import Store, open_store
from idealrt.services.store.url import create_store_engine, parse_store_url

MakeProfile = Callable[..., Profile]


@contextmanager
def raw(url: str) -> Iterator[sa.Engine]:
    engine = create_store_engine(parse_store_url(url))
    try:
        yield engine
    finally:
        engine.dispose()


def versions(url: str) -> list[int]:
    with raw(url) as engine, engine.connect() as conn:
        rows = conn.execute(sa.select(schema.schema_version.c.version).order_by("version"))
        return [r[0] for r in rows]


def test_fresh_database_gets_current_schema(store_url: str) -> None:
    with open_store(store_url) as st:
        assert st.list_profiles(0, "") == ([], "")
        with st._engine.connect() as conn:  # the store's own engine: works in memory too
            assert schema.current_version(conn) == schema.SCHEMA_VERSION
            tables = set(sa.inspect(conn).get_table_names())
    assert {"schema_version", "profiles", "samples", "sample_batches", "cost_models"} <= tables


def test_open_twice_is_idempotent(durable_store_url: str, make_profile: MakeProfile) -> None:
    with open_store(durable_store_url) as st:
        p, _ = st.create_profile(make_profile())
    with open_store(durable_store_url) as st:
        assert st.get_profile(p.id) == p
    with open_store(durable_store_url) as st:
        assert len(st.list_profiles(0, "")[0]) == 1
    assert versions(durable_store_url) == list(range(1, schema.SCHEMA_VERSION + 1))


def test_newer_schema_is_refused_untouched(
    durable_store_url: str, make_profile: MakeProfile
) -> None:
    with open_store(durable_store_url) as st:
        st.create_profile(make_profile())
    future = schema.SCHEMA_VERSION + 5
    with raw(durable_store_url) as engine, engine.begin() as conn:
        conn.execute(
            schema.schema_version.insert().values(
                version=future, description="from the future", applied_time=datetime.now(UTC)
            )
        )
    with pytest.raises(FailedPrecondition) as info:
        open_store(durable_store_url)
    assert (info.value.reason, info.value.field) == ("SCHEMA_TOO_NEW", "store_url")
    assert versions(durable_store_url)[-1] == future
    with raw(durable_store_url) as engine, engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.profiles)).scalar() == 1


def test_later_migration_applies_once_and_atomically(
    durable_store_url: str, make_profile: MakeProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(durable_store_url) as st:
        p, _ = st.create_profile(make_profile())
    base = schema.SCHEMA_VERSION

    def add_notes(conn: sa.Connection) -> None:
        conn.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")

    def broken(conn: sa.Connection) -> None:
        conn.exec_driver_sql("CREATE TABLE half_done (id INTEGER PRIMARY KEY)")
        raise RuntimeError("migration bug")

    # A failing migration leaves nothing behind: DDL and version row roll back together.
    monkeypatch.setattr(schema, "SCHEMA_VERSION", base + 1)
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, (base + 1, "broken", broken)))
    with pytest.raises(RuntimeError, match="migration bug"):
        open_store(durable_store_url)
    assert versions(durable_store_url) == list(range(1, base + 1))
    with raw(durable_store_url) as engine, engine.connect() as conn:
        assert not sa.inspect(conn).has_table("half_done")

    calls = []

    def counted(conn: sa.Connection) -> None:
        calls.append(1)
        add_notes(conn)

    monkeypatch.setattr(
        schema, "MIGRATIONS", (*schema.MIGRATIONS[:base], (base + 1, "notes", counted))
    )
    with open_store(durable_store_url) as st:
        assert st.get_profile(p.id) == p
    with open_store(durable_store_url) as st:
        assert st.get_profile(p.id) == p
    assert calls == [1]
    assert versions(durable_store_url) == list(range(1, base + 2))


def _open_at_once(url: str, n: int = 5) -> list[BaseException]:
    """Open the store at `url` from `n` threads released together; the errors raised."""
    stores: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def opener() -> None:
        barrier.wait()
        try:
            stores.append(open_store(url))
        except BaseException as exc:  # pragma: no cover - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for st in stores:
        st.close()
    return errors


def test_concurrent_opens_of_a_fresh_database(durable_store_url: str) -> None:
    assert not (errors := _open_at_once(durable_store_url)), errors
    assert versions(durable_store_url) == list(range(1, schema.SCHEMA_VERSION + 1))


def test_racing_first_opens_of_sqlite_files(tmp_path: Path) -> None:
    """Five threads open each of 20 fresh SQLite files at once. Switching a fresh file to WAL
    needs an exclusive lock and SQLite answers SQLITE_BUSY there without waiting; before the
    retry, about one file in 15 failed an opener with "database is locked"."""
    for i in range(20):
        url = f"sqlite:///{tmp_path}/{i}/idealrt.db"
        assert not (errors := _open_at_once(url)), (i, errors)
        assert versions(url) == list(range(1, schema.SCHEMA_VERSION + 1))
