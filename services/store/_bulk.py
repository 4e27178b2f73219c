"""The store's bulk INSERT: many rows of one table in one DBAPI call, the statement text
built once per dialect, values given by column and converted by the columns' own
SQLAlchemy bind processors.

Why not `conn.execute(table.insert(), [dict, ...])`: SQLAlchemy then builds and processes a
parameter dict per row (measured on the appended samples: ~10 us a row of Python, twice
what SQLite takes to insert it). Here the values come a column at a time in a fixed column
order (a batch's profile id, batch id and namespace are one value repeated), and only the
columns whose type has a bind processor (SQLite: datetimes as text, booleans as ints) are
converted, with the very functions SQLAlchemy would call, so what is stored is identical.
The statement still goes through `Connection.exec_driver_sql`: SQLAlchemy's error wrapping
(DBAPIError, IntegrityError), its events and its transaction apply as to any statement.

How the rows travel:
- SQLite: a multi-row INSERT ... VALUES (?, ...), (?, ...), ... of up to `_SQLITE_ROWS`
  rows a statement (its text kept per row count; pysqlite prepares each text once per
  connection), so a batch is one statement, not a step per row: pysqlite releases the GIL
  around every step, and under a busy server every release hands the GIL to another
  thread and back (two context switches, measured as a third of ingest's CPU when a
  100-sample batch was 100 steps). Bigger batches: one executemany of the full chunks
  and one statement of the rest.
- PostgreSQL: one `INSERT ... SELECT * FROM unnest(%b::type[], ...)`, one array per
  column sent in binary (%b: no text escaping of the decode-step blobs; in text, psycopg's
  array dumping was the next largest cost), whatever the number of rows: one statement,
  one round trip and one statement text, so psycopg parses it once (its query cache) and
  runs it as a server-side prepared statement (it prepares a statement once it has run 5
  times on a connection). Not a multi-row VALUES (what SQLAlchemy's "insertmanyvalues"
  sends): one round trip too, but its text changes with the row count and it has a
  parameter per value, which psycopg never caches (more than 50 parameters) and re-parses
  on every call: measured, half of the store's CPU under ingest went to psycopg splitting
  that statement.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = ["BulkInsert"]

# Rows of one SQLite INSERT (also bounded by the connection's limit on parameters: at
# least 999 in any SQLite) and row counts whose statement text is kept.
_SQLITE_ROWS = 500
_SQLITE_TEXTS = 64


class BulkInsert:
    """INSERT of `columns` of `table` on `dialect` (`run` takes the values by column, in
    that order)."""

    def __init__(self, table: sa.Table, columns: Sequence[str], dialect: Dialect) -> None:
        self.columns = tuple(columns)
        if dialect.paramstyle not in ("qmark", "format", "pyformat"):
            raise ValueError(f"unsupported paramstyle {dialect.paramstyle!r}")
        self._arrays = dialect.name == "postgresql"
        quote = dialect.identifier_preparer.quote
        head = (
            f"INSERT INTO {dialect.identifier_preparer.format_table(table)} "
            f"({', '.join(quote(c) for c in self.columns)}) "
        )
        self._head = head
        if self._arrays:
            casts = (table.c[c].type.compile(dialect=dialect) for c in self.columns)
            self.sql = head + f"SELECT * FROM unnest({', '.join(f'%b::{t}[]' for t in casts)})"
        else:
            mark = "?" if dialect.paramstyle == "qmark" else "%s"
            self._row = "(" + ", ".join([mark] * len(self.columns)) + ")"
            self.sql = head + "VALUES " + self._row  # one row
        self._texts: dict[int, str] = {}
        self._max_rows = max(1, min(_SQLITE_ROWS, 999 // len(self.columns)))
        self._limit_read = False
        self._converters: list[tuple[int, Callable[[Any], Any]]] = []
        for i, name in enumerate(self.columns):
            proc = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self._converters.append((i, proc))

    def run(self, conn: sa.Connection, columns: Sequence[Sequence[Any]]) -> None:
        """Insert the rows whose values `columns` holds, one sequence per column in
        `self.columns` order (all of one length), in the connection's transaction."""
        if len(columns) != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} columns, got {len(columns)}")
        if not columns[0]:
            return
        values = list(columns)
        for i, proc in self._converters:  # a column at a time: one comprehension, no row copies
            values[i] = [proc(v) for v in values[i]]
        if self._arrays:  # one list per column
            conn.exec_driver_sql(self.sql, tuple(list(c) for c in values))
            return
        rows = list(zip(*values, strict=True))
        per = self._rows_per_statement(conn)
        full = len(rows) - len(rows) % per
        if full:  # chunks of `per` rows: one statement, or one executemany of them
            chunks = [_flat(rows[i : i + per]) for i in range(0, full, per)]
            conn.exec_driver_sql(self._values(per), chunks if len(chunks) > 1 else chunks[0])
        if full < len(rows):
            conn.exec_driver_sql(self._values(len(rows) - full), _flat(rows[full:]))

    def _values(self, n: int) -> str:
        """The INSERT of `n` rows."""
        text = self._texts.get(n)
        if text is None:
            if len(self._texts) >= _SQLITE_TEXTS:
                self._texts.clear()
            text = self._texts[n] = self._head + "VALUES " + ", ".join([self._row] * n)
        return text

    def _rows_per_statement(self, conn: sa.Connection) -> int:
        """_SQLITE_ROWS, or fewer where the connection takes fewer parameters (read from
        its first connection: every connection of an engine is the same library)."""
        if not self._limit_read:
            dbapi = conn.connection.dbapi_connection
            getlimit = getattr(dbapi, "getlimit", None)  # sqlite3.Connection, Python 3.11+
            if getlimit is not None:
                limit = getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                self._max_rows = max(1, min(_SQLITE_ROWS, limit // len(self.columns)))
            self._limit_read = True
        return self._max_rows


def _flat(rows: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """One statement's parameters (a tuple: a list means executemany to SQLAlchemy)."""
    return tuple(itertools.chain.from_iterable(rows))
