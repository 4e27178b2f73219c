"""Concurrent Generate calls on one model through the registry: serialized timed regions,
exact lengths, the queue bound, and calls that are gone or late never running.

The pytorch tests run a tiny model with seeded random weights; a recording wrapper around
its backend keeps the span of every backend.generate (a superset of its timed region) and
a wrapper around the registry's prompt builder the span of every preparation, so overlap
is read from recorded perf_counter_ns, not inferred from timing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import torch

from idealrt.core.config import ServingConfig
from idealrt.core.domain import Backend, ModelRef, StackSpec
from idealrt.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from idealrt.core.model_spec import ModelSpec
from idealrt.core.serving_contract import GenerationResult, MemoryReport
from idealrt.services.serving.backends.pytorch_backend import PytorchBackend
from idealrt.services.serving.device_queue import DEFAULT_MAX_QUEUED, Call
from idealrt.services.serving.registry import BackendTable, ModelRegistry
from idealrt.services.serving.servicer import DEADLINE_BACKSTOP_S, call_of
from idealrt.services.serving.validate import ServingLimits

WAIT_S = 30.0
CONCURRENT = 8
PROMPT, OUT = 12, 9
Span = tuple[int, int]


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def wait_until(pred: Callable[[], bool]) -> None:
    """For the test thread only: until `pred` (the registry offers no event to wait on)."""
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class Recording:
    """A backend that records the perf_counter_ns span of each generate of `inner`; the
    first generate may wait (before its span) until `hold_first` says go."""

    name = "recording"

    def __init__(self, inner: Any, spans: list[Span]) -> None:
        self.inner = inner
        self.spans = spans
        self.hold_first: Callable[[], None] | None = None

    def load(
        self, spec: ModelSpec, stack: StackSpec, weights_path: str, seed: int, max_context: int
    ) -> MemoryReport:
        report: MemoryReport = self.inner.load(spec, stack, weights_path, seed, max_context)
        return report

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        if self.hold_first is not None:
            hold, self.hold_first = self.hold_first, None
            hold()
        t0 = time.perf_counter_ns()
        result: GenerationResult = self.inner.generate(prompt_ids, output_tokens, batch_size)
        self.spans.append((t0, time.perf_counter_ns()))
        return result

    def unload(self) -> None:
        self.inner.unload()


def _overlapping(a: Sequence[Span], b: Sequence[Span]) -> list[tuple[Span, Span]]:
    return [(x, y) for x in a for y in b if x is not y and x[0] < y[1] and y[0] < x[1]]


@pytest.fixture
def recorded(
    tiny: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ModelRegistry, str, Recording, list[Span], list[Span]]]:
    """(registry, model id, its backend, generate spans, prompt-building spans): the tiny
    llama on the pytorch backend, threads=1."""
    gen_spans: list[Span] = []
    prompt_spans: list[Span] = []
    made: list[Recording] = []

    def factory() -> Recording:
        made.append(Recording(PytorchBackend(), gen_spans))
        return made[-1]

    original = ModelRegistry._prompt

    def prompt(spec: ModelSpec, ids: Sequence[int] | None, length: int, seed: int) -> list[int]:
        t0 = time.perf_counter_ns()
        out = original(spec, ids, length, seed)
        prompt_spans.append((t0, time.perf_counter_ns()))
        return out

    monkeypatch.setattr(ModelRegistry, "_prompt", staticmethod(prompt))
    table = BackendTable()
    table.register(Backend.PYTORCH, factory)
    reg = ModelRegistry(table)
    stack = StackSpec(Backend.PYTORCH, "cpu", "fp32", options={"threads": "1"})
    m = reg.load(ModelRef(spec=tiny["llama"], seed=5), stack, max_context=32)
    gen_spans.clear()  # the load's warm-up
    try:
        yield reg, m.model_id, made[0], gen_spans, prompt_spans
    finally:
        reg.close()


def test_concurrent_generations_run_one_at_a_time_with_exact_lengths(
    recorded: tuple[ModelRegistry, str, Recording, list[Span], list[Span]],
) -> None:
    reg, mid, backend, gen_spans, prompt_spans = recorded
    alone = {
        s: reg.generate(mid, prompt_length=PROMPT, prompt_seed=s, output_tokens=OUT).output_ids
        for s in range(CONCURRENT)
    }
    gen_spans.clear()
    prompt_spans.clear()
    # the first call keeps the device until all the others are queued behind it
    backend.hold_first = lambda: wait_until(lambda: reg.queue_stats(mid).waiting == CONCURRENT - 1)
    results: dict[int, GenerationResult | BaseException] = {}

    def run(seed: int) -> None:
        try:
            results[seed] = reg.generate(
                mid, prompt_length=PROMPT, prompt_seed=seed, output_tokens=OUT
            )
        except BaseException as e:
            results[seed] = e

    threads = [threading.Thread(target=run, args=(s,)) for s in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert len(results) == CONCURRENT
    for seed, r in results.items():
        assert isinstance(r, GenerationResult), r
        assert (r.prompt_tokens, r.output_tokens, r.batch_size) == (PROMPT, OUT, 1)
        assert len(r.decode_ns) == OUT - 1 and len(r.output_ids) == OUT
        assert r.total_ns == r.prefill_ns + sum(r.decode_ns)
        assert r.output_ids == alone[seed]  # queueing changes nothing of the result
    assert len(gen_spans) == CONCURRENT
    assert _overlapping(gen_spans, gen_spans) == []  # one on the device at a time
    # no preparation of a waiting call ran inside another call's generation
    assert len(prompt_spans) == CONCURRENT
    assert _overlapping(prompt_spans, gen_spans) == []
    stats = reg.queue_stats(mid)
    assert (stats.waiting, stats.held, stats.ran, stats.refused, stats.left) == (
        0,
        False,
        CONCURRENT * 2,
        0,
        0,
    )


# ---- the queue's edges, on a backend the test controls ----
class GatedBackend:
    """Each generate blocks until `gate` is set; counts the generations that ran."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.ran: list[int] = []

    def load(self, *_: Any) -> MemoryReport:
        return MemoryReport(1, 2, 3, 4)

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        self.started.release()
        assert self.gate.wait(WAIT_S)
        self.ran.append(len(prompt_ids))
        o = output_tokens
        return GenerationResult(
            len(prompt_ids), o, (0,) * o, 5, (1,) * (o - 1), 5 + o - 1, datetime.now(UTC)
        )

    def unload(self) -> None:
        pass


@pytest.fixture
def gated() -> Iterator[tuple[ModelRegistry, str, GatedBackend]]:
    backend = GatedBackend()
    table = BackendTable()
    table.register(Backend.ONNXRUNTIME, lambda: backend)
    limits = dataclasses.replace(
        ServingLimits.from_config(ServingConfig()), max_queued_generations=2
    )
    reg = ModelRegistry(table, limits=limits)
    m = reg.load(ModelRef(name="tiny-gpt2"), StackSpec(Backend.ONNXRUNTIME), max_context=64)
    try:
        yield reg, m.model_id, backend
    finally:
        backend.gate.set()
        reg.close()


class Caller:
    """A generate on a thread of its own; `outcome` once it is over."""

    def __init__(self, reg: ModelRegistry, mid: str, p: int, call: Call | None = None) -> None:
        self.outcome: GenerationResult | BaseException | None = None

        def run() -> None:
            try:
                self.outcome = reg.generate(mid, prompt_length=p, output_tokens=2, call=call)
            except BaseException as e:
                self.outcome = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> GenerationResult | BaseException | None:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        return self.outcome


def _busy(reg: ModelRegistry, mid: str, backend: GatedBackend) -> Caller:
    """A call that holds the device (blocked in the backend until the gate opens)."""
    first = Caller(reg, mid, 1)
    assert backend.started.acquire(timeout=WAIT_S)
    return first


def test_the_queue_bound_is_resource_exhausted_with_its_reason(
    gated: tuple[ModelRegistry, str, GatedBackend],
) -> None:
    reg, mid, backend = gated
    first = _busy(reg, mid, backend)
    waiting = [Caller(reg, mid, 2), Caller(reg, mid, 3)]
    wait_until(lambda: reg.queue_stats(mid).waiting == 2)
    with pytest.raises(ResourceExhausted) as e:
        reg.generate(mid, prompt_length=4, output_tokens=2)
    assert e.value.reason == "GENERATION_QUEUE_FULL"
    with pytest.raises(InvalidArgument):  # a bad request is refused as such, not queued
        reg.generate(mid, prompt_length=4, output_tokens=0)
    backend.gate.set()
    assert all(isinstance(c.result(), GenerationResult) for c in (first, *waiting))
    assert backend.ran == [1, 2, 3]
    assert reg.queue_stats(mid).refused == 1


def test_a_generation_cancelled_or_past_its_deadline_while_queued_never_runs(
    gated: tuple[ModelRegistry, str, GatedBackend],
) -> None:
    reg, mid, backend = gated
    first = _busy(reg, mid, backend)
    late = Caller(reg, mid, 2, Call(deadline=time.monotonic() + 0.05))
    cancelled_call = Call()
    cancelled = Caller(reg, mid, 3, cancelled_call)
    wait_until(lambda: reg.queue_stats(mid).admitted == 3)
    cancelled_call.terminated()
    late_out, cancelled_out = late.result(), cancelled.result()
    assert isinstance(late_out, Unavailable)
    assert late_out.reason == "GENERATION_DEADLINE_EXPIRED"
    assert isinstance(cancelled_out, Unavailable)
    assert cancelled_out.reason == "GENERATION_CANCELLED"
    backend.gate.set()
    assert isinstance(first.result(), GenerationResult)
    assert backend.ran == [1]  # neither ever reached the backend
    assert reg.queue_stats(mid).left == 2


def test_unload_sends_waiting_generations_away(
    gated: tuple[ModelRegistry, str, GatedBackend],
) -> None:
    reg, mid, backend = gated
    first = _busy(reg, mid, backend)
    waiting = Caller(reg, mid, 2)
    wait_until(lambda: reg.queue_stats(mid).admitted == 2)
    unloader = threading.Thread(target=reg.unload, args=(mid,))
    unloader.start()
    out = waiting.result()
    assert isinstance(out, NotFound) and out.reason == "MODEL_NOT_LOADED"
    backend.gate.set()
    unloader.join(WAIT_S)
    assert isinstance(first.result(), GenerationResult)
    assert backend.ran == [1]


def test_the_queue_bound_comes_from_the_limits() -> None:
    limits = ServingLimits.from_config(ServingConfig())
    assert limits.max_queued_generations == DEFAULT_MAX_QUEUED >= CONCURRENT
    with pytest.raises(ValueError):
        dataclasses.replace(limits, max_queued_generations=0)


# ---- the servicer's side: an RPC as a Call ----
class FakeContext:
    def __init__(self, remaining: float | None, active: bool = True) -> None:
        self.remaining = remaining
        self.active = active
        self.callbacks: list[Callable[[], None]] = []

    def time_remaining(self) -> float | None:
        return self.remaining

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if not self.active:
            return False
        self.callbacks.append(callback)
        return True


def _as_call(ctx: FakeContext) -> Call:
    return call_of(ctx)  # type: ignore[arg-type]


def test_an_rpc_becomes_a_call_with_its_deadline_and_termination() -> None:
    ctx = FakeContext(5.0)
    call = _as_call(ctx)
    assert call.hold and call.deadline is not None
    assert 0 < call.deadline - time.monotonic() <= 5.0 + DEADLINE_BACKSTOP_S
    assert not call.is_terminated
    ctx.callbacks[0]()
    assert call.is_terminated
    ctx2 = FakeContext(None)
    call2 = _as_call(ctx2)
    assert not call2.gone()
    ctx2.active = False  # over, its callback lost: the call says so when asked
    assert call2.gone() and not call2.is_terminated
    assert _as_call(FakeContext(None)).deadline is None
    assert _as_call(FakeContext(1e300)).deadline is None
    assert _as_call(FakeContext(5.0, active=False)).is_terminated
