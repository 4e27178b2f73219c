"""Store fixtures: every test that takes `store_url` / `store` runs on SQLite (a file in
tmp_path and in-memory) and on PostgreSQL (marked `postgres`).

PostgreSQL: IDEALRT_TEST_POSTGRES_URL if set, else a throwaway
server started once per session by scripts/pg-test-server.sh (initdb + pg_ctl from PATH or
/usr/lib/postgresql/*/bin). The tests skip only when no PostgreSQL binaries exist; a server
that fails to start is an error, not a skip. Each test gets a fresh schema (the user of
IDEALRT_TEST_POSTGRES_URL needs CREATE on its database).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from idealrt.core.domain import (
    Backend,
    ContentionObservation,
    ModelRef,
    Profile,
    ProfilePlan,
    Sample,
    SampleFlag,
    StackSpec,
)
from idealrt.services.store.repository import Store, open_store

REPO = Path(__file__).resolve().parents[3]
PG_SCRIPT = REPO / "scripts" / "pg-test-server.sh"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database (see module docstring)."""
    url = os.environ.get("IDEALRT_TEST_POSTGRES_URL", "")
    if url:
        yield url
        return
    proc = subprocess.run(
        [str(PG_SCRIPT), "start"], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode == 3:
        pytest.skip(f"no PostgreSQL binaries: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(f"scripts/pg-test-server.sh start failed:\n{proc.stderr}")
    env = dict(
        line.removeprefix("export ").replace("'", "").split("=", 1)
        for line in proc.stdout.splitlines()
        if "=" in line
    )
    try:
        yield env["IDEALRT_TEST_POSTGRES_URL"]
    finally:
        subprocess.run(
            [str(PG_SCRIPT), "stop", env["IDEALRT_PG_TEST_DIR"]], timeout=120, check=False
        )


def _admin(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture
def pg_database_url(pg_server_url: str) -> Iterator[str]:
    """A store URL for a fresh, empty schema on the test server, dropped afterwards. (A
    schema, selected by search_path in the URL, is milliseconds; CREATE DATABASE is ~0.4 s.)"""
    name = f"idealrt_test_{secrets.token_hex(6)}"
    with _admin(pg_server_url) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        url = sa.make_url(pg_server_url).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with _admin(pg_server_url) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


BACKENDS = [
    "sqlite-file",
    "sqlite-memory",
    pytest.param("postgres", marks=pytest.mark.postgres),
]
DURABLE_BACKENDS = ["sqlite-file", pytest.param("postgres", marks=pytest.mark.postgres)]


def _url_for(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> str:
    if backend == "sqlite-file":
        return f"sqlite:///{tmp_path}/store/idealrt.db"
    if backend == "sqlite-memory":
        return "sqlite://"
    url: str = request.getfixturevalue("pg_database_url")
    return url


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url_for(request, tmp_path, request.param)


@pytest.fixture(params=DURABLE_BACKENDS)
def durable_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store that outlives the Store object (not in-memory)."""
    return _url_for(request, tmp_path, request.param)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    st = open_store(store_url)
    try:
        yield st
    finally:
        st.close()


# ---- builders (factories as fixtures: test modules cannot import conftest) ---------------


def _make_profile(**changes: object) -> Profile:
    base = Profile(
        id="",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
        plan=ProfilePlan(prompt_tokens=(1, 16, 64), output_tokens=(1, 8)),
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def _make_sample(i: int = 0, **changes: object) -> Sample:
    fields: dict[str, object] = {
        "prompt_tokens": 16 + i,
        "output_tokens": 4,
        "prefill_ns": 1_000_000 + i,
        "decode_ns": (300_000 + i, 301_000, 302_000),
        "total_ns": 1_903_000 + i,
        "start_time": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "rpc_ns": 2_500_000,
        "repeat": i % 3,
        "flag": SampleFlag.OK,
        "contention": ContentionObservation(foreign_cpu_s=0.001 * i, energy_source="rapl"),
    }
    fields.update(changes)
    return Sample(**fields)


@pytest.fixture
def make_profile() -> Callable[..., Profile]:
    return _make_profile


@pytest.fixture
def make_sample() -> Callable[..., Sample]:
    return _make_sample
