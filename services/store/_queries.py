"""The statements of `Store` and the lookups that run them: rows by id, pages newest
first, the append path's lookups, the idempotency checks that compare a replayed create or
sample batch with what was stored, and the comparison bodies they use. The hot ones are
built once per shape, their values bound parameters (see "statements built once" below);
rows of profiles and cost models are read as JSON text (`_jsonrows`). Each function takes
an open connection; the caller owns the transaction (a one-statement read runs in none,
see `Store._read`).

`namespaces` (a visibility set, see `idealrt.core.namespaces`: None is every namespace)
narrows a lookup: a row outside it is NOT_FOUND with exactly the error of a missing id, so
its existence never leaks. A replayed request_id whose stored object is in another namespace
is REQUEST_ID_REUSED without naming that object (request ids are unique store-wide)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa

from idealrt.core.domain import CostModel, Profile, ProfileState
from idealrt.core.errors import AlreadyExists, NotFound
from idealrt.core.namespaces import cost_model_not_found, profile_not_found
from idealrt.services.store import _jsonrows, _rows, _serde
from idealrt.services.store.reasons import BATCH_ID_REUSED, REQUEST_ID_REUSED
from idealrt.services.store.schema import cost_models, profiles, sample_batches, samples

__all__ = [
    "INSERT_BATCH",
    "MERGE_NAMESPACES",
    "WriteTarget",
    "batch_and_next_seq",
    "check_replay",
    "cost_model_by_request",
    "get_cost_model",
    "get_profile",
    "mutable",
    "newest_first",
    "next_seq",
    "page_rows",
    "profile_by_request",
    "profile_for_write",
    "profile_row",
    "require_profile",
    "unfinished_rows",
    "visibility",
    "write_lookup",
]


def _reused_elsewhere(request_id: str, kind: str) -> AlreadyExists:
    return AlreadyExists(
        REQUEST_ID_REUSED,
        f"request_id {request_id!r} was already used for another {kind}; use a new request_id "
        f"for a new {kind}",
        field="request_id",
    )


def _profile_not_found(profile_id: str, field: str) -> NotFound:
    return profile_not_found(profile_id, field)


_BY_REQUEST = {
    t.name: sa.select(t).where(
        t.c.request_id == sa.bindparam("request_id", type_=t.c.request_id.type)
    )
    for t in (profiles, cost_models)
}


def _request_body(p: Profile) -> str:
    return _serde.dumps(
        {"model": p.model, "stack": p.stack, "plan": p.plan, "target": p.target,
         "placement": p.placement}
    )  # fmt: skip


def mutable(p: Profile) -> str:
    return _serde.dumps(
        [p.state, p.completed_samples, p.total_samples, p.start_time, p.end_time, p.error,
         p.provenance, p.model_spec, p.queue_position]
    )  # fmt: skip


def _cost_model_body(cm: CostModel) -> str:
    return _serde.dumps(dataclasses.replace(cm, id="", create_time=None))


# ---- profiles --------------------------------------------------------------------------


def profile_by_request(conn: sa.Connection, p: Profile) -> Profile | None:
    row = _jsonrows.first(conn, _BY_REQUEST[profiles.name], {"request_id": p.request_id})
    if row is None:
        return None
    existing = _rows.profile_from_row(row)
    if existing.namespace != p.namespace:
        raise _reused_elsewhere(p.request_id, "profile")
    if _request_body(existing) != _request_body(p):
        raise AlreadyExists(
            REQUEST_ID_REUSED,
            f"request_id {p.request_id!r} was used for profile {existing.id} with a "
            "different body; use a new request_id for a new profile",
            field="request_id",
        )
    return existing


def get_profile(
    conn: sa.Connection,
    profile_id: str,
    field: str,
    *,
    lock: bool = False,
    namespaces: frozenset[str] | None = None,
) -> Profile:
    row = profile_row(conn, profile_id, namespaces, lock=lock)
    if row is None:
        raise _profile_not_found(profile_id, field)
    return _rows.profile_from_row(row)


def profile_row(
    conn: sa.Connection,
    profile_id: str,
    namespaces: frozenset[str] | None,
    *,
    lock: bool = False,
) -> Mapping[str, Any] | None:
    """The profile's row (read-only), None when it is missing or outside `namespaces`."""
    mode, params = visibility(namespaces)
    if mode == "none":  # sees nothing
        return None
    return _jsonrows.first(conn, _by_id(profiles, mode, lock), {"id": profile_id, **params})


# ---- statements built once per shape ---------------------------------------------------
#
# A statement built per call costs its expression tree and its cache key on every call
# (SQLAlchemy compiles a shape once, but finds it by that key): ~100 us a page. The hot
# reads are built once per shape here, their values all bound parameters, and only run.

# A list visible in several namespaces merges one index range per namespace (each its own
# page, newest first) instead of sorting every row of them; past this many namespaces it
# falls back to one IN filter and a sort.
MERGE_NAMESPACES = 32


def visibility(namespaces: frozenset[str] | None) -> tuple[str, dict[str, Any]]:
    """A visibility set as a statement shape and its parameters: "all" (None: every
    namespace), "none" (an empty set: nothing is visible, no query needed), "one" (a
    namespace, parameter ns), "in" (several, parameter ns: a list)."""
    if namespaces is None:
        return "all", {}
    if not namespaces:
        return "none", {}
    if len(namespaces) == 1:
        return "one", {"ns": next(iter(namespaces))}
    return "in", {"ns": sorted(namespaces)}


def _visible_in(column: sa.Column[Any], mode: str) -> list[sa.ColumnElement[bool]]:
    if mode == "one":
        return [column == sa.bindparam("ns", type_=column.type)]
    if mode == "in":
        return [column.in_(sa.bindparam("ns", expanding=True))]
    return []


@functools.lru_cache(maxsize=16)
def _by_id(table: sa.Table, mode: str, lock: bool) -> sa.Select[Any]:
    """A row of `table` by id, visible in a namespace set of `mode`."""
    query = sa.select(table).where(
        table.c.id == sa.bindparam("id", type_=table.c.id.type),
        *_visible_in(table.c.namespace, mode),
    )
    return query.with_for_update() if lock else query


@functools.lru_cache(maxsize=128)
def newest_first(
    table: sa.Table, equal: tuple[str, ...], mode: str, merged: int, cursor: bool
) -> sa.Select[Any]:
    """A page of `table`, newest first ((create_time, id) descending): the rows whose
    columns `equal` equal parameters eq_<column>, visible in a namespace set of `mode`
    ("all", "one", "in"; or `merged` > 1: that many namespaces, parameters ns_0, ns_1, ...,
    one index range each, merged), after the cursor (parameters after_time, after_id)
    when `cursor`, at most parameter limit rows. Every shape is one index range read in
    index order (tests/unit/store/test_query_plans.py): the cursor is a row-value
    comparison, (create_time, id) < (t, id), which the (..., create_time, id) indexes
    serve as a range."""
    ct, tid = table.c.create_time, table.c.id
    where = [table.c[c] == sa.bindparam(f"eq_{c}", type_=table.c[c].type) for c in equal]
    if cursor:
        after = sa.tuple_(ct, tid) < sa.tuple_(
            sa.bindparam("after_time", type_=ct.type), sa.bindparam("after_id", type_=tid.type)
        )
        where.append(after)
    limit = sa.bindparam("limit", type_=sa.Integer)

    def page(*conds: sa.ColumnElement[bool]) -> sa.Select[Any]:
        return sa.select(table).where(*where, *conds).order_by(ct.desc(), tid.desc()).limit(limit)

    if merged <= 1:
        return page(*_visible_in(table.c.namespace, mode))
    column = table.c.namespace
    members = [
        sa.select(page(column == sa.bindparam(f"ns_{i}", type_=column.type)).subquery())
        for i in range(merged)
    ]
    union = sa.union_all(*members).subquery("page")
    return sa.select(union).order_by(union.c.create_time.desc(), union.c.id.desc()).limit(limit)


def page_rows(
    conn: sa.Connection,
    table: sa.Table,
    equal: Mapping[str, Any],
    namespaces: frozenset[str] | None,
    after: tuple[Any, str] | None,
    limit: int,
    merge: bool = True,
) -> tuple[Mapping[str, Any], ...]:
    """The rows of a `newest_first` page (see there), newest first; a namespace set of
    several merged from one range each when `merge` (else a filter on the range)."""
    mode, params = visibility(namespaces)
    if mode == "none":
        return ()
    merged = 0
    if merge and mode == "in" and len(params["ns"]) <= MERGE_NAMESPACES:
        merged = len(params["ns"])
        params = {f"ns_{i}": n for i, n in enumerate(params.pop("ns"))}
    params.update({f"eq_{c}": v for c, v in equal.items()}, limit=limit)
    if after is not None:
        params.update(after_time=after[0], after_id=after[1])
    query = newest_first(table, tuple(equal), mode, merged, after is not None)
    return tuple(_jsonrows.rows(conn, query, params, _time_id, descending=True))


_UNFINISHED = (ProfileState.QUEUED.value, ProfileState.RUNNING.value)


@functools.lru_cache(maxsize=4)
def _unfinished(mode: str) -> sa.Select[Any]:
    return (
        sa.select(profiles)
        .where(profiles.c.state.in_(_UNFINISHED), *_visible_in(profiles.c.namespace, mode))
        .order_by(profiles.c.create_time, profiles.c.id)
    )


def unfinished_rows(
    conn: sa.Connection, namespaces: frozenset[str] | None
) -> list[Mapping[str, Any]]:
    """The QUEUED and RUNNING profiles' rows visible in `namespaces`, oldest first."""
    mode, params = visibility(namespaces)
    if mode == "none":
        return []
    return list(_jsonrows.rows(conn, _unfinished(mode), params, _time_id))


def _time_id(row: Mapping[str, Any]) -> tuple[Any, str]:
    """The (create_time, id) order of the listings."""
    return row["create_time"], row["id"]


# ---- the append path and the samples' profile checks: statements built once -------------
#
# SQLAlchemy compiles a statement once per shape (its compiled cache), but a statement built
# per call still costs its expression tree and its cache key on every call; these are built
# at import, parameters by name, and only executed (their cache keys are memoized on them).
# With the DBAPIs' own statement caches (see `url`) they are prepared statements end to end.

_PROFILE_ID: sa.BindParameter[str] = sa.bindparam("profile_id", type_=profiles.c.id.type)
_NAMESPACES: sa.BindParameter[list[str]] = sa.bindparam("namespaces", expanding=True)


def _profile_lookup(*columns: sa.Column[Any], lock: bool) -> dict[bool, sa.Select[Any]]:
    """{in a namespace set?: the statement}: by id, every namespace or a set of them."""
    base = sa.select(*columns).where(profiles.c.id == _PROFILE_ID)
    variants = {False: base, True: base.where(profiles.c.namespace.in_(_NAMESPACES))}
    return {k: v.with_for_update() if lock else v for k, v in variants.items()}


_PROFILE_FOR_WRITE = _profile_lookup(
    profiles.c.state, profiles.c.namespace, profiles.c.runner, lock=True
)
_PROFILE_EXISTS = _profile_lookup(profiles.c.id, lock=False)


def _batch_column(column: sa.Column[Any]) -> sa.ScalarSelect[Any]:
    return (
        sa.select(column)
        .where(
            sample_batches.c.profile_id == _PROFILE_ID,
            sample_batches.c.batch_id == sa.bindparam("batch_id"),
        )
        .scalar_subquery()
    )


# the profile's next seq: one lookup at the end of its range of the samples primary key
_NEXT_SEQ = sa.select(sa.func.coalesce(sa.func.max(samples.c.seq) + 1, 0)).where(
    samples.c.profile_id == _PROFILE_ID
)
# a batch id's stored batch (first seq, count; NULL when new) and the profile's next seq
_BATCH_AND_NEXT_SEQ = sa.select(
    _batch_column(sample_batches.c.first_seq),
    _batch_column(sample_batches.c.count),
    _NEXT_SEQ.scalar_subquery(),
)
INSERT_BATCH = sample_batches.insert()


def _run_on_profile(
    conn: sa.Connection,
    statements: dict[bool, sa.Select[Any]],
    profile_id: str,
    namespaces: frozenset[str] | None,
) -> sa.Row[Any] | None:
    if namespaces is None:
        return conn.execute(statements[False], {"profile_id": profile_id}).first()
    if not namespaces:  # sees nothing
        return None
    params = {"profile_id": profile_id, "namespaces": sorted(namespaces)}
    return conn.execute(statements[True], params).first()


class WriteTarget(NamedTuple):
    """What an append needs of its profile (not the whole row: its JSON payload is the
    costly part to read)."""

    state: str
    namespace: str
    runner: str


def profile_for_write(
    conn: sa.Connection, profile_id: str, namespaces: frozenset[str] | None
) -> WriteTarget:
    """The profile's state, namespace and runner, its row locked for the transaction
    (PostgreSQL: FOR UPDATE; SQLite: the write lock is the database's); NOT_FOUND
    (field profile_id) when it is missing or outside `namespaces`."""
    row = _run_on_profile(conn, _PROFILE_FOR_WRITE, profile_id, namespaces)
    if row is None:
        raise _profile_not_found(profile_id, "profile_id")
    state, namespace, runner = tuple(row)
    return WriteTarget(str(state), str(namespace), str(runner))


# SQLite: the profile, its batch id's batch and its next seq in one statement (under the
# database's write lock nothing moves between them; on PostgreSQL the lookups of the batch
# must begin after the profile's row is locked, see `batch_and_next_seq`)
def _write_lookup(in_namespaces: bool) -> sa.Select[Any]:
    query = sa.select(
        profiles.c.state,
        profiles.c.namespace,
        profiles.c.runner,
        _batch_column(sample_batches.c.first_seq),
        _batch_column(sample_batches.c.count),
        _NEXT_SEQ.scalar_subquery(),
    ).where(profiles.c.id == _PROFILE_ID)
    return query.where(profiles.c.namespace.in_(_NAMESPACES)) if in_namespaces else query


_WRITE_LOOKUP = {ns: _write_lookup(ns) for ns in (False, True)}


def write_lookup(
    conn: sa.Connection, profile_id: str, batch_id: str, namespaces: frozenset[str] | None
) -> tuple[WriteTarget, tuple[int, int] | None, int]:
    """`profile_for_write`, then `batch_and_next_seq`: (the profile's state, namespace
    and runner; its batch stored under `batch_id` as (first seq, count), or None; its next
    seq). One statement on SQLite, two on PostgreSQL (see `batch_and_next_seq`)."""
    if conn.dialect.name != "sqlite":
        target = profile_for_write(conn, profile_id, namespaces)
        return target, *batch_and_next_seq(conn, profile_id, batch_id)
    params: dict[str, Any] = {"profile_id": profile_id, "batch_id": batch_id}
    if namespaces is None:
        row = conn.execute(_WRITE_LOOKUP[False], params).first()
    elif namespaces:
        params["namespaces"] = sorted(namespaces)
        row = conn.execute(_WRITE_LOOKUP[True], params).first()
    else:  # sees nothing
        row = None
    if row is None:
        raise _profile_not_found(profile_id, "profile_id")
    state, namespace, runner, first, count, following = tuple(row)
    prior = None if first is None else (int(first), int(count))
    return WriteTarget(str(state), str(namespace), str(runner)), prior, int(following)


def require_profile(
    conn: sa.Connection, profile_id: str, namespaces: frozenset[str] | None
) -> None:
    """NOT_FOUND (field profile_id) unless the profile exists in `namespaces`."""
    if _run_on_profile(conn, _PROFILE_EXISTS, profile_id, namespaces) is None:
        raise _profile_not_found(profile_id, "profile_id")


# ---- samples ---------------------------------------------------------------------------


def next_seq(conn: sa.Connection, profile_id: str) -> int:
    """The profile's next sequence number, which is also its number of samples: seqs are
    assigned 0, 1, 2, ... without gaps and never deleted."""
    return int(conn.execute(_NEXT_SEQ, {"profile_id": profile_id}).scalar_one())


def batch_and_next_seq(
    conn: sa.Connection, profile_id: str, batch_id: str
) -> tuple[tuple[int, int] | None, int]:
    """((first seq, count) of the batch stored under `batch_id`, or None), the profile's
    next seq: one statement, two primary-key lookups. On PostgreSQL run it after the
    profile's row is locked: a statement begun later sees every append committed before."""
    first, count, following = conn.execute(
        _BATCH_AND_NEXT_SEQ, {"profile_id": profile_id, "batch_id": batch_id}
    ).one()
    prior = None if first is None else (int(first), int(count))
    return prior, int(following)


# a stored batch's samples (seq first..first+count-1, a range of the primary key), their
# SAMPLE_COLUMNS in seq order
_STORED_BATCH = (
    sa.select(*(samples.c[c] for c in _rows.SAMPLE_COLUMNS))
    .where(
        samples.c.profile_id == _PROFILE_ID,
        samples.c.seq >= sa.bindparam("first", type_=samples.c.seq.type),
        samples.c.seq < sa.bindparam("end", type_=samples.c.seq.type),
        samples.c.batch_id == sa.bindparam("batch_id", type_=samples.c.batch_id.type),
    )
    .order_by(samples.c.seq)
)


def check_replay(
    conn: sa.Connection,
    profile_id: str,
    batch_id: str,
    first: int,
    count: int,
    columns: Sequence[Sequence[Any]],
) -> None:
    """A replayed batch id must come with the samples it was stored with: the stored batch
    read back and compared with the validated replay's column values (`columns`, in
    SAMPLE_COLUMNS order, as `_rows.batch_columns` gives them), sample by sample, seq
    aside: equal values are equal samples (see `_rows.same_sample_values`); else
    AlreadyExists BATCH_ID_REUSED."""
    params = {"profile_id": profile_id, "first": first, "end": first + count, "batch_id": batch_id}
    stored = [tuple(r) for r in conn.execute(_STORED_BATCH, params)]
    replay = list(zip(*columns, strict=True))
    same = len(stored) == count == len(replay) and all(
        a == b or _rows.same_sample_values(a, b) for a, b in zip(stored, replay, strict=True)
    )
    if not same:
        raise AlreadyExists(
            BATCH_ID_REUSED,
            f"batch_id {batch_id!r} of profile {profile_id} was appended with different "
            f"samples (seq {first}..{first + count - 1}); use a new batch_id",
            field="batch_id",
        )


# ---- cost models -----------------------------------------------------------------------


def cost_model_by_request(conn: sa.Connection, cm: CostModel) -> CostModel | None:
    row = _jsonrows.first(conn, _BY_REQUEST[cost_models.name], {"request_id": cm.request_id})
    if row is None:
        return None
    existing = _rows.cost_model_from_row(row)
    if existing.namespace != cm.namespace:
        raise _reused_elsewhere(cm.request_id, "cost model")
    if _cost_model_body(existing) != _cost_model_body(dataclasses.replace(cm, id="")):
        raise AlreadyExists(
            REQUEST_ID_REUSED,
            f"request_id {cm.request_id!r} was used for cost model {existing.id} with a "
            "different body; use a new request_id for a new cost model",
            field="request_id",
        )
    return existing


def get_cost_model(
    conn: sa.Connection, cm_id: str, namespaces: frozenset[str] | None = None
) -> CostModel:
    mode, params = visibility(namespaces)
    if mode == "none":
        raise cost_model_not_found(cm_id)
    row = _jsonrows.first(conn, _by_id(cost_models, mode, False), {"id": cm_id, **params})
    if row is None:
        raise cost_model_not_found(cm_id)
    return _rows.cost_model_from_row(row)
