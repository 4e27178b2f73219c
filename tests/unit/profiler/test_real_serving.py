"""The profiler over the real serving registry (tiny-gpt2, PyTorch on CPU, in this process)
and the real store: a whole profile through the manager, and a real CPU hog started
mid-profile on the measurement's core, detected and recorded in the stored flags."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from idealrt.core.domain import (
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Sample,
    SampleFlag,
    StackSpec,
)
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.monitors import current_affinity, pin_to_cores
from idealrt.services.profiler.runner import RunnerOptions, default_monitors, run_profile
from idealrt.services.profiler.serving_target import ServingTarget
from idealrt.services.serving.registry import ModelRegistry

HOG_S = 3.0  # how long the hogs of test_cpu_hog_mid_profile_is_detected run
HOG = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
print("go", flush=True)
end = time.monotonic() + float(sys.argv[2])  # a safety limit: the test kills it
while time.monotonic() < end:
    pass
"""


@pytest.fixture
def registry() -> Iterator[ModelRegistry]:
    reg = ModelRegistry()
    yield reg
    reg.close()


def tiny_profile(store: Any, **plan: Any) -> Profile:
    profile = Profile(
        id="",
        model=ModelRef(name="tiny-gpt2"),
        stack=plan.pop("stack", StackSpec()),
        plan=ProfilePlan(**plan),
    )
    return store.create_profile(profile)[0]


def test_profile_through_the_manager(store, lease_dir, registry) -> None:  # type: ignore[no-untyped-def]
    options = RunnerOptions(lease_dir=lease_dir, contention=ContentionPolicy(enabled=False))
    m = ProfileManager(
        store, lambda p: ServingTarget.in_process(registry, p), lease_dir, options=options
    )
    try:
        p = m.create(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(),
                plan=ProfilePlan(
                    (4, 32), (2, 16), repeats=2, warmups=1, holdout_prompt_tokens=(16,)
                ),
            )
        )
        final = list(m.watch(p.id, timeout=120))[-1]
    finally:
        m.shutdown()
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert isinstance(final.model_spec, ModelSpec) and final.model_spec.name == "tiny-gpt2"
    samples = store.all_samples(p.id)
    ok = [s for s in samples if s.flag == SampleFlag.OK]
    assert len(ok) == final.completed_samples == 6 * 2
    assert {(s.prompt_tokens, s.output_tokens, s.heldout) for s in ok} == {
        (4, 2, False),
        (4, 16, False),
        (32, 2, False),
        (32, 16, False),
        (16, 2, True),
        (16, 16, True),
    }
    for s in ok:
        assert len(s.decode_ns) == s.output_tokens - 1 and all(d > 0 for d in s.decode_ns)
        assert 0 < s.prefill_ns <= s.total_ns <= s.rpc_ns  # RPC time is around, never inside
        assert s.start_time is not None
    e = final.provenance.entries
    assert e["target.serving.pid"] == str(os.getpid())
    assert str(os.getpid()) in e["monitor.cpu.own_pids"].split(",")
    assert e["torch.version"] != "absent" and e["model.name"] == "tiny-gpt2"
    assert registry.list()[0] == []  # the target unloaded its model


class HookedTarget:
    """The real ServingTarget with a hook run before generation `i` is requested."""

    def __init__(self, inner: ServingTarget, hook: Callable[[int], None]) -> None:
        self.inner, self.hook, self.i = inner, hook, 0

    def prepare(self) -> ModelSpec | None:
        return self.inner.prepare()

    def generate(self, p: int, o: int, seed: int) -> Sample:
        self.hook(self.i)
        self.i += 1
        return self.inner.generate(p, o, seed)

    def environment(self) -> dict[str, str]:
        return self.inner.environment()

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_cpu_hog_mid_profile_is_detected(store, lease_dir, registry) -> None:  # type: ignore[no-untyped-def]
    """Two busy processes pinned to the measurement's core start at generation 20 (after
    the warm-ups and four rounds) and run for HOG_S seconds of wall time, as real
    contention does (not a number of samples). The sample they hit is flagged with the
    monitors' evidence; the runner then waits the load out on the monitors' quiet windows
    (blocking waits) instead of measuring into it, re-measures, and finishes."""
    core = min(current_affinity())
    profile = tiny_profile(
        store, prompt_tokens=(8, 48), output_tokens=(24, 48), repeats=10, warmups=1
    )
    first = 4 + 4 * 4
    hogs: list[subprocess.Popen[str]] = []
    window: list[datetime] = []
    done = threading.Event()

    def stop_hogs() -> None:
        if done.wait(HOG_S):  # the run ended first
            return
        window.append(datetime.now(UTC))
        for hog in hogs:
            hog.kill()
            hog.wait()

    stopper = threading.Thread(target=stop_hogs, name="hog-stopper")

    def hog_window(i: int) -> None:
        if i == first:
            for _ in range(2):
                hogs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", HOG, str(core), "600"],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            for hog in hogs:
                assert hog.stdout is not None and hog.stdout.readline().strip() == "go"
            window.append(datetime.now(UTC))
            stopper.start()

    target = HookedTarget(ServingTarget.in_process(registry, profile), hog_window)
    previous = pin_to_cores({core})  # every thread of this process, torch's included
    try:
        final = run_profile(
            profile,
            target,
            store,
            cancel=threading.Event(),
            on_progress=lambda p: None,
            options=RunnerOptions(
                lease_dir=lease_dir, monitors=functools.partial(default_monitors, cores={core})
            ),
        )
    finally:
        pin_to_cores(previous)
        done.set()
        if stopper.is_alive():
            stopper.join()
        for hog in hogs:
            hog.kill()
            hog.wait()
            assert hog.stdout is not None
            hog.stdout.close()
    assert len(window) == 2, "the hog window never closed (the run ended under it)"
    start, end = window
    samples = [s for s in store.all_samples(profile.id) if s.flag != SampleFlag.WARMUP]
    during = [s for s in samples if s.start_time and start <= s.start_time <= end]
    outside = [s for s in samples if s.start_time and not start <= s.start_time <= end]
    hit = [s for s in during if s.flag == SampleFlag.CONTENDED]
    timeline = [
        (
            (s.start_time - start).total_seconds() if s.start_time else None,
            s.flag.value,
            s.total_ns // 1000,
            round(s.contention.foreign_cpu_s, 4),
        )
        for s in samples
    ]
    assert during and len(hit) >= len(during) - 1, (final.state, final.error, timeline)
    flagged_outside = sum(s.flag == SampleFlag.CONTENDED for s in outside)
    # the flags follow the hog: outside its window they are rarer than inside it. (Not
    # "almost never": on a busy shared machine other work on the core is real contention,
    # and flagging it is right; seen at 76 of 101 under a parallel test run.)
    assert flagged_outside / max(1, len(outside)) < len(hit) / len(during), timeline
    assert all(s.contention.foreign_cpu_s > 0 for s in hit)  # the monitors saw it too
    # the load was waited out: the run paused on quiet windows, and measured on after it
    assert float(final.provenance.entries["contention.paused_s"]) > 0, timeline
    assert any(s.start_time and s.start_time > end for s in samples), timeline
    # flagged repeats were re-measured, or the profile says why it is not idealized
    if final.state == ProfileState.SUCCEEDED:
        ok = [s for s in samples if s.flag == SampleFlag.OK]
        abandoned = int(final.provenance.entries["contention.abandoned_repeats"])
        assert len(ok) == 4 * 10 - abandoned and abandoned <= 2
    else:
        assert final.state == ProfileState.INVALID and final.error.startswith("CONTENTION: ")
    assert int(final.provenance.entries["contention.contended"]) >= len(hit)
    assert final.provenance.entries["monitor.cpu.cores"] == str(core)
