"""The database connection pool: sized from StoreConfig (IDEALRT_STORE_POOL_SIZE,
IDEALRT_STORE_MAX_OVERFLOW, IDEALRT_STORE_POOL_TIMEOUT_S), a QueuePool whose dropped
PostgreSQL connections are replaced (no pre-ping: the work is begun again), an exhausted
pool answered UNAVAILABLE STORE_POOL_EXHAUSTED (over gRPC too), and the hot statements
prepared on the server. PostgreSQL tests run on a real server."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from sqlalchemy.pool import QueuePool, StaticPool

from idealrt.core.config import StoreConfig
from idealrt.core.domain import Profile, ProfileState, Sample
from idealrt.core.errors import Unavailable
from idealrt.core.grpc_client import from_rpc_error
from idealrt.services.store.repository import PoolLimits, Store, open_store
from idealrt.services.store.server import build_server
from idealrt.store.v1 import store_service_pb2 as pb
from idealrt.store.v1 import store_service_pb2_grpc as pbg

MakeProfile = Callable[..., Profile]
postgres = pytest.mark.postgres


def test_pool_settings_come_from_the_environment() -> None:
    cfg = StoreConfig.from_env(
        {
            "IDEALRT_STORE_POOL_SIZE": "4",
            "IDEALRT_STORE_MAX_OVERFLOW": "0",
            "IDEALRT_STORE_POOL_TIMEOUT_S": "2.5",
        }
    )
    assert (cfg.pool_size, cfg.max_overflow, cfg.pool_timeout_s) == (4, 0, 2.5)
    default = StoreConfig.from_env({})
    assert (default.pool_size, default.max_overflow, default.pool_timeout_s) == (16, 8, 10.0)
    assert PoolLimits() == PoolLimits(
        default.pool_size, default.max_overflow, default.pool_timeout_s
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IDEALRT_STORE_POOL_SIZE", "0"),
        ("IDEALRT_STORE_MAX_OVERFLOW", "-1"),
        ("IDEALRT_STORE_POOL_TIMEOUT_S", "0"),
        ("IDEALRT_STORE_POOL_SIZE", "many"),
    ],
)
def test_bad_pool_settings_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        StoreConfig.from_env({name: value})


@pytest.mark.parametrize(
    "limits", [{"size": 0}, {"max_overflow": -1}, {"timeout_s": 0.0}, {"timeout_s": float("nan")}]
)
def test_bad_pool_limits_are_refused(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="pool limits"):
        PoolLimits(**limits)  # type: ignore[arg-type]


def test_sqlite_files_get_the_pool_memory_one_connection(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path}/x.db", pool=PoolLimits(3, 1, 0.5)) as st:
        pool = st._engine.pool
        assert isinstance(pool, QueuePool)
        assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 1, 0.5)
    with open_store("sqlite://", pool=PoolLimits(3, 1, 0.5)) as st:
        assert isinstance(st._engine.pool, StaticPool)


# ---- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def small_pool(pg_database_url: str) -> Iterator[Store]:
    """A PostgreSQL store with a pool of 2 connections, no overflow, 0.3 s timeout."""
    with open_store(pg_database_url, pool=PoolLimits(size=2, max_overflow=0, timeout_s=0.3)) as st:
        yield st


@contextlib.contextmanager
def _holding(st: Store, n: int) -> Iterator[None]:
    """`n` of the store's pooled connections checked out (as by n long transactions)."""
    with contextlib.ExitStack() as stack:
        for _ in range(n):
            stack.enter_context(st._engine.connect())
        yield


@postgres
def test_postgres_pool_is_sized_and_not_pre_pinged(small_pool: Store) -> None:
    """No SELECT 1 per checkout: a dropped connection is caught by its first statement
    and the work begun again (test_dropped_connections_are_replaced_not_errors)."""
    pool = small_pool._engine.pool
    assert isinstance(pool, QueuePool)
    assert (pool.size(), pool._max_overflow, pool._timeout, pool._pre_ping) == (2, 0, 0.3, False)


@postgres
def test_an_exhausted_pool_is_unavailable_then_recovers(
    small_pool: Store, make_profile: MakeProfile
) -> None:
    p, _ = small_pool.create_profile(make_profile())
    with _holding(small_pool, 2):
        began = time.monotonic()
        with pytest.raises(Unavailable) as info:
            small_pool.get_profile(p.id)
        waited = time.monotonic() - began
        assert info.value.reason == "STORE_POOL_EXHAUSTED"
        assert waited >= 0.3  # it waited its timeout for a connection, no longer than needed
        with pytest.raises(Unavailable):  # a write too, and it writes nothing
            small_pool.append_samples(p.id, "b", [Sample(1, 1, 1, (), 1)])
    assert small_pool.get_profile(p.id) == p  # connections back: served again
    assert small_pool.count_samples(p.id) == 0


@postgres
def test_a_caller_waits_for_a_connection_within_the_timeout(
    pg_database_url: str, make_profile: MakeProfile
) -> None:
    """Busy, not exhausted: a connection returned before the timeout serves the waiter."""
    with open_store(pg_database_url, pool=PoolLimits(1, 0, 5.0)) as st:
        p, _ = st.create_profile(make_profile())
        held = st._engine.connect()
        release = threading.Timer(0.2, held.close)
        release.start()
        try:
            assert st.get_profile(p.id) == p
        finally:
            release.join()


@postgres
def test_an_exhausted_pool_is_unavailable_over_grpc(
    small_pool: Store, make_profile: MakeProfile
) -> None:
    """The RPC answers UNAVAILABLE with ErrorInfo reason STORE_POOL_EXHAUSTED (a plain
    channel, without the library's retries, to see the first answer)."""
    p, _ = small_pool.create_profile(make_profile())
    server, port = build_server(StoreConfig(address="127.0.0.1:0"), store=small_pool)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.StoreServiceStub(channel)
            with _holding(small_pool, 2), pytest.raises(grpc.RpcError) as info:
                stub.GetProfile(pb.GetProfileRequest(id=p.id), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert from_rpc_error(info.value).reason == "STORE_POOL_EXHAUSTED"
            assert stub.GetProfile(pb.GetProfileRequest(id=p.id), timeout=30).profile.id == p.id
    finally:
        server.stop(0)


def _drop_pooled(st: Store, pg_server_url: str, n: int) -> None:
    """Have the server terminate the backends of `n` of the store's pooled connections."""
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(st._engine.connect()) for _ in range(n)]
        pids = [c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() for c in conns]
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


@postgres
@pytest.mark.parametrize("call", ["get", "list", "append", "update"])
def test_dropped_connections_are_replaced_not_errors(
    small_pool: Store, pg_server_url: str, make_profile: MakeProfile, call: str
) -> None:
    """Every pooled connection dropped by the server: a read (one statement, no
    transaction) and a write (its BEGIN fails first) each run again on a fresh
    connection, at once (the backends may not even have exited yet)."""
    p, _ = small_pool.create_profile(make_profile(state=ProfileState.RUNNING))
    _drop_pooled(small_pool, pg_server_url, 2)
    if call == "get":
        assert small_pool.get_profile(p.id) == p
    elif call == "list":
        assert small_pool.list_profiles(10, "")[0] == [p]
    elif call == "append":
        assert small_pool.append_samples(p.id, "b", [Sample(1, 1, 1, (), 1)]) == 1
    else:
        small_pool.update_profile(dataclasses.replace(p, completed_samples=1))
        assert small_pool.get_profile(p.id).completed_samples == 1


@postgres
def test_the_append_path_runs_prepared_statements(
    pg_database_url: str, make_profile: MakeProfile
) -> None:
    """After a few appends on a connection, its hot statements are prepared on the server
    (psycopg prepares a statement the 5th time it runs on a connection)."""
    with open_store(pg_database_url, pool=PoolLimits(1, 0, 5.0)) as st:
        p, _ = st.create_profile(make_profile(state=ProfileState.RUNNING))
        for b in range(8):
            st.append_samples(p.id, f"b{b}", [Sample(1, 1, k, (1, 2), 3) for k in range(50)])
        with st._engine.connect() as conn:  # the one pooled connection the appends used
            prepared = conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements")
            statements = [str(s) for s in prepared.scalars()]
    assert any("FOR UPDATE" in s and "profiles" in s for s in statements), statements
    assert any(s.startswith("INSERT INTO samples") for s in statements), statements
