"""The ingest hot path: what an append sends to the database (a fixed handful of
statements, the samples in multi-row INSERTs of up to 500 rows on SQLite and one INSERT of
one array per column on PostgreSQL, compiled statements served from SQLAlchemy's cache),
and the group commit that lets concurrent SQLite appends share one transaction without
sharing their failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from idealrt.core.domain import ContentionObservation, Profile, ProfileState, Sample
from idealrt.core.errors import AlreadyExists, NotFound
from idealrt.services.store import _rows
from idealrt.services.store._group_commit import GroupCommit
from idealrt.services.store.repository import Store
from idealrt.services.store.url import create_store_engine, parse_store_url

MakeProfile = Callable[..., Profile]
MakeSample = Callable[..., Sample]


def _statements(st: Store, call: Callable[[], object]) -> list[tuple[str, bool, Any]]:
    """(statement, executemany, SQLAlchemy's compiled-cache outcome) of what `call` runs."""
    seen: list[tuple[str, bool, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        seen.append((statement.strip(), many, getattr(ctx, "cache_hit", None)))

    sa.event.listen(st._engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        sa.event.remove(st._engine, "before_cursor_execute", record)
    return seen


@pytest.mark.parametrize("size", [1, 250, 2500])
def test_an_append_is_a_fixed_handful_of_statements(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample, size: int
) -> None:
    """Whatever the batch size: the profile, the batch id and last seq (on SQLite one
    statement; on PostgreSQL the profile locked, then the other two in one statement),
    the batch row, and the samples: on SQLite one multi-row INSERT of up to 500 rows (a
    larger batch: one executemany of 500-row INSERTs, then one of the rest), on
    PostgreSQL one INSERT of one array per column; the compiled statements come from
    SQLAlchemy's cache after the first append."""
    p, _ = store.create_profile(make_profile(state=ProfileState.RUNNING))
    store.append_samples(p.id, "warm-up", [make_sample(0)])
    batch = [make_sample(i) for i in range(size)]
    ran = _statements(store, lambda: store.append_samples(p.id, "b", batch))
    work = [s for s in ran if not s[0].upper().startswith(("BEGIN", "COMMIT", "SELECT 1"))]
    inserts = [s for s in work if s[0].startswith("INSERT INTO samples")]
    lookups = 1 if store.backend == "sqlite" else 2
    assert len(work) - len(inserts) == lookups + 1, work  # the lookups and the batch row
    if store.backend == "sqlite":
        full, rest = divmod(size, 500)
        assert [many for _, many, _ in inserts] == [full > 1] * bool(full) + [False] * bool(rest)
        per_row = 4 + len(_rows.SAMPLE_COLUMNS)  # profile_id, seq, batch_id, namespace
        assert [s.count("?") // per_row for s, _, _ in inserts] == [500] * bool(full) + [
            rest
        ] * bool(rest)
    else:
        assert [many for _, many, _ in inserts] == [False]
        assert "unnest(" in inserts[0][0]
    for statement, _, hit in work:
        if statement.startswith("INSERT INTO samples"):
            continue  # driver-level SQL, not compiled by SQLAlchemy
        assert "CACHE_HIT" in str(hit), (statement, hit)
    assert store.count_samples(p.id) == 1 + size


def test_replay_comparison_reads_only_the_batch(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample
) -> None:
    """A replay compares the stored batch by its seq range (not every sample of the
    profile) and field by field: equal samples are a replay, any difference is refused."""
    p, _ = store.create_profile(make_profile(state=ProfileState.RUNNING))
    first = [make_sample(i) for i in range(5)]
    store.append_samples(p.id, "a", first)
    store.append_samples(p.id, "b", [make_sample(i + 10) for i in range(5)])
    assert store.append_batch(p.id, "a", first).total_samples == 10
    neg_zero = [
        Sample(**{**vars(s), "contention": ContentionObservation(foreign_cpu_s=-0.0)})
        for s in first
    ]
    zero = [
        Sample(**{**vars(s), "contention": ContentionObservation(foreign_cpu_s=0.0)}) for s in first
    ]
    store.append_samples(p.id, "c", zero)
    assert store.append_samples(p.id, "c", neg_zero) == 5  # -0.0 is stored as 0.0: the same
    changed = [*first[:4], Sample(**{**vars(first[4]), "rpc_ns": 1})]
    with pytest.raises(AlreadyExists) as info:
        store.append_samples(p.id, "a", changed)
    assert info.value.reason == "BATCH_ID_REUSED"
    assert store.count_samples(p.id) == 15


# ---- group commit ---------------------------------------------------------------------------


@pytest.fixture
def notes(tmp_path: Path) -> Iterator[tuple[sa.Engine, GroupCommit, list[int]]]:
    """A GroupCommit over an SQLite file with a `notes` table; the list counts commits."""
    engine = create_store_engine(parse_store_url(f"sqlite:///{tmp_path}/notes.db"))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    commits: list[int] = []
    sa.event.listen(engine, "commit", lambda conn: commits.append(1))
    try:
        yield engine, GroupCommit(engine.begin), commits
    finally:
        engine.dispose()


def _note(body: str, fail: BaseException | None = None) -> Callable[[sa.Connection], int]:
    def job(conn: sa.Connection) -> int:
        conn.exec_driver_sql("INSERT INTO notes (body) VALUES (?)", (body,))
        if fail is not None:
            raise fail
        return int(conn.exec_driver_sql("SELECT count(*) FROM notes").scalar_one())

    return job


def _grouped(gc: GroupCommit, jobs: list[Callable[[sa.Connection], int]]) -> list[object]:
    """Run jobs[0] as the leader, held until jobs[1:] are all queued behind it, so that
    those run as one group; each thread's result or error."""
    release = threading.Event()
    outcomes: list[object] = [None] * len(jobs)

    def leader(conn: sa.Connection) -> int:
        release.wait(30)
        return jobs[0](conn)

    def submit(i: int, fn: Callable[[sa.Connection], int]) -> None:
        try:
            outcomes[i] = gc.run(fn)
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=submit, args=(0, leader))]
    threads[0].start()
    while not gc._queue:
        time.sleep(0.001)
    for i, fn in enumerate(jobs[1:], start=1):
        threads.append(threading.Thread(target=submit, args=(i, fn)))
        threads[-1].start()
    while len(gc._queue) < len(jobs):
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(30)
    return outcomes


def _bodies(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [
            str(b) for b in conn.exec_driver_sql("SELECT body FROM notes ORDER BY id").scalars()
        ]


def test_queued_jobs_share_one_commit(notes: tuple[sa.Engine, GroupCommit, list[int]]) -> None:
    engine, gc, commits = notes
    outcomes = _grouped(gc, [_note("lead"), _note("a"), _note("b"), _note("c")])
    assert outcomes[0] == 1
    assert sorted(outcomes[1:]) == [2, 3, 4]  # type: ignore[type-var]
    assert len(commits) == 2  # the leader's own, then one for the three queued behind it
    assert sorted(_bodies(engine)) == ["a", "b", "c", "lead"]


def test_a_domain_error_fails_only_its_job(
    notes: tuple[sa.Engine, GroupCommit, list[int]],
) -> None:
    """Its savepoint is rolled back (its insert undone); the others of its group commit."""
    engine, gc, _ = notes
    missing = NotFound("PROFILE_NOT_FOUND", "no such profile", field="profile_id")
    outcomes = _grouped(gc, [_note("lead"), _note("a"), _note("bad", missing), _note("c")])
    assert isinstance(outcomes[2], NotFound)
    assert sorted(_bodies(engine)) == ["a", "c", "lead"]


def test_any_other_failure_fails_the_whole_group(
    notes: tuple[sa.Engine, GroupCommit, list[int]],
) -> None:
    """Nothing of the group is committed; every job of it gets the error (its own copy)."""
    engine, gc, _ = notes
    outcomes = _grouped(
        gc, [_note("lead"), _note("a"), _note("bad", RuntimeError("disk on fire")), _note("c")]
    )
    errors = outcomes[1:]
    assert all(isinstance(e, RuntimeError) and "disk on fire" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 3
    assert _bodies(engine) == ["lead"]
    assert gc.run(_note("after")) == 2  # and the queue goes on


def _grouped_checked(gc: GroupCommit, jobs: list[Callable[[sa.Connection], int]]) -> list[object]:
    """As `_grouped`, every job run with checks_first=True."""
    original = gc.run

    def run(fn: Callable[[sa.Connection], int], **kw: Any) -> int:
        return original(fn, checks_first=True)

    gc.run = run  # type: ignore[method-assign]
    try:
        return _grouped(gc, jobs)
    finally:
        gc.run = original  # type: ignore[method-assign]


def _refused(fail: BaseException) -> Callable[[sa.Connection], int]:
    def job(conn: sa.Connection) -> int:
        raise fail

    return job


def test_a_job_that_checks_first_needs_no_savepoint(
    notes: tuple[sa.Engine, GroupCommit, list[int]],
) -> None:
    """A job refused before it writes fails alone, and no SAVEPOINT is sent for any job."""
    engine, gc, _ = notes
    missing = NotFound("PROFILE_NOT_FOUND", "no such profile", field="profile_id")
    sent: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2].split()[0]))
    outcomes = _grouped_checked(gc, [_note("lead"), _note("a"), _refused(missing), _note("c")])
    assert isinstance(outcomes[2], NotFound)
    assert sorted(_bodies(engine)) == ["a", "c", "lead"]
    assert "SAVEPOINT" not in sent


def test_a_job_that_breaks_its_promise_fails_its_group(
    notes: tuple[sa.Engine, GroupCommit, list[int]],
) -> None:
    """Checks first, but writes and then raises a domain error: its write cannot be undone
    alone, so nothing of the group is committed (every job gets an error)."""
    engine, gc, _ = notes
    missing = NotFound("PROFILE_NOT_FOUND", "no such profile", field="profile_id")
    outcomes = _grouped_checked(gc, [_note("lead"), _note("a"), _note("bad", missing), _note("c")])
    assert all(isinstance(o, RuntimeError) for o in outcomes[1:]), outcomes
    assert _bodies(engine) == ["lead"]
