"""DeviceQueue: one call on the device at a time, in order; preparation only in gaps; a
bounded queue; calls that are gone or late never run; release after the answer (hold).

Every test synchronises on the queue's own events (`on_event`), never on sleeps: the
holder of the device blocks on an Event the test sets, so "queued" is a fact, not a race.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog.testing

from idealrt.core.errors import NotFound, ResourceExhausted, Unavailable
from idealrt.services.serving import device_queue as dq
from idealrt.services.serving.device_queue import Call, DeviceQueue

WAIT_S = 30.0  # how long a test waits for an event that must come (it comes at once)


class Recorder:
    """The queue's events (and the test's own marks) in order, with a condition to wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.log: list[tuple[str, Any]] = []

    def __call__(self, event: str, call: Call) -> None:  # the queue's on_event
        self.mark(event, call)

    def mark(self, event: str, who: Any) -> None:
        with self.cond:
            self.log.append((event, who))
            self.cond.notify_all()

    def count(self, event: str) -> int:
        return sum(1 for e, _ in self.log if e == event)

    def wait(self, pred: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, WAIT_S), self.log

    def events(self, who: Any) -> list[str]:
        return [e for e, w in self.log if w is who]


def closed() -> NotFound:
    return NotFound("MODEL_NOT_LOADED", "unloaded", field="model_id")


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def queue(rec: Recorder) -> DeviceQueue:
    return DeviceQueue("m-test", 3, closed_error=closed, on_event=rec)


class Runner:
    """Runs calls on threads; each call's work marks start/end in the recorder and may
    block on a gate."""

    def __init__(self, queue: DeviceQueue, rec: Recorder) -> None:
        self.queue, self.rec = queue, rec
        self.threads: list[threading.Thread] = []
        self.results: dict[int, Any] = {}

    def start(
        self,
        n: int,
        call: Call | None = None,
        gate: threading.Event | None = None,
        prepare: Callable[[], Any] | None = None,
    ) -> Call:
        call = call or Call()

        def prep() -> int:
            self.rec.mark("prepare", n)
            if prepare is not None:
                prepare()
            return n

        def work(x: int) -> int:
            self.rec.mark("work_start", x)
            if gate is not None:
                assert gate.wait(WAIT_S)
            self.rec.mark("work_end", x)
            return x * 10

        def target() -> None:
            try:
                self.results[n] = self.queue.run(prep, work, call)
            except Exception as e:
                self.results[n] = e

        t = threading.Thread(target=target, daemon=True)
        self.threads.append(t)
        t.start()
        return call

    def join(self) -> None:
        for t in self.threads:
            t.join(WAIT_S)
            assert not t.is_alive()


@pytest.fixture
def runner(queue: DeviceQueue, rec: Recorder) -> Iterator[Runner]:
    r = Runner(queue, rec)
    yield r
    queue.close()


def _holding(runner: Runner, rec: Recorder) -> threading.Event:
    """Call 0 holds the device, blocked in its work until the returned gate is set."""
    gate = threading.Event()
    runner.start(0, gate=gate)
    rec.wait(lambda: rec.count("work_start") == 1)
    return gate


def _admitted(rec: Recorder, count: int) -> None:
    rec.wait(lambda: rec.count("admitted") == count)


def test_all_is_what_it_claims() -> None:
    for name in dq.__all__:
        assert hasattr(dq, name), name


def test_calls_run_one_at_a_time_in_arrival_order(
    queue: DeviceQueue, rec: Recorder, runner: Runner
) -> None:
    gate = _holding(runner, rec)
    for n in (1, 2, 3):
        runner.start(n)
        _admitted(rec, n + 1)  # one at a time: arrival order is FIFO order
    assert queue.stats().waiting == 3 and queue.stats().held
    gate.set()
    runner.join()
    assert runner.results == {0: 0, 1: 10, 2: 20, 3: 30}
    work = [(e, w) for e, w in rec.log if e in ("work_start", "work_end")]
    assert work == [(e, n) for n in range(4) for e in ("work_start", "work_end")]
    s = queue.stats()
    assert (s.waiting, s.held, s.admitted, s.ran, s.refused, s.left) == (0, False, 4, 4, 0, 0)


def test_a_waiting_call_prepares_only_between_two_calls_and_never_during_one(
    rec: Recorder, runner: Runner
) -> None:
    gate = _holding(runner, rec)
    for n in (1, 2, 3):
        runner.start(n, prepare=lambda: time.sleep(0.01))  # a preparation that takes a while
    rec.wait(lambda: rec.count("admitted") == 4)
    assert rec.count("prepare") == 1  # only call 0's: the others wait for a gap
    gate.set()
    runner.join()
    # every preparation lies outside every work span, and each work starts only once no
    # preparation is under way
    inside = False
    preparing = 0
    for event, _ in rec.log:
        if event == "work_start":
            assert preparing == 0
            inside = True
        elif event == "work_end":
            inside = False
        elif event == "prepare":
            assert not inside
            preparing += 1
        elif event == "prepared":
            preparing -= 1
    assert rec.count("work_end") == 4


def test_a_full_queue_refuses_with_resource_exhausted(
    queue: DeviceQueue, rec: Recorder, runner: Runner
) -> None:
    gate = _holding(runner, rec)
    for n in (1, 2, 3):
        runner.start(n)
    rec.wait(lambda: rec.count("admitted") == 4)
    with pytest.raises(ResourceExhausted) as e:
        queue.run(lambda: 0, lambda _: pytest.fail("a refused call ran"))
    assert e.value.reason == "GENERATION_QUEUE_FULL"
    assert "max_queued_generations = 3" in e.value.message
    assert queue.stats().refused == 1
    gate.set()
    runner.join()
    assert sorted(runner.results) == [0, 1, 2, 3]


def test_a_call_cancelled_while_queued_never_runs(rec: Recorder, runner: Runner) -> None:
    gate = _holding(runner, rec)
    second = threading.Event()
    runner.start(1, gate=second)
    gone = runner.start(2)
    runner.start(3)
    rec.wait(lambda: rec.count("admitted") == 4)
    gate.set()  # 1, 2 and 3 prepare; 1 takes the device, 2 and 3 wait prepared
    rec.wait(lambda: rec.count("work_start") == 2 and rec.count("prepared") == 4)
    gone.terminated()
    rec.wait(lambda: rec.count("left") == 1)
    second.set()
    runner.join()
    err = runner.results[2]
    assert isinstance(err, Unavailable) and err.reason == "GENERATION_CANCELLED"
    assert (runner.results[1], runner.results[3]) == (10, 30)
    assert [w for e, w in rec.log if e == "work_start"] == [0, 1, 3]


def test_a_call_cancelled_before_its_gap_never_prepares(rec: Recorder, runner: Runner) -> None:
    gate = _holding(runner, rec)
    gone = runner.start(1)
    rec.wait(lambda: rec.count("admitted") == 2)
    gone.terminated()
    rec.wait(lambda: rec.count("left") == 1)
    gate.set()
    runner.join()
    assert isinstance(runner.results[1], Unavailable)
    assert [w for e, w in rec.log if e == "prepare"] == [0]


def test_a_call_whose_deadline_passes_while_queued_never_runs(
    queue: DeviceQueue, rec: Recorder, runner: Runner
) -> None:
    gate = _holding(runner, rec)  # held until the test says so: the deadline must pass
    runner.start(1, call=Call(deadline=time.monotonic() + 0.05))
    rec.wait(lambda: rec.count("left") == 1)
    gate.set()
    runner.join()
    err = runner.results[1]
    assert isinstance(err, Unavailable) and err.reason == "GENERATION_DEADLINE_EXPIRED"
    assert [w for e, w in rec.log if e == "work_start"] == [0]
    assert queue.stats().left == 1


def test_a_call_already_over_is_refused_before_it_queues(queue: DeviceQueue) -> None:
    call = Call()
    call.terminated()
    with pytest.raises(Unavailable) as e:
        queue.run(lambda: 0, lambda _: pytest.fail("ran"), call)
    assert e.value.reason == "GENERATION_CANCELLED"
    assert queue.stats().admitted == 0


def test_a_call_is_used_once(queue: DeviceQueue) -> None:
    call = Call()
    assert queue.run(lambda: 1, lambda x: x + 1, call) == 2
    with pytest.raises(RuntimeError):
        queue.run(lambda: 1, lambda x: x, call)


def test_hold_keeps_the_device_until_the_answer_is_out(
    queue: DeviceQueue, rec: Recorder, runner: Runner
) -> None:
    first = runner.start(0, call=Call(hold=True))
    rec.wait(lambda: rec.count("work_end") == 1)
    runner.start(1)
    rec.wait(lambda: rec.count("admitted") == 2)
    assert queue.stats().held and rec.count("work_start") == 1  # answer not out yet
    assert rec.count("prepare") == 1  # nor does the next call prepare meanwhile
    first.terminated()  # what grpc's termination callback does once the status is sent
    runner.join()
    assert runner.results == {0: 0, 1: 10}
    assert rec.events(first) == ["admitted", "prepared", "held", "released"]


def test_a_caller_found_gone_without_a_signal_neither_runs_nor_holds(
    queue: DeviceQueue, rec: Recorder, runner: Runner
) -> None:
    gate = _holding(runner, rec)
    alive = {"late": True}
    late = runner.start(1, call=Call(alive=lambda: alive["late"]))
    rec.wait(lambda: rec.count("admitted") == 2)
    alive["late"] = False  # its RPC ended, and no termination callback came
    gate.set()
    runner.join()
    assert isinstance(runner.results[1], Unavailable)
    assert rec.events(late) == ["admitted", "prepared", "held", "left"]
    # a holding call whose RPC is over by the end of its work releases at once

    def work(x: int) -> int:
        alive["over"] = False
        return x

    alive["over"] = True
    over = Call(hold=True, alive=lambda: alive["over"])
    assert queue.run(lambda: 1, work, over) == 1
    assert not queue.stats().held


def test_a_hold_whose_end_never_comes_is_cut_off_by_the_guard(rec: Recorder) -> None:
    queue = DeviceQueue("m-test", 3, closed_error=closed, on_event=rec, hold_guard_s=0.05)
    assert queue.run(lambda: 1, lambda x: x, Call(hold=True)) == 1
    assert queue.stats().held  # never terminated
    with structlog.testing.capture_logs() as logs:
        assert queue.run(lambda: 2, lambda x: x) == 2
    assert any(e["event"] == "device_hold_overrun" for e in logs)
    assert not queue.stats().held


def test_a_failed_preparation_or_work_frees_the_queue(queue: DeviceQueue) -> None:
    def boom() -> int:
        raise ValueError("bad prompt")

    with pytest.raises(ValueError):
        queue.run(boom, lambda x: x)
    with pytest.raises(ZeroDivisionError):
        queue.run(lambda: 0, lambda x: 1 // x)
    assert queue.run(lambda: 2, lambda x: x) == 2
    s = queue.stats()
    assert (s.waiting, s.held, s.ran) == (0, False, 2)


def test_close_sends_waiting_calls_away_and_waits_for_the_holder(
    queue: DeviceQueue, rec: Recorder, runner: Runner
) -> None:
    gate = _holding(runner, rec)
    runner.start(1)
    runner.start(2)
    rec.wait(lambda: rec.count("admitted") == 3)
    closer = threading.Thread(target=queue.close)
    closer.start()
    rec.wait(lambda: rec.count("left") == 2)
    assert closer.is_alive()  # still waiting for the holder's work
    gate.set()
    closer.join(WAIT_S)
    runner.join()
    assert runner.results[0] == 0
    for n in (1, 2):
        err = runner.results[n]
        assert isinstance(err, NotFound) and err.reason == "MODEL_NOT_LOADED"
    with pytest.raises(NotFound):
        queue.run(lambda: 0, lambda x: x)


def test_max_queued_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DeviceQueue("m", 0, closed_error=closed)
