"""The store's main queries are served from indexes: the SQL the repository really emits
(captured with SQLAlchemy's `before_cursor_execute` event while a Store method runs, not
typed again here) is EXPLAINed on a populated database, and no plan reads a whole table of
profiles, samples, sample batches or cost models, nor sorts rows it read from one.

- SQLite: EXPLAIN QUERY PLAN (its planner works from the schema; no ANALYZE, as in use).
  Every access to a table must be a SEARCH (an index range) or a SCAN in index order (a
  first page: the LIMIT stops it), and no temporary B-tree may sort for ORDER BY, except
  over the merge of per-namespace pages (each already in order and at most a page).
- PostgreSQL: EXPLAIN (FORMAT JSON) after ANALYZE of a few thousand rows, with
  enable_seqscan=off. At test sizes a sequential scan is what the planner rightly prefers,
  so without the setting the check would say nothing; with it, a query that some index can
  serve uses the index, and one that no index serves still shows a Seq Scan (the setting
  only makes it expensive). So the check is "an index serves this query", not "the planner
  would pick it at this size". Sort nodes may only sort the merged per-namespace pages.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from idealrt.core.domain import (
    CostModel,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Sample,
    StackSpec,
)
from idealrt.services.store import _rows, schema
from idealrt.services.store.repository import Store, open_store

TABLES = ("profiles", "samples", "sample_batches", "cost_models")
NAMESPACES = ("default", "team-a", "team-b", "team-c")
PROFILES = 2400  # rows, over NAMESPACES x every state
COST_MODELS = 600
SAMPLED = 4  # profiles with samples
SAMPLES_EACH = 3000
BATCH = 500


@dataclasses.dataclass
class Populated:
    store: Store
    backend: str
    profile: Profile  # one with samples, RUNNING, in "default"
    cost_model: CostModel  # one fitted to `profile`


def _profile(i: int, start: datetime) -> Profile:
    states = list(ProfileState)
    return Profile(
        id=f"prof_{i:06d}",
        request_id=f"req-{i}",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(),
        plan=ProfilePlan(prompt_tokens=(1, 16), output_tokens=(1, 8)),
        state=states[i % len(states)],
        create_time=start + timedelta(seconds=i),
        namespace=NAMESPACES[(i // len(states)) % len(NAMESPACES)],
    )


def _cost_model(i: int, profile: Profile, start: datetime) -> CostModel:
    return CostModel(
        id=f"cm_{i:06d}",
        profile_id=profile.id,
        alpha_knots_p=(1, 64, 512),
        alpha_knots_s=(0.0231, 0.0302, 0.0761),
        beta0_s=0.021,
        beta1_s=1.5e-7,
        kind="idealized",
        name=f"model-{i}",
        valid_prompt_tokens=(1, 2048),
        valid_output_tokens=(1, 512),
        create_time=start + timedelta(seconds=i),
        namespace=profile.namespace,
    )


def _populate(store: Store, backend: str) -> Populated:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    made = [_profile(i, start) for i in range(PROFILES)]
    now = datetime.now(UTC)
    with store._engine.begin() as conn:
        conn.execute(
            schema.profiles.insert(), [_rows.profile_row(p, update_time=now) for p in made]
        )
    sampled = [
        p
        for p in made
        if p.state in (ProfileState.RUNNING, ProfileState.QUEUED) and p.namespace == "default"
    ][:SAMPLED]
    for p in sampled:
        for b in range(SAMPLES_EACH // BATCH):
            batch = [
                Sample(prompt_tokens=16, output_tokens=4, prefill_ns=k, decode_ns=(1, 2, 3),
                       total_ns=k + 6)
                for k in range(BATCH)
            ]  # fmt: skip
            store.append_samples(p.id, f"b{b}", batch)
    cms = [_cost_model(i, made[i % PROFILES], start) for i in range(COST_MODELS)]
    with store._engine.begin() as conn:
        conn.execute(schema.cost_models.insert(), [_rows.cost_model_row(cm) for cm in cms])
    anchor, _ = store.create_cost_model(_cost_model(COST_MODELS, sampled[0], start))
    if backend == "postgresql":
        with store._engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return Populated(store, backend, sampled[0], anchor)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def populated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Populated]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('plans')}/idealrt.db"
        with open_store(url) as st:
            yield _populate(st, "sqlite")
        return
    server: str = request.getfixturevalue("pg_server_url")
    name = f"idealrt_plans_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        pg_url = sa.make_url(server).update_query_dict({"options": f"-csearch_path={name}"})
        with open_store(pg_url.render_as_string(hide_password=False)) as st:
            yield _populate(st, "postgresql")
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


# ---- capturing and explaining --------------------------------------------------------------


def _captured(store: Store, call: Callable[[Store], object]) -> list[tuple[str, Any]]:
    """The SELECTs on the store's tables that `call` makes the store run."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        text = statement.lstrip().upper()
        if text.startswith("SELECT") and any(t in statement for t in TABLES):
            seen.append((statement, params))

    sa.event.listen(store._engine, "before_cursor_execute", record)
    try:
        call(store)
    finally:
        sa.event.remove(store._engine, "before_cursor_execute", record)
    assert seen, "the call ran no query on the store's tables"
    return seen


def _sqlite_plan(conn: sa.Connection, statement: str, params: Any) -> list[str]:
    rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
    return [str(r[3]) for r in rows]


def _sorts_allowed(statement: str, merged: bool) -> bool:
    """A sort may order the merged per-namespace pages, or the answer of a query without a
    LIMIT (it returns every row it reads: a batch's samples for a replay's comparison); a
    page sorted would read every matching row to return a few."""
    return merged or " LIMIT " not in statement.upper()


def _check_sqlite(plan: list[str], statement: str) -> None:
    merged = any("UNION ALL" in line for line in plan)
    for line in plan:
        words = line.split()
        if len(words) > 1 and words[0] == "SCAN" and words[1] in TABLES:
            assert "USING" in line and "INDEX" in line, f"a full scan: {line}"
        if "TEMP B-TREE FOR ORDER BY" in line:
            assert _sorts_allowed(statement, merged), "rows of a table sorted for a page"


def _pg_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _pg_nodes(child)


def _pg_plan(conn: sa.Connection, statement: str, params: Any) -> dict[str, Any]:
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    row = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", params).scalar_one()
    plan = row if isinstance(row, list) else json.loads(row)
    return dict(plan[0]["Plan"])


def _check_pg(plan: dict[str, Any], statement: str) -> None:
    nodes = list(_pg_nodes(plan))
    merged = any(n["Node Type"] in ("Append", "Merge Append") for n in nodes)
    for n in nodes:
        if n.get("Relation Name") in TABLES:
            assert n["Node Type"] != "Seq Scan", f"a full scan of {n['Relation Name']}"
        if n["Node Type"] == "Sort":
            assert _sorts_allowed(statement, merged), "rows of a table sorted for a page"


def _explain(populated: Populated, call: Callable[[Store], object]) -> list[Any]:
    st = populated.store
    plans: list[Any] = []
    for statement, params in _captured(st, call):
        with st._engine.begin() as conn:
            if populated.backend == "sqlite":
                lines = _sqlite_plan(conn, statement, params)
                _check_sqlite_with(lines, statement)
                plans.append(lines)
            else:
                tree = _pg_plan(conn, statement, params)
                _check_pg_with(tree, statement)
                plans.append(tree)
    return plans


def _check_sqlite_with(plan: list[str], statement: str) -> None:
    try:
        _check_sqlite(plan, statement)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{statement}\n" + "\n".join(plan)) from None


def _check_pg_with(plan: dict[str, Any], statement: str) -> None:
    try:
        _check_pg(plan, statement)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{statement}\n{json.dumps(plan, indent=1)}") from None


# ---- the main queries ---------------------------------------------------------------------

TEAMS = frozenset({"team-a", "team-b"})
ONE = frozenset({"default"})


def _second_page(list_fn: Callable[[str], tuple[list[Any], str]]) -> None:
    items, token = list_fn("")
    assert items and token, "the test data must fill more than one page"
    list_fn(token)


def _replay_second_batch(st: Store, profile_id: str) -> None:
    second = st.list_samples(profile_id, BATCH, st.list_samples(profile_id, BATCH, "")[1])[0]
    assert st.append_samples(profile_id, "b1", second) == BATCH


def _next_batch_id() -> str:
    return f"plan-{secrets.token_hex(4)}"


CASES: dict[str, Callable[[Populated], Callable[[Store], object]]] = {
    "get profile by id": lambda p: lambda st: st.get_profile(p.profile.id),
    "get profile in a namespace set": lambda p: lambda st: st.get_profile(p.profile.id, ONE),
    "create profile, replayed request_id": lambda p: (
        lambda st: st.create_profile(
            dataclasses.replace(_profile(7, datetime(2026, 1, 1, tzinfo=UTC)), id="")
        )
    ),
    "list profiles": lambda p: lambda st: st.list_profiles(50, ""),
    "list profiles, page 2": lambda p: lambda st: _second_page(lambda t: st.list_profiles(50, t)),
    "list profiles, one namespace": lambda p: (
        lambda st: _second_page(lambda t: st.list_profiles(50, t, namespaces=ONE))
    ),
    "list profiles, a namespace set": lambda p: (
        lambda st: _second_page(lambda t: st.list_profiles(50, t, namespaces=TEAMS))
    ),
    "list profiles, by state": lambda p: (
        lambda st: _second_page(lambda t: st.list_profiles(20, t, ProfileState.RUNNING))
    ),
    "list profiles, by state in one namespace": lambda p: (
        lambda st: _second_page(lambda t: st.list_profiles(20, t, ProfileState.RUNNING, ONE))
    ),
    "list profiles, by state in a namespace set": lambda p: (
        lambda st: _second_page(lambda t: st.list_profiles(20, t, ProfileState.SUCCEEDED, TEAMS))
    ),
    "list samples of a profile": lambda p: (
        lambda st: _second_page(lambda t: st.list_samples(p.profile.id, 1000, t))
    ),
    "count samples": lambda p: lambda st: st.count_samples(p.profile.id),
    "append a batch (profile, batch id, max seq)": lambda p: (
        lambda st: st.append_samples(p.profile.id, _next_batch_id(), [Sample(1, 1, 1, (), 1)])
    ),
    "append a replayed batch": lambda p: lambda st: _replay_second_batch(st, p.profile.id),
    "get cost model by id": lambda p: lambda st: st.get_cost_model(p.cost_model.id),
    "list cost models": lambda p: lambda st: _second_page(lambda t: st.list_cost_models(50, t)),
    "list cost models, a namespace set": lambda p: (
        lambda st: _second_page(lambda t: st.list_cost_models(50, t, namespaces=TEAMS))
    ),
    "list cost models of a profile": lambda p: lambda st: st.list_cost_models(50, "", p.profile.id),
    "list cost models of a profile, in a namespace set": lambda p: (
        lambda st: st.list_cost_models(50, "", p.profile.id, ONE)
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_main_queries_use_indexes(populated: Populated, case: str) -> None:
    assert _explain(populated, CASES[case](populated))


def test_the_check_catches_a_full_scan(populated: Populated) -> None:
    """A query no index serves (samples by batch id alone) fails the check: the check is
    not vacuous on either backend."""
    bad = sa.select(schema.samples).where(schema.samples.c.batch_id == "b1")
    with pytest.raises(AssertionError, match="full scan"):
        _explain(populated, lambda st: _run(st, bad))


def _run(st: Store, query: sa.Select[Any]) -> None:
    with st._engine.connect() as conn:
        conn.execute(query).all()


def test_a_page_token_is_an_index_range(populated: Populated) -> None:
    """Page 2 of a listing starts at its cursor in the index, not at the newest row (the
    cost of a page does not grow with how deep it is)."""
    st = populated.store
    token = st.list_profiles(50, "")[1]
    plans = _explain(populated, lambda s: s.list_profiles(50, token))
    text = json.dumps(plans)
    if populated.backend == "sqlite":
        assert (
            "SEARCH profiles USING INDEX ix_profiles_create_time_id ((create_time,id)<(?,?))"
            in text
        )
    else:
        conds = [n.get("Index Cond", "") for plan in plans for n in _pg_nodes(plan)]
        assert any(c.startswith("(ROW(create_time, ") for c in conds), conds


def test_the_check_catches_a_sorted_page(populated: Populated) -> None:
    """A page whose order no index gives (newest updated first in one namespace) is read
    whole and sorted: the check says so on either backend."""
    bad = (
        sa.select(schema.profiles)
        .where(schema.profiles.c.namespace == "team-a")
        .order_by(schema.profiles.c.update_time.desc())
        .limit(10)
    )
    with pytest.raises(AssertionError, match="sorted for a page"):
        _explain(populated, lambda st: _run(st, bad))
