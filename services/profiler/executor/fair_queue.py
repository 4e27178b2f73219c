"""A fair queue of profiles: round-robin between namespaces, FIFO inside one.

The order is that of a deficit-free round robin: namespaces take turns in the order they
first had work queued (a namespace whose queue empties leaves the rotation, and joins at
its end when it has work again); inside a namespace, first in first out. So one namespace
that queues a hundred profiles delays another's next profile by at most one.

`head()` is the item whose turn it is (skipping namespaces that may not start one now),
`pop(item)` takes it (after it got a node), `position(item)` is its place in line;
`remove(item)` drops a cancelled one wherever it is. Thread-safe; waiters use `cond`.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T", bound=Hashable)


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._queues: dict[str, collections.deque[T]] = {}
        self._turns: collections.deque[str] = collections.deque()  # namespaces, in turn order

    def put(self, namespace: str, item: T) -> None:
        with self.cond:
            queue = self._queues.get(namespace)
            if queue is None:
                queue = self._queues[namespace] = collections.deque()
                self._turns.append(namespace)
            queue.append(item)
            self.cond.notify_all()

    def head(self, eligible: Callable[[str], bool] | None = None) -> T | None:
        """The item whose turn it is (None when empty): the first in the rotation whose
        namespace is `eligible` (e.g. under its running quota; default: every one). A
        namespace passed over keeps its place in the rotation."""
        with self.cond:
            for namespace in self._turns:
                if eligible is None or eligible(namespace):
                    return self._queues[namespace][0]
            return None

    def pop(self, item: T) -> None:
        """Take `item`, the first of its namespace; that namespace goes to the end of the
        rotation. ValueError when `item` is not the first of its namespace."""
        with self.cond:
            for namespace in self._turns:
                queue = self._queues[namespace]
                if queue[0] == item:
                    break
            else:
                raise ValueError(f"{item!r} is not the first of its namespace's queue")
            self._turns.remove(namespace)
            queue.popleft()
            if queue:
                self._turns.append(namespace)
            else:
                del self._queues[namespace]
            self.cond.notify_all()

    def position(self, item: T) -> int:
        """`item`'s 1-based place in `order()` (0 when it is not queued)."""
        with self.cond:
            order = self.order()
        return order.index(item) + 1 if item in order else 0

    def remove(self, item: T) -> bool:
        """Drop `item` wherever it is; False when it is not queued."""
        with self.cond:
            for namespace, queue in self._queues.items():
                if item in queue:
                    queue.remove(item)
                    if not queue:
                        del self._queues[namespace]
                        self._turns.remove(namespace)
                    self.cond.notify_all()
                    return True
            return False

    def __len__(self) -> int:
        with self.cond:
            return sum(len(q) for q in self._queues.values())

    def order(self) -> list[T]:
        """Every queued item, in the order they would be taken (for tests and logs)."""
        with self.cond:
            queues = {ns: collections.deque(q) for ns, q in self._queues.items()}
            turns = collections.deque(self._turns)
        out: list[T] = []
        while turns:
            ns = turns.popleft()
            out.append(queues[ns].popleft())
            if queues[ns]:
                turns.append(ns)
        return out
