"""The store servicer's cache of GetProfile/ListProfiles answers (services/store/_read_cache):
never an answer older than the database, whoever wrote to it.

The servicer is called in process (no server: the cache lives in the servicer, and what is
tested is which answers it gives, not the transport); the other writer is a second Store
on the same file, as another store process would be, and a separate process writing with
the sqlite3 module alone."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from idealrt.common.v1 import resources_pb2 as rpb
from idealrt.core.domain import Profile, ProfileState
from idealrt.services.store._read_cache import ReadCache
from idealrt.services.store.repository import open_store
from idealrt.services.store.servicer import StoreServicer
from idealrt.store.v1 import store_service_pb2 as pb

CTX: Any = None  # the servicer's RPCs do not use their context


def test_entries_answer_only_at_their_generation_and_are_bounded() -> None:
    cache: ReadCache[str] = ReadCache(size=2)
    cache.put("a", 1, "A")
    assert cache.get("a", 1) == "A"
    assert cache.get("a", 2) is None  # the database moved on
    cache.put("b", 1, "B")
    cache.put("c", 1, "C")  # evicts the oldest
    assert len(cache) == 2 and cache.get("a", 1) is None and cache.get("c", 1) == "C"
    with pytest.raises(ValueError):
        ReadCache(size=0)


def test_the_generation_moves_with_every_commit_from_any_connection(
    durable_store_url: str, make_profile: Callable[..., Profile]
) -> None:
    """SQLite's data_version and PostgreSQL's snapshot: unchanged by reads, moved by a
    commit of another Store (another process's pool) and of this Store's own pool."""
    with open_store(durable_store_url) as one, open_store(durable_store_url) as other:
        g0 = one.read_generation()
        assert g0 is not None
        one.list_profiles(10, "")  # reads commit nothing
        assert one.read_generation() == g0
        other.create_profile(make_profile())
        g1 = one.read_generation()
        assert g1 != g0
        one.create_profile(make_profile())  # this Store's own pool: not the watch conn
        assert one.read_generation() != g1


def test_no_generation_without_a_counter(make_profile: Callable[..., Profile]) -> None:
    """An in-memory SQLite has no second connection to watch it: every call reads."""
    with open_store("sqlite://") as st:
        assert st.read_generation() is None
        sv = StoreServicer(st)
        p, _ = st.create_profile(make_profile())
        sv.GetProfile(pb.GetProfileRequest(id=p.id), CTX)
        assert len(sv._gets) == 0


def test_answers_follow_writes_by_another_store(
    durable_store_url: str, make_profile: Callable[..., Profile]
) -> None:
    url = durable_store_url
    with open_store(url) as served, open_store(url) as writer:
        sv = StoreServicer(served)
        p, _ = writer.create_profile(make_profile())
        get = pb.GetProfileRequest(id=p.id)
        page = pb.ListProfilesRequest(page_size=10)
        first = sv.GetProfile(get, CTX)
        assert sv.GetProfile(get, CTX) is first  # a repeat: cached
        assert len(sv.ListProfiles(page, CTX).profiles) == 1

        writer.update_profile(dataclasses.replace(p, state=ProfileState.RUNNING))
        writer.create_profile(make_profile())
        assert sv.GetProfile(get, CTX).profile.state == rpb.PROFILE_STATE_RUNNING
        assert len(sv.ListProfiles(page, CTX).profiles) == 2


def test_a_commit_by_another_process_is_seen(
    tmp_path: Path, make_profile: Callable[..., Profile]
) -> None:
    """The writer is a separate process using the sqlite3 module alone (no idealrt code):
    the counter is SQLite's, not something idealrt's writers bump."""
    path = tmp_path / "s.sqlite"
    with open_store(f"sqlite:///{path}") as st:
        sv = StoreServicer(st)
        p, _ = st.create_profile(make_profile())
        get = pb.GetProfileRequest(id=p.id)
        assert sv.GetProfile(get, CTX).profile.error == ""
        code = (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute(\"UPDATE profiles SET error = 'set elsewhere' WHERE id = ?\", "
            "(sys.argv[2],)); c.commit()"
        )
        subprocess.run([sys.executable, "-c", code, str(path), p.id], check=True)
        with sqlite3.connect(path) as check:  # the write landed
            assert check.execute("SELECT error FROM profiles").fetchone()[0] == "set elsewhere"
        assert sv.GetProfile(get, CTX).profile.error == "set elsewhere"


def test_visibility_is_part_of_the_key(
    tmp_path: Path, make_profile: Callable[..., Profile]
) -> None:
    """One caller's cached page is never another namespace filter's answer."""
    with open_store(f"sqlite:///{tmp_path}/s.sqlite") as st:
        sv = StoreServicer(st)
        st.create_profile(make_profile(namespace="team-a"))
        st.create_profile(make_profile(namespace="team-b"))
        both = sv.ListProfiles(pb.ListProfilesRequest(page_size=10), CTX)
        only_a = sv.ListProfiles(pb.ListProfilesRequest(page_size=10, namespaces=["team-a"]), CTX)
        assert len(both.profiles) == 2
        assert [x.namespace for x in only_a.profiles] == ["team-a"]


@pytest.mark.postgres
def test_a_postgres_commit_by_another_process_is_seen(
    pg_database_url: str, make_profile: Callable[..., Profile]
) -> None:
    """PostgreSQL: the writer is a separate process using psycopg alone (no idealrt code),
    as another store replica or an operator's script would be: its commit moves the
    snapshot, and the cached answer is not served again."""
    with open_store(pg_database_url) as st:
        sv = StoreServicer(st)
        p, _ = st.create_profile(make_profile())
        get = pb.GetProfileRequest(id=p.id)
        first = sv.GetProfile(get, CTX)
        assert sv.GetProfile(get, CTX) is first  # cached while nothing commits
        code = (
            "import psycopg, sys; c = psycopg.connect(sys.argv[1], autocommit=True); "
            "c.execute(\"UPDATE profiles SET error = 'set elsewhere' WHERE id = %s\", "
            "(sys.argv[2],))"
        )
        subprocess.run([sys.executable, "-c", code, pg_database_url, p.id], check=True)
        assert sv.GetProfile(get, CTX).profile.error == "set elsewhere"
