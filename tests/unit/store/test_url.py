from __future__ import annotations

import sqlite3
import sys
import types
from pathlib import Path

import pytest

from idealrt.core import paging as _paging
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from idealrt.services.store import _serde, repository, schema
from idealrt.services.store import url as url_module
from idealrt.services.store.repository import open_store
from idealrt.services.store.url import create_store_engine, parse_store_url


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", " sqlite:// "])
def test_memory_urls(url: str) -> None:
    parsed = parse_store_url(url)
    assert parsed.backend == "sqlite" and parsed.memory and parsed.path is None


def test_sqlite_paths_follow_sqlalchemy_convention(tmp_path: Path) -> None:
    assert parse_store_url("sqlite:///rel/x.db").path == Path("rel/x.db")
    assert parse_store_url(f"sqlite:///{tmp_path}/x.db").path == tmp_path / "x.db"
    home = parse_store_url("sqlite:///~/x.db").path
    assert home is not None and home.is_absolute() and home.name == "x.db"


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://me@db.example:5433/idealrt", "postgresql+psycopg"),
        ("postgres://me@db.example/idealrt", "postgresql+psycopg"),
        ("postgresql+psycopg://me:secret@db.example/idealrt", "postgresql+psycopg"),
    ],
)
def test_postgres_urls_use_psycopg3(url: str, driver: str) -> None:
    parsed = parse_store_url(url)
    assert parsed.backend == "postgresql"
    assert parsed.url.drivername == driver
    assert parsed.url.database == "idealrt"
    assert "secret" not in parsed.redacted()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "not a url",
        "/var/lib/idealrt.db",
        "mysql://u@h/db",
        "postgresql+psycopg2://u@h/db",
        "sqlite+aiosqlite:///x.db",
        "sqlite://host/x.db",
        "sqlite:///x.db?mode=ro",
        "sqlite:///file:x.db",
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_store_url(url)
    assert info.value.reason == "STORE_URL_INVALID"
    assert info.value.field == "store_url"


def test_directory_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_store_url(f"sqlite:///{tmp_path}")
    assert info.value.field == "store_url"


def test_open_store_rejects_bad_url_before_touching_disk(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        open_store(f"sqlite:///{tmp_path}/a/b.db?x=1")
    assert not (tmp_path / "a").exists()


def test_missing_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail
    with pytest.raises(FailedPrecondition) as info:
        open_store("postgresql://me@127.0.0.1:1/idealrt")
    assert info.value.reason == "POSTGRES_DRIVER_MISSING"
    assert "pip install idealrt[postgres]" in info.value.message


def test_sqlite_file_engine_is_durable(tmp_path: Path) -> None:
    """WAL + synchronous=FULL (2) + foreign keys on every connection; parents created."""
    engine = create_store_engine(parse_store_url(f"sqlite:///{tmp_path}/deep/er/x.db"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()
    assert (tmp_path / "deep" / "er" / "x.db").exists()


def test_sqlite_lock_timeout_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding SQLite's write lock past the busy timeout: the write fails
    as Unavailable STORE_UNAVAILABLE (retryable), writes nothing, and works once released."""
    monkeypatch.setattr(url_module, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "x.db"
    with open_store(f"sqlite:///{db}") as st:
        p = Profile(id="", model=ModelRef(), stack=StackSpec(), plan=ProfilePlan((1,), (1,)))
        holder = sqlite3.connect(db, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(Unavailable) as info:
                st.create_profile(p)
            assert info.value.reason == "STORE_UNAVAILABLE"
            assert st.list_profiles(0, "") == ([], "")  # WAL: reads go on meanwhile
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        st.create_profile(p)
        assert len(st.list_profiles(0, "")[0]) == 1


@pytest.mark.parametrize("module", [repository, schema, url_module, _serde, _paging])
def test_all_is_what_it_claims(module: types.ModuleType) -> None:
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name
