"""Answers to the store's hot reads (GetProfile, ListProfiles), kept while the database
is unchanged.

Why: a page of profiles and a profile read back are the calls other teams' dashboards
and services poll, and each costs two SQL statements' worth of driver and SQLAlchemy work
(~0.2 ms of a core per call on the 2-core dev machine) for an answer that is almost always
the one it gave last time. With a cache that cannot serve a stale answer, a repeat costs
a dict lookup and one cheap check.

The check is the database's own change marker, read BEFORE the query whose answer is
kept (`Store.read_generation`): an entry made at generation g is served only while the
marker still reads g. A commit that lands between that read and the query makes the
entry's answer newer than g, never older, and the next check sees the marker moved: so
an answer served from here is never older than what a query at the moment of the check
would return. Only a marker that every commit moves, from any connection or process,
qualifies: SQLite's data_version, PostgreSQL's current snapshot (one round trip instead
of the queries it saves); where the store has none (an in-memory SQLite) the generation
is None and every call reads the database.

Entries are keyed by everything the answer depends on (the request's fields and the
namespaces the caller may see), bounded (oldest dropped first), and hold response
messages that are shared: gRPC serializes them, nobody changes them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["ReadCache"]

V = TypeVar("V")


class ReadCache(Generic[V]):
    """A bounded map key -> (generation, value); `get` answers only at the same
    generation."""

    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[Hashable, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, generation: Hashable) -> V | None:
        hit = self._entries.get(key)
        if hit is None or hit[0] != generation:
            return None
        return hit[1]

    def put(self, key: Hashable, generation: Hashable, value: V) -> None:
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self._size:
                self._entries.popitem(last=False)
            self._entries[key] = (generation, value)

    def __len__(self) -> int:
        return len(self._entries)
