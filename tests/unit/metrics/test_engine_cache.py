"""The metrics engine's caches over a real SQLite store, through a proxy that counts (and
can hold) the store reads: one read for many calls, one read and one replicate derivation
for many concurrent misses, bounded, revalidated, and authorization on every call."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idealrt.core.auth import Principal, Role, acting_as
from idealrt.core.costmodel.fit import FitOptions
from idealrt.core.domain import (
    Backend,
    CostModel,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Sample,
    StackSpec,
)
from idealrt.core.errors import IdealrtError, NotFound
from idealrt.services.metrics._cache import SingleFlightCache
from idealrt.services.metrics.engine import MetricsEngine
from idealrt.services.store.repository import Store, open_store

from ..costmodel.test_fit import Truth, make_samples

OPTIONS = FitOptions(bootstrap=20, seed=3)
P, Q = [16, 300, 900], [4, 40, 100]  # a workload: prompt and output tokens


class Counting:
    """The store, counting get_cost_model and all_samples; `hold` blocks the reads of
    get_cost_model until set (it is set unless a test clears it)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads = 0
        self.sample_reads = 0
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.replace: dict[str, CostModel] = {}  # what get_cost_model answers instead
        self._lock = threading.Lock()

    def get_cost_model(self, id: str) -> CostModel:
        with self._lock:
            self.reads += 1
        self.entered.set()
        self.hold.wait(60)
        return self.replace.get(id) or self.store.get_cost_model(id)

    def all_samples(self, profile_id: str) -> list[Sample]:
        with self._lock:
            self.sample_reads += 1
        return self.store.all_samples(profile_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path}/idealrt.db")
    yield st
    st.close()


def _profile(store: Store, namespace: str = "default") -> str:
    prof = Profile(
        id="",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
        plan=ProfilePlan(prompt_tokens=(1, 64), output_tokens=(2, 64)),
        namespace=namespace,
    )
    prof = store.create_profile(prof)[0]
    store.append_samples(prof.id, "b0", make_samples(Truth(), noise=0.01, seed=3))
    store.update_profile(dataclasses.replace(prof, state=ProfileState.SUCCEEDED))
    return prof.id


def _fitted(store: Store, namespace: str = "default") -> CostModel:
    return MetricsEngine(store).fit(_profile(store, namespace), OPTIONS)


def _error(call: Any) -> tuple[Any, ...]:
    with pytest.raises(IdealrtError) as e:
        call()
    err = e.value
    return type(err), err.code, err.reason, err.field, err.message


def test_one_store_read_serves_every_later_call(store: Store) -> None:
    cm = _fitted(store)
    counting = Counting(store)
    engine = MetricsEngine(counting)  # type: ignore[arg-type]
    first = engine.estimate(cm.id, P, Q, per_query=True)
    for _ in range(50):
        again = engine.estimate(cm.id, P, Q, per_query=True)
    assert engine.get(cm.id) == cm
    assert counting.reads == 1
    assert again.runtime_s is not None and first.runtime_s is not None
    np.testing.assert_array_equal(again.runtime_s, first.runtime_s)


def test_concurrent_misses_read_the_store_once(store: Store) -> None:
    cm = _fitted(store)
    counting = Counting(store)
    engine = MetricsEngine(counting)  # type: ignore[arg-type]
    counting.hold.clear()  # the first read waits until every caller is waiting too
    with ThreadPoolExecutor(max_workers=200) as pool:
        futures = [pool.submit(engine.estimate, cm.id, P, Q, per_query=False) for _ in range(200)]
        assert counting.entered.wait(60)
        # no time window is asserted on: whenever the others arrive, with one flight
        # they wait for it or find its result cached, and never read themselves
        threading.Event().wait(0.2)
        counting.hold.set()
        totals = {f.result(timeout=60).workload.total_s for f in futures}
    assert counting.reads == 1
    assert len(totals) == 1


def test_concurrent_interval_misses_derive_the_replicates_once(store: Store) -> None:
    cm = _fitted(store)
    counting = Counting(store)
    engine = MetricsEngine(counting)  # type: ignore[arg-type]  # nothing cached
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(
            pool.map(
                lambda _: engine.estimate(cm.id, P, Q, per_query=True, intervals=True),
                range(50),
            )
        )
    assert counting.sample_reads == 1  # one re-derivation (one read of the samples)
    assert counting.reads == 1
    lows = {tuple(r.low_s.tolist()) for r in results if r.low_s is not None}
    assert len(lows) == 1 and all(r.sum_interval is not None for r in results)
    assert len(engine.replicates(cm)) == OPTIONS.bootstrap


def test_a_fit_leaves_its_model_and_replicates_cached(store: Store) -> None:
    pid = _profile(store)
    counting = Counting(store)
    engine = MetricsEngine(counting)  # type: ignore[arg-type]
    cm = engine.fit(pid, OPTIONS)
    samples_after_fit = counting.sample_reads
    r = engine.estimate(cm.id, P, Q, per_query=True, intervals=True)
    assert r.sum_interval is not None
    assert counting.reads == 0 and counting.sample_reads == samples_after_fit


def test_the_cache_is_bounded(store: Store) -> None:
    pid = _profile(store)
    fitter = MetricsEngine(store)
    ids = [fitter.fit(pid, dataclasses.replace(OPTIONS, seed=s)).id for s in range(3)]
    counting = Counting(store)
    engine = MetricsEngine(counting, model_cache=2)  # type: ignore[arg-type]
    for cm_id in ids:
        engine.estimate(cm_id, P, Q, per_query=False)
    assert counting.reads == 3 and len(engine._models) == 2
    engine.estimate(ids[2], P, Q, per_query=False)  # the two most recent stay
    engine.estimate(ids[1], P, Q, per_query=False)
    assert counting.reads == 3
    engine.estimate(ids[0], P, Q, per_query=False)  # the oldest went
    assert counting.reads == 4 and len(engine._models) == 2


def test_a_model_is_reread_after_its_ttl_and_kept_when_unchanged(store: Store) -> None:
    cm = _fitted(store)
    counting = Counting(store)
    clock = Clock()
    engine = MetricsEngine(counting, model_ttl_s=60.0, clock=clock)  # type: ignore[arg-type]
    engine.estimate(cm.id, P, Q, per_query=True, intervals=True)
    prepared = engine._models.peek(cm.id)
    derived = counting.sample_reads
    clock.now += 59.0
    engine.estimate(cm.id, P, Q, per_query=True, intervals=True)
    assert counting.reads == 1
    clock.now += 2.0
    engine.estimate(cm.id, P, Q, per_query=True, intervals=True)
    assert counting.reads == 2
    entry = engine._models.peek(cm.id)
    assert entry is not None and prepared is not None
    assert entry.prepared is prepared.prepared  # same revision: same preparation
    assert counting.sample_reads == derived  # and the same replicates


def test_a_model_changed_under_its_id_replaces_the_cached_one(store: Store) -> None:
    """The store never changes a stored model; a store replaced under the service can.
    After the TTL (or on seeing another copy in a list) the new revision is used, and its
    replicates are its own."""
    cm = _fitted(store)
    counting = Counting(store)
    clock = Clock()
    engine = MetricsEngine(counting, model_ttl_s=60.0, clock=clock)  # type: ignore[arg-type]
    before = engine.estimate(cm.id, P, Q, per_query=False, intervals=True)
    slower = dataclasses.replace(
        cm, alpha_knots_s=tuple(2 * s for s in cm.alpha_knots_s), beta0_s=2 * cm.beta0_s
    )
    counting.replace[cm.id] = slower
    assert engine.estimate(cm.id, P, Q, per_query=False).workload == before.workload
    clock.now += 61.0
    after = engine.estimate(cm.id, P, Q, per_query=False, intervals=True)
    assert after.workload.total_s > 1.5 * before.workload.total_s
    assert after.sum_interval is not None and before.sum_interval is not None
    assert counting.sample_reads == 2  # the replicates of each revision, each derived once

    # a list that hands the engine another copy drops the cached one at once
    counting.replace.clear()
    engine.list_models(100, "")  # the store's own copy: differs from `slower`
    assert engine._models.peek(cm.id) is None
    assert engine.estimate(cm.id, P, Q, per_query=False).workload == before.workload


def test_a_cached_model_is_authorized_for_every_caller(store: Store) -> None:
    cm = _fitted(store, namespace="team-a")
    counting = Counting(store)
    engine = MetricsEngine(counting)  # type: ignore[arg-type]
    reader = Principal("a-reader", {"team-a": Role.READER})
    other = Principal("b-writer", {"team-b": Role.WRITER})
    with acting_as(reader):
        ok = engine.estimate(cm.id, P, Q, per_query=False, intervals=True)
    assert counting.reads == 1
    with acting_as(other):  # cached now; still invisible, exactly as a missing id
        hidden = _error(lambda: engine.estimate(cm.id, P, Q, per_query=False))
        hidden_get = _error(lambda: engine.get(cm.id))
        missing = _error(lambda: engine.estimate("cm_000000000000", P, Q, per_query=False))
        with pytest.raises(NotFound):
            engine.estimate(cm.id, P, Q, per_query=True, intervals=True)
    assert hidden[0] is NotFound
    assert hidden[1:4] == missing[1:4] == hidden_get[1:4]  # code, reason, field
    assert hidden[4] == missing[4].replace("cm_000000000000", cm.id)
    assert counting.reads == 2  # the missing id; misses are not cached
    with acting_as(reader):
        assert engine.estimate(cm.id, P, Q, per_query=False, intervals=True) == ok
    assert counting.reads == 2


def test_single_flight_cache_passes_errors_to_every_waiter_and_caches_none() -> None:
    cache: SingleFlightCache[str, int] = SingleFlightCache(4)
    started, release = threading.Event(), threading.Event()
    loads = []

    def failing(_: int | None) -> int:
        loads.append(1)
        started.set()
        release.wait(60)
        raise NotFound("COST_MODEL_NOT_FOUND", "no cost model", field="id")

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(cache.get, "k", failing) for _ in range(8)]
        assert started.wait(60)
        threading.Event().wait(0.1)
        release.set()
        for f in futures:
            with pytest.raises(NotFound):
                f.result(timeout=60)
    assert len(cache) == 0
    assert cache.get("k", lambda _: 7) == 7 and len(cache) == 1
    with pytest.raises(ValueError):
        SingleFlightCache(-1)
