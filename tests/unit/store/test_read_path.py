"""The read hot path (a profile, a page of profiles) gives what the plain one gives: rows
read as JSON text (`_jsonrows`) equal SQLAlchemy's own mappings on every backend, the
compiled type decoders of `_serde` equal the generic walk they replace (values and
errors), reads that are one statement run without a transaction, and the servicer's
memo of profile messages (`ProfileMessages`) answers what `profile_to_pb` answers."""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
import typing
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from idealrt.core import convert as cv
from idealrt.core.domain import (
    ContentionObservation,
    CostModel,
    FitQuality,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Provenance,
    StackSpec,
    Target,
)
from idealrt.core.model_spec import ModelSpec
from idealrt.services.store import _jsonrows, _serde, schema
from idealrt.services.store.repository import Store

MakeProfile = Callable[..., Profile]


def _statements(st: Store, call: Callable[[], object]) -> list[str]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.strip().split()[0].upper())

    sa.event.listen(st._engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        sa.event.remove(st._engine, "before_cursor_execute", record)
    return seen


def _populate(store: Store, make_profile: MakeProfile) -> list[Profile]:
    made = []
    for i in range(12):
        p = make_profile(
            request_id=f"r-{i}" if i % 2 else "",
            namespace=("default", "team-a")[i % 2],
            error='é\n"x"\\' if i == 3 else "",
        )
        made.append(store.create_profile(p)[0])
    running = dataclasses.replace(
        made[5],
        state=ProfileState.RUNNING,
        start_time=datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=UTC),
        provenance=Provenance({"k": "v"}),
    )
    made[5] = store.update_profile(running)
    return made


@pytest.mark.parametrize("table", ["profiles", "cost_models"])
def test_json_rows_are_sqlalchemys_rows(
    store: Store, make_profile: MakeProfile, table: str
) -> None:
    made = _populate(store, make_profile)
    store.create_cost_model(
        CostModel("", made[0].id, (1, 64), (0.01, 0.05), 0.02, quality=FitQuality("kfold", 3))
    )
    t = schema.metadata.tables[table]
    queries = [
        sa.select(t).order_by(t.c.create_time.desc(), t.c.id.desc()).limit(5),
        sa.select(t).where(t.c.namespace == "team-a").order_by(t.c.create_time, t.c.id),
        sa.select(t).where(t.c.id == "nope"),
    ]
    with store._engine.connect() as conn:
        for q in queries:
            plain = [dict(r) for r in conn.execute(q).mappings()]
            ordered = [dict(r) for r in _jsonrows.rows(conn, q, None, lambda r: r["create_time"])]
            one_each = [dict(r) for r in _jsonrows.rows(conn, q)]
            assert one_each == plain
            assert sorted(ordered, key=lambda r: r["create_time"]) == sorted(
                plain, key=lambda r: r["create_time"]
            )
            for row in one_each:
                times = [v for v in row.values() if isinstance(v, datetime)]
                assert times and all(t.tzinfo is UTC for t in times)


def test_pages_and_gets_read_as_before(store: Store, make_profile: MakeProfile) -> None:
    made = _populate(store, make_profile)
    newest_first = sorted(made, key=lambda p: (p.create_time, p.id), reverse=True)
    page, token = store.list_profiles(5, "")
    assert page == newest_first[:5]
    page2, _ = store.list_profiles(5, token)
    assert page2 == newest_first[5:10]
    assert store.list_profiles(50, "", namespaces=frozenset({"team-a", "default"}))[0] == (
        newest_first
    )
    assert store.list_profiles(50, "", namespaces=frozenset())[0] == []
    assert store.get_profile(made[5].id) == made[5]
    assert store.unfinished_profiles() == sorted(
        [p for p in made if not p.state.terminal], key=lambda p: (p.create_time, p.id)
    )


def test_one_statement_reads_begin_no_transaction(store: Store, make_profile: MakeProfile) -> None:
    made = _populate(store, make_profile)
    for call in (
        lambda: store.get_profile(made[0].id),
        lambda: store.list_profiles(5, ""),
        lambda: store.list_profiles(5, "", namespaces=frozenset({"team-a"})),
    ):
        ran = _statements(store, call)
        assert ran == ["SELECT"], ran


# ---- the compiled decoders ------------------------------------------------------------


def _walk(tp: Any, value: Any) -> Any:
    """The generic decoder `_serde.decoder` replaced, kept as the reference."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"unsupported union {tp}")
        return _walk(non_none[0], value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_walk(args[0], v) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} items for {tp}, got {len(value)}")
        return tuple(_walk(a, v) for a, v in zip(args, value, strict=True))
    if origin is list:
        return [_walk(args[0], v) for v in value]
    if origin is dict:
        return {_walk(args[0], k): _walk(args[1], v) for k, v in value.items()}
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise TypeError(f"expected an object for {tp.__name__}")
            module = sys.modules.get(tp.__module__)
            hints = typing.get_type_hints(tp, globalns=vars(module) if module else None)
            kwargs = {
                f.name: _walk(hints[f.name], value[f.name])
                for f in dataclasses.fields(tp)
                if f.init and f.name in value
            }
            return tp(**kwargs)
        if issubclass(tp, enum.Enum):
            return tp(value)
        if tp is datetime:
            return _serde.to_utc(datetime.fromisoformat(value))
        if tp is float:
            return float(value)
        if tp in (int, str, bool):
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
            return value
    raise TypeError(f"unsupported type {tp!r}")


def _result(fn: Callable[[], Any]) -> Any:
    try:
        value = fn()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        return type(exc), str(exc)
    return value, type(value)


SPEC = ModelSpec("m", layers=2, d_model=64, heads=4, d_ff=128, vocab=100, max_positions=64)
DECODED: list[tuple[Any, Any]] = [
    (ModelRef, _serde.to_jsonable(ModelRef(name="x", spec=SPEC, seed=3))),
    (StackSpec, {"backend": "onnxruntime", "options": {"a": "1"}, "extra": 1}),
    (ProfilePlan, _serde.to_jsonable(ProfilePlan((1, 2), (3,), until_ci_rel=0.5))),
    (ProfilePlan, {"prompt_tokens": ["a"], "output_tokens": [1]}),
    (ProfilePlan, {"prompt_tokens": [True], "output_tokens": [1]}),
    (ProfilePlan, {"prompt_tokens": "12", "output_tokens": [1]}),
    (Target, {"kind": "nope"}),
    (Target, ["not", "an", "object"]),
    (ContentionObservation, {"energy_j": 3, "foreign_cpu_s": "nan", "gpu_foreign_processes": 1.5}),
    (CostModel, {**_serde.to_jsonable(CostModel("c", "p", (1,), (0.1,), 0.2)), "stack": None}),
    (CostModel, {**_serde.to_jsonable(CostModel("c", "p", (1,), (0.1,), 0.2)), "kind": 1}),
    (CostModel, {"id": "c", "valid_prompt_tokens": [1]}),
    (ModelSpec | None, None),
    (ModelSpec | None, {"name": 1}),
    (int | str, 1),
    (int | str | None, None),
    (tuple[int, int], [1, 2]),
    (tuple[int, int], [1]),
    (dict[str, tuple[float, float]], {"a": [1, 2.5]}),
    (list[datetime], ["2026-01-01T00:00:00+02:00"]),
    (datetime, "not a time"),
    (bytes, b""),
    (Any, {"x": object}),
]


@pytest.mark.parametrize(("tp", "value"), DECODED)
def test_compiled_decoders_are_the_generic_walk(tp: Any, value: Any) -> None:
    assert _result(lambda: _serde.from_jsonable(tp, value)) == _result(lambda: _walk(tp, value))


# ---- profile messages ------------------------------------------------------------------


@pytest.fixture
def stored(store: Store, make_profile: MakeProfile) -> Iterator[Profile]:
    p, _ = store.create_profile(make_profile(target=Target(address="x:1", options={"a": "b"})))
    yield p


def test_profile_messages_are_profile_to_pb(store: Store, stored: Profile) -> None:
    messages = cv.ProfileMessages(size=2)
    first = store.get_profile(stored.id)
    again = store.get_profile(stored.id)
    assert first is not again and first.stack is again.stack  # new Profiles, shared parts
    assert messages(first) == cv.profile_to_pb(first)
    assert messages(again) is messages(first)  # the same version: converted once
    moved = store.update_profile(dataclasses.replace(first, state=ProfileState.RUNNING))
    assert messages(moved) == cv.profile_to_pb(moved) != messages(first)
    local = dataclasses.replace(first, start_time=datetime.now(UTC) - timedelta(seconds=1))
    assert messages(local) == cv.profile_to_pb(local)
    for _ in range(3):  # bounded: the oldest entries go
        messages(dataclasses.replace(first, error=str(_)))
    assert len(messages._memo) == 2
