"""Rows of the store's object tables (profiles, cost models) read as JSON text: a page as
one value, a row as one value.

Why: every value a driver hands over costs the server more than the value. pysqlite
releases the GIL around every step of a statement and again for every column of every row
it fetches (sqlite3_column_type and friends), and on a busy server each release hands the
GIL to another thread and back: two context switches. A profile row is 13 columns, so a
page of 10 profiles was ~150 releases, and measured with 200 callers on two cores the
store spent more CPU switching threads than reading rows. psycopg builds a column
description per column and a Python value per value of every result. So the query is
asked for one JSON array per row (SQLite `json_array`, PostgreSQL `json_build_array`:
the same FROM, WHERE, ORDER BY and LIMIT, so the same plan, see
tests/unit/store/test_query_plans.py), or for a page one JSON array of those
(`json_group_array` / `json_agg` over the query as a subquery: one row, one value, then
sorted again here by the query's order, which an aggregate does not promise to keep).

The text is decoded by `json` in one C call, and each value put through its column's own
SQLAlchemy result processor (PostgreSQL writes times as ISO 8601 text in JSON: parsed
first, then processed as a datetime), so what comes back is what
`conn.execute(query).mappings()` returns, read-only. Decoding is memoized by the text (a
pure function of what was read): a page or a row read again unchanged, the common case of
a polled listing, costs a dict lookup.

JSON carries exactly what these tables hold (text, integers, NULL, times); a query that
selects anything else (a blob, a float, a boolean) runs as it is.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = ["first", "rows"]

_EXACT = (sa.String, sa.Integer, sa.DateTime)  # text, integers, times
Processor = Callable[[Any], Any]
Processors = tuple[tuple[str, Processor | None], ...]
Order = Callable[[Mapping[str, Any]], Any]
# the JSON functions of each dialect: (a row's array, an aggregate of rows' arrays)
_FUNCTIONS = {
    "sqlite": ("json_array", "json_group_array"),
    "postgresql": ("json_build_array", "json_agg"),
}


def rows(
    conn: sa.Connection,
    query: sa.Select[Any],
    params: Mapping[str, Any] | None = None,
    order: Order | None = None,
    *,
    descending: bool = False,
) -> Sequence[Mapping[str, Any]]:
    """The rows of `query` run with `params`, as read-only mappings by column name.
    `order`: the sort key of the query's ORDER BY over a row (`descending` as it is);
    given, the rows are read as one value (see the module docstring), else as one value
    each. Build `query` once and run it often: its JSON forms are built once for it."""
    shape = _shape_of(conn.dialect, query)
    if shape is None:
        return cast(list[Mapping[str, Any]], list(conn.execute(query, params).mappings()))
    packed = _packed(conn.dialect.name, query, order is not None)
    if order is None:
        return [_decoded(shape, text)[0] for (text,) in conn.execute(packed, params)]
    text = conn.execute(packed, params).scalar()
    return _decoded(shape, text or "[]", order, descending)


def first(
    conn: sa.Connection, query: sa.Select[Any], params: Mapping[str, Any] | None = None
) -> Mapping[str, Any] | None:
    """The first row of `query`, or None; for a lookup of at most one row (by a unique
    key)."""
    found = rows(conn, query, params)
    return found[0] if found else None


@functools.lru_cache(maxsize=256)
def _packed(dialect: str, query: sa.Select[Any], aggregate: bool) -> sa.Select[Any]:
    """`query` selecting a JSON array of its columns per row as text, or (`aggregate`)
    the JSON array of those arrays. Memoized by the query object (a statement built once:
    the memo keeps it alive, so its identity is never another's)."""
    one, many = _FUNCTIONS[dialect]
    packed = getattr(sa.func, one)(*query.selected_columns)
    if not aggregate:
        return query.with_only_columns(sa.cast(packed, sa.Text))
    page = query.with_only_columns(packed.label("r")).subquery()
    rows_ = page.c.r if dialect == "postgresql" else sa.func.json(page.c.r)
    return sa.select(sa.cast(getattr(sa.func, many)(rows_), sa.Text))


# Texts decoded are remembered up to this size (a row ~1 KB, a page of 10 ~10 KB), at
# most _MEMO_TEXTS of them: a few MB.
_MEMO_BYTES = 64 * 1024
_MEMO_TEXTS = 1024


def _decoded(
    shape: Processors, text: str, order: Order | None = None, descending: bool = False
) -> tuple[Mapping[str, Any], ...]:
    """The rows a JSON text holds (one row's array, or with `order` an array of them,
    sorted), memoized by the text (see the module docstring) unless it is large."""
    if len(text) > _MEMO_BYTES:
        return _decode(shape, text, order, descending)
    return _decode_memo(shape, text, order, descending)


def _decode(
    shape: Processors, text: str, order: Order | None, descending: bool
) -> tuple[Mapping[str, Any], ...]:
    if order is None:
        return (_row(shape, json.loads(text)),)
    found = [_row(shape, values) for values in json.loads(text)]
    found.sort(key=order, reverse=descending)
    return tuple(found)


_decode_memo = functools.lru_cache(maxsize=_MEMO_TEXTS)(_decode)


def _row(shape: Processors, values: list[Any]) -> Mapping[str, Any]:
    return MappingProxyType(
        {
            name: value if proc is None else proc(value)
            for (name, proc), value in zip(shape, values, strict=True)
        }
    )


def _shape_of(dialect: Dialect, query: sa.Select[Any]) -> Processors | None:
    if dialect.name not in _FUNCTIONS:
        return None
    return _shape(dialect, tuple((c.key, c.type) for c in query.selected_columns))


@functools.lru_cache(maxsize=64)
def _shape(dialect: Dialect, columns: tuple[tuple[str, Any], ...]) -> Processors | None:
    """(name, processor) of each selected column, or None when some column's values
    would not come through JSON exactly. A pure function of the dialect and the columns'
    names and types (types compare by identity): memoized."""
    if not all(isinstance(_impl(tp), _EXACT) for _, tp in columns):
        return None
    return tuple((name, _processor(dialect, tp)) for name, tp in columns)


def _processor(dialect: Dialect, tp: Any) -> Processor | None:
    """What turns a column's JSON value into what SQLAlchemy returns for it: its result
    processor; on PostgreSQL, for a time, after parsing the ISO 8601 text JSON holds (the
    driver would have handed over a datetime)."""
    proc = tp.dialect_impl(dialect).result_processor(dialect, None)
    if dialect.name != "postgresql" or not isinstance(_impl(tp), sa.DateTime):
        return proc
    then = proc or (lambda value: value)
    return lambda value: None if value is None else then(datetime.fromisoformat(value))


def _impl(tp: Any) -> Any:
    """A TypeDecorator's underlying type; any other type itself."""
    return tp.impl_instance if isinstance(tp, sa.TypeDecorator) else tp
