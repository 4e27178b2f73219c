"""FairQueue on its own: round-robin across namespaces, FIFO inside one."""

from __future__ import annotations

import pytest

from idealrt.services.profiler.executor.fair_queue import FairQueue


def test_round_robin_fifo_and_remove() -> None:
    q: FairQueue[str] = FairQueue()
    for ns, item in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        q.put(ns, item)
    assert q.order() == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert [q.position(i) for i in ("a1", "b1", "a3", "zz")] == [1, 2, 6, 0]
    with pytest.raises(ValueError):
        q.pop("a2")  # not the first of its namespace
    taken = []
    while (head := q.head()) is not None:
        if head == "a2":
            assert q.remove("b2")
        q.pop(head)
        taken.append(head)
    assert taken == ["a1", "b1", "c1", "a2", "a3"]
    assert len(q) == 0 and not q.remove("zz")


def test_a_namespace_at_its_limit_is_passed_over_and_keeps_its_turn() -> None:
    """head(eligible) skips a namespace that may not start one now (its running quota);
    taking another namespace's item sends only that namespace to the end."""
    q: FairQueue[str] = FairQueue()
    for ns, item in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("c", "c1")]:
        q.put(ns, item)
    assert q.head(lambda ns: ns != "a") == "b1"
    q.pop("b1")
    assert q.order() == ["a1", "c1", "a2"]  # a kept its place at the front
    assert q.head(lambda ns: ns != "a") == "c1"
    assert q.head(lambda ns: False) is None
    assert q.head() == "a1"
