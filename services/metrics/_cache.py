"""A bounded, single-flight LRU cache: what the metrics engine keeps cost models and their
bootstrap replicates in.

- Bounded: at most `size` entries; the least recently used is dropped first.
- Single-flight: concurrent misses on one key run `load` once; the others wait for it and
  get its value, or its exception (nothing is cached then, so the next call loads again).
- Revalidation: `get(..., fresh=...)` treats an entry that is no longer fresh as a miss,
  and hands the stale value to `load`, which may return it unchanged (a re-read found the
  same revision) or a new one.

Thread-safe (one lock, held only around the dictionaries, never during `load`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

__all__ = ["SingleFlightCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlightCache(Generic[K, V]):
    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"a cache holds >= 0 entries, got {size}")
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, Future[V]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def peek(self, key: K) -> V | None:
        """The cached value of `key` (None: none), without loading or touching its recency."""
        with self._lock:
            return self._entries.get(key)

    def get(
        self,
        key: K,
        load: Callable[[V | None], V],
        *,
        fresh: Callable[[V], bool] | None = None,
    ) -> V:
        """The value of `key`: cached (and `fresh(value)` when given), else `load(stale)`
        run once for all concurrent callers; `stale` is the value that was no longer
        fresh, or None."""
        with self._lock:
            stale = self._entries.get(key)
            if stale is not None and (fresh is None or fresh(stale)):
                self._entries.move_to_end(key)
                return stale
            flight = self._loading.get(key)
            leader = flight is None
            if flight is None:
                flight = self._loading[key] = Future()
        if not leader:
            return flight.result()
        try:
            value = load(stale)
        except BaseException as e:
            with self._lock:
                del self._loading[key]
            flight.set_exception(e)
            raise
        with self._lock:
            del self._loading[key]
            self._store(key, value)
        flight.set_result(value)
        return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._store(key, value)

    def invalidate(self, key: K) -> None:
        """Drop `key`; a load in flight still completes, and caches what it read."""
        with self._lock:
            self._entries.pop(key, None)

    def _store(self, key: K, value: V) -> None:
        if self.size == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
