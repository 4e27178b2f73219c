"""Profiler fixtures: the real store (in-memory SQLite) and a synthetic target.

`SyntheticTarget` is a deterministic, in-process GenerationTarget. It is used where the
logic under test is the profiler's own (plan order, stopping, contention verdicts, resume,
cancel, the manager's life cycle): its timings are exact functions of (p, o) plus injected
faults (a slow window, nonconforming lengths, Unavailable errors), so a test can state what
must be flagged. It never sleeps and never measures anything. Tests that need real timing
use the real serving registry (test_real_serving.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import (
    ContentionObservation,
    ModelRef,
    Profile,
    ProfilePlan,
    Sample,
    SampleFlag,
    StackSpec,
)
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.monitors import MonitorSet, Window
from idealrt.services.profiler.runner import RunnerOptions
from idealrt.services.store.repository import Store, open_store

TINY_SPEC = ModelSpec(
    name="synthetic", layers=2, d_model=64, heads=2, d_ff=256, vocab=1000, max_positions=512
)


@dataclasses.dataclass
class Call:
    p: int
    o: int
    seed: int


class SyntheticTarget:
    """total_ns = prefill(p) + (o - 1) * step, times `slow(call_index)`.

    prefill(p) = 1_000_000 + 10_000 * p ns; step = 2_000_000 ns (+ 1_000 ns x context).
    """

    def __init__(
        self,
        *,
        spec: ModelSpec | None = TINY_SPEC,
        slow: Callable[[int], float] | None = None,
        noise: Callable[[int], float] | None = None,
        short_output: Callable[[int], bool] | None = None,
        fail: Callable[[int], BaseException | None] | None = None,
        on_generate: Callable[[int], None] | None = None,
    ) -> None:
        self.spec = spec
        self.slow = slow or (lambda i: 1.0)
        self.noise = noise or (lambda i: 1.0)
        self.short_output = short_output or (lambda i: False)
        self.fail = fail or (lambda i: None)
        self.on_generate = on_generate
        self.calls: list[Call] = []
        self.prepared = 0
        self.closed = 0

    def prepare(self) -> ModelSpec | None:
        self.prepared += 1
        return self.spec

    def generate(self, prompt_tokens: int, output_tokens: int, seed: int) -> Sample:
        i = len(self.calls)
        self.calls.append(Call(prompt_tokens, output_tokens, seed))
        if self.on_generate is not None:
            self.on_generate(i)
        exc = self.fail(i)
        if exc is not None:
            raise exc
        factor = self.slow(i) * self.noise(i)
        o = output_tokens - 1 if self.short_output(i) and output_tokens > 1 else output_tokens
        prefill = int((1_000_000 + 10_000 * prompt_tokens) * factor)
        steps = tuple(
            int((2_000_000 + 1_000 * (prompt_tokens + k + 1)) * factor) for k in range(o - 1)
        )
        return Sample(
            prompt_tokens=prompt_tokens,
            output_tokens=o,
            prefill_ns=prefill,
            decode_ns=steps,
            total_ns=prefill + sum(steps),
            start_time=datetime.now(UTC),
            rpc_ns=prefill + sum(steps) + 50_000,
        )

    def environment(self) -> dict[str, str]:
        return {"kind": "synthetic"}

    def close(self) -> None:
        self.closed += 1


class ScriptedMonitors(MonitorSet):
    """Monitors whose observation of window i (a sample, or a quiet window while the
    runner waits contention out) is `observe(i)` (no real reads). `watching`: whether the
    runner may wait on them (a real set watches when it has a CPU or GPU monitor)."""

    def __init__(
        self, observe: Callable[[int], ContentionObservation], watching: bool = False
    ) -> None:
        super().__init__()
        self.observe = observe
        self.count = 0
        self._watching = watching

    @property
    def watching(self) -> bool:
        return self._watching

    def before(self) -> Window:
        return Window(0, None, None, frozenset(), None)

    def after(self, w: Window) -> ContentionObservation:
        obs = self.observe(self.count)
        self.count += 1
        return obs


# the store-write mode quiet_options gives by default (the `write_mode` fixture sets it)
_WRITES = {"background": True}


def quiet_options(lease_dir: Path, **kw: Any) -> RunnerOptions:
    """Runner options for synthetic runs: no real monitors (the shared CI machine's noise
    is not what these tests are about), immediate retries; store writes in background
    or inline as the `write_mode` fixture says (background without it)."""
    kw.setdefault("background_writes", _WRITES["background"])
    policy = kw.pop("contention", ContentionPolicy(retry_backoff_s=0.0, quiet_window_s=0.0))
    return RunnerOptions(
        lease_dir=lease_dir,
        contention=policy,
        monitors=kw.pop("monitors", lambda p, env: MonitorSet()),
        **kw,
    )


def make_profile(store: Store | None = None, **plan_kw: Any) -> Profile:
    plan_args: dict[str, Any] = {
        "prompt_tokens": (8, 32),
        "output_tokens": (2, 6),
        "repeats": 3,
        "warmups": 1,
        "seed": 7,
    }
    plan_args.update(plan_kw)
    profile = Profile(
        id="",
        model=ModelRef(name="synthetic", spec=TINY_SPEC),
        stack=StackSpec(),
        plan=ProfilePlan(**plan_args),
    )
    if store is not None:
        profile, _ = store.create_profile(profile)
    return profile


def ok_per_repeat(store: Store, profile_id: str) -> Counter[tuple[int, int, bool, int]]:
    """The stored OK samples per (p, o, heldout, repeat): exactly once is all 1s."""
    return Counter(
        (s.prompt_tokens, s.output_tokens, s.heldout, s.repeat)
        for s in store.all_samples(profile_id)
        if s.flag == SampleFlag.OK
    )


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll `pred` (a bounded loop: AssertionError naming `what` after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what}")
        time.sleep(0.005)


@pytest.fixture
def store() -> Iterator[Store]:
    s = open_store("sqlite://")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["background", "inline"])
def write_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test with store writes on the writer's thread and inline (between samples,
    RunnerOptions.background_writes=False): modules about storage use both
    (`pytestmark = pytest.mark.usefixtures("write_mode")`)."""
    _WRITES["background"] = request.param == "background"
    try:
        yield request.param
    finally:
        _WRITES["background"] = True


@pytest.fixture
def lease_dir(tmp_path: Path) -> Path:
    return tmp_path / "leases"


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event tests use to hold a synthetic target inside generate()."""
    ev = threading.Event()
    yield ev
    ev.set()


class Kit:
    """The helpers above, handed to tests as the `kit` fixture (test modules cannot import
    conftest under --import-mode=importlib)."""

    SyntheticTarget = SyntheticTarget
    ScriptedMonitors = ScriptedMonitors
    TINY_SPEC = TINY_SPEC
    quiet_options = staticmethod(quiet_options)
    make_profile = staticmethod(make_profile)
    ok_per_repeat = staticmethod(ok_per_repeat)
    wait_until = staticmethod(wait_until)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit
