"""The store on a real PostgreSQL server, across processes and server restarts.

The unit suite (tests/unit/store) already runs every store behaviour on PostgreSQL, several
processes included; this module covers what needs control of the server (a throwaway server
of its own, started by scripts/pg-test-server.sh; skipped only when no PostgreSQL binaries
exist: `apt-get install -y postgresql`) and real CREATE DATABASE databases.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec
from idealrt.core.errors import Unavailable
from idealrt.services.store.repository import open_store

pytestmark = pytest.mark.postgres

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pg-test-server.sh"


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """(maintenance URL, server dir) of a server this module owns."""
    proc = _script("start")
    if proc.returncode == 3:
        pytest.skip(f"no PostgreSQL binaries: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    env = dict(
        line.removeprefix("export ").replace("'", "").split("=", 1)
        for line in proc.stdout.splitlines()
    )
    try:
        yield env["IDEALRT_TEST_POSTGRES_URL"], env["IDEALRT_PG_TEST_DIR"]
    finally:
        _script("stop", env["IDEALRT_PG_TEST_DIR"])


@pytest.fixture
def db_url(server: tuple[str, str]) -> Iterator[str]:
    """A fresh database (a real CREATE DATABASE here, as a deployment would have)."""
    admin_url, _ = server
    name = f"idealrt_it_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _profile(request_id: str = "") -> Profile:
    return Profile(
        id="",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(),
        plan=ProfilePlan((1, 8), (1, 4)),
        request_id=request_id,
    )


def test_postgres_column_types(db_url: str) -> None:
    open_store(db_url).close()
    engine = sa.create_engine(sa.make_url(db_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            columns = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns("samples")}
    finally:
        engine.dispose()
    assert isinstance(columns["decode_ns"], sa.LargeBinary)  # bytea
    assert isinstance(columns["start_time"], sa.DateTime) and columns["start_time"].timezone


def test_server_away_is_unavailable_and_store_recovers(
    server: tuple[str, str], db_url: str
) -> None:
    _, server_dir = server
    st = open_store(db_url)
    try:
        p, _ = st.create_profile(_profile("r-1"))
        assert _script("pause", server_dir).returncode == 0
        try:
            with pytest.raises(Unavailable) as info:
                st.get_profile(p.id)
            assert info.value.reason == "STORE_UNAVAILABLE"
            with pytest.raises(Unavailable):
                open_store(db_url)
        finally:
            resumed = _script("resume", server_dir)
            assert resumed.returncode == 0, resumed.stderr
        assert st.get_profile(p.id) == p  # the same Store reconnects
        again, created = st.create_profile(_profile("r-1"))
        assert again == p and not created
    finally:
        st.close()


def test_unreachable_server_is_unavailable() -> None:
    with pytest.raises(Unavailable) as info:
        open_store("postgresql://postgres:pw@127.0.0.1:1/idealrt?connect_timeout=2")
    assert info.value.reason == "STORE_UNAVAILABLE"
    assert "pw" not in info.value.message
