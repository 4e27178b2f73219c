"""FairQueue on its own: round-robin across namespaces, FIFO inside one."""

from __future__ import annotations

import pytest

from idealrt.services.profiler.executor.fair_queue import FairQueue


def test_round_robin_fifo_and_remove() -> None:
    q: FairQueue[str] = FairQueue()
    for ns, item in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        q.put(ns, item)
    assert q.order() == ["a1", "b1", "c1", "a2", "b2", "a3"]
    with pytest.raises(ValueError):
        q.pop("b1")
    taken = []
    while (head := q.head()) is not None:
        if head == "a2":
            assert q.remove("b2")
        q.pop(head)
        taken.append(head)
    assert taken == ["a1", "b1", "c1", "a2", "a3"]
    assert len(q) == 0 and not q.remove("zz")
