"""In-transaction lookups for `Store`: rows by id, the idempotency checks that compare a
replayed create or sample batch with what was stored, and the comparison bodies they use.
Each takes an open connection; the caller owns the transaction.

`namespaces` (a visibility set, see `idealrt.core.namespaces`: None is every namespace)
narrows a lookup: a row outside it is NOT_FOUND with exactly the error of a missing id, so
its existence never leaks. A replayed request_id whose stored object is in another namespace
is REQUEST_ID_REUSED without naming that object (request ids are unique store-wide)."""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa

from idealrt.core.domain import CostModel, Profile, Sample
from idealrt.core.errors import AlreadyExists, NotFound
from idealrt.core.namespaces import cost_model_not_found, profile_not_found
from idealrt.services.store import _rows, _serde
from idealrt.services.store.reasons import BATCH_ID_REUSED, REQUEST_ID_REUSED
from idealrt.services.store.schema import cost_models, profiles, samples

__all__ = [
    "check_replay",
    "cost_model_by_request",
    "get_cost_model",
    "get_profile",
    "mutable",
    "profile_by_request",
    "visible",
]


def visible(column: sa.Column[Any], namespaces: frozenset[str] | None) -> sa.ColumnElement[bool]:
    """The WHERE clause of a visibility set on a namespace column."""
    if namespaces is None:
        return sa.true()
    if not namespaces:
        return sa.false()
    return column.in_(sorted(namespaces))


def _reused_elsewhere(request_id: str, kind: str) -> AlreadyExists:
    return AlreadyExists(
        REQUEST_ID_REUSED,
        f"request_id {request_id!r} was already used for another {kind}; use a new request_id "
        f"for a new {kind}",
        field="request_id",
    )


def _profile_not_found(profile_id: str, field: str) -> NotFound:
    return profile_not_found(profile_id, field)


def _request_body(p: Profile) -> str:
    return _serde.dumps({"model": p.model, "stack": p.stack, "plan": p.plan, "target": p.target})


def mutable(p: Profile) -> str:
    return _serde.dumps(
        [p.state, p.completed_samples, p.total_samples, p.start_time, p.end_time, p.error,
         p.provenance, p.model_spec]
    )  # fmt: skip


def _cost_model_body(cm: CostModel) -> str:
    return _serde.dumps(dataclasses.replace(cm, id="", create_time=None))


# ---- profiles --------------------------------------------------------------------------


def profile_by_request(conn: sa.Connection, p: Profile) -> Profile | None:
    row = conn.execute(
        sa.select(profiles).where(profiles.c.request_id == p.request_id)
    ).mappings().first()  # fmt: skip
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
    query = sa.select(profiles).where(
        profiles.c.id == profile_id, visible(profiles.c.namespace, namespaces)
    )
    row = conn.execute(query.with_for_update() if lock else query).mappings().first()
    if row is None:
        raise _profile_not_found(profile_id, field)
    return _rows.profile_from_row(row)


# ---- samples ---------------------------------------------------------------------------


def check_replay(
    conn: sa.Connection,
    profile_id: str,
    batch_id: str,
    first: int,
    count: int,
    batch: list[Sample],
) -> None:
    stored = [
        _rows.sample_from_row(r)
        for r in conn.execute(
            sa.select(samples)
            .where(samples.c.profile_id == profile_id, samples.c.batch_id == batch_id)
            .order_by(samples.c.seq)
        ).mappings()
    ]
    same = len(stored) == count == len(batch) and all(
        _serde.dumps(dataclasses.replace(a, seq=-1)) == _serde.dumps(b)
        for a, b in zip(stored, batch, strict=True)
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
    query = sa.select(cost_models).where(cost_models.c.request_id == cm.request_id)
    row = conn.execute(query).mappings().first()
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
    query = sa.select(cost_models).where(
        cost_models.c.id == cm_id, visible(cost_models.c.namespace, namespaces)
    )
    row = conn.execute(query).mappings().first()
    if row is None:
        raise cost_model_not_found(cm_id)
    return _rows.cost_model_from_row(row)
