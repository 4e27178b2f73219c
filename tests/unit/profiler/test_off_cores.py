"""Keeping the profiler's process off the cores a profile pins its serving child to:
`CoreExclusion` (core/affinity.py) on this process's real affinity, `OffCoresTarget`
around a target, and the CPU monitor counting this process as ours only while it may run
on the monitored cores. The end-to-end version, with the real serving child, is
tests/e2e/test_suite_process.py."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from idealrt.core.affinity import CoreExclusion
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec
from idealrt.services.profiler._off_cores import OffCoresTarget
from idealrt.services.profiler.monitors import pin_to_cores
from idealrt.services.profiler.runner import default_monitors

two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


def _threads() -> dict[int, frozenset[int]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            continue
    return out


@pytest.fixture
def mine() -> Iterator[frozenset[int]]:
    before = frozenset(os.sched_getaffinity(0))
    try:
        yield before
    finally:
        pin_to_cores(before)


@pytest.fixture
def helper_thread() -> Iterator[threading.Thread]:
    """A thread started before the exclusion: it must move too."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="helper", daemon=True)
    t.start()
    try:
        yield t
    finally:
        stop.set()
        t.join()


@two_cpus
def test_exclusion_moves_every_thread_and_restores(
    mine: frozenset[int], helper_thread: threading.Thread
) -> None:
    core = max(mine)
    ex = CoreExclusion()
    release = ex.exclude({core})
    assert all(cpus == mine - {core} for cpus in _threads().values())
    assert ex.excluded() == {core}
    release()
    release()  # a second release does nothing
    assert all(cpus == mine for cpus in _threads().values())
    assert ex.excluded() == frozenset()


@two_cpus
def test_overlapping_exclusions_widen_as_each_ends(mine: frozenset[int]) -> None:
    hi, lo = max(mine), min(mine)
    ex = CoreExclusion()
    first = ex.exclude({hi})
    second = ex.exclude({lo, hi})  # every core: the process stays where it was
    assert frozenset(os.sched_getaffinity(0)) == mine
    assert ex.excluded() == frozenset()  # it could not leave them, and says so
    second()
    assert frozenset(os.sched_getaffinity(0)) == mine - {hi}
    first()
    assert frozenset(os.sched_getaffinity(0)) == mine


def _profile(cores: str) -> Profile:
    return Profile(
        id="prof_1",
        model=ModelRef(name="tiny-gpt2"),
        stack=StackSpec(device="cpu", options={"cores": cores} if cores else {}),
        plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,)),
    )


class _Target:
    def __init__(self, fail_close: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_close = fail_close
        self.affinity_at_prepare: frozenset[int] | None = None

    def prepare(self) -> None:
        self.affinity_at_prepare = frozenset(os.sched_getaffinity(0))
        self.calls.append("prepare")

    def generate(self, prompt_tokens: int, output_tokens: int, seed: int) -> Any:
        self.calls.append("generate")

    def environment(self) -> dict[str, str]:
        return {"kind": "serving"}

    def close(self) -> None:
        self.calls.append("close")
        if self.fail_close:
            raise RuntimeError("close failed")

    def bind_cancel(self, event: threading.Event) -> None:
        self.calls.append("bind_cancel")


@two_cpus
def test_target_keeps_this_process_off_from_prepare_to_close(mine: frozenset[int]) -> None:
    core = max(mine)
    inner = _Target(fail_close=True)
    target = OffCoresTarget(inner, _profile(str(core)), CoreExclusion())  # type: ignore[arg-type]
    target.bind_cancel(threading.Event())  # what the target does not define is the inner's
    target.prepare()
    assert inner.affinity_at_prepare == mine - {core}  # off before the model loads
    target.prepare()  # a second prepare excludes nothing more
    assert target.environment()["harness.affinity"] == ",".join(map(str, sorted(mine - {core})))
    with pytest.raises(RuntimeError):
        target.close()  # a failing close still widens the affinity again
    assert frozenset(os.sched_getaffinity(0)) == mine
    assert inner.calls == ["bind_cancel", "prepare", "prepare", "close"]


def test_target_without_cores_or_with_bad_ones_changes_nothing(mine: frozenset[int]) -> None:
    for text in ("", "3-1"):
        inner = _Target()
        target = OffCoresTarget(inner, _profile(text), CoreExclusion())  # type: ignore[arg-type]
        target.prepare()
        assert inner.affinity_at_prepare == mine
        assert "harness.affinity" not in target.environment()
        target.close()


@two_cpus
def test_monitor_counts_this_process_only_where_it_may_run(mine: frozenset[int]) -> None:
    core = max(mine)
    env = {"serving.pid": "1", "serving.host": socket.gethostname()}
    on = default_monitors(_profile(str(core)), env)
    assert on.cpu is not None and on.cpu.own_pids == {os.getpid(), 1}
    pin_to_cores(mine - {core})
    off = default_monitors(_profile(str(core)), env)
    assert off.cpu is not None and off.cpu.own_pids == {1}  # the serving child only
    assert off.describe()["monitor.cpu.own_pids"] == "1"
