"""Clock statistics and the invariants of a GenerationResult."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from idealrt.core.errors import Internal
from idealrt.core.serving_contract import GenerationResult
from idealrt.services.serving.timing import CpuTimer, CudaTimer, StepClock, timer_for


class FakeTimer:
    def __init__(self, ticks: list[int]) -> None:
        self._ticks = iter(ticks)

    def now_ns(self) -> int:
        return next(self._ticks)


def test_step_clock_defines_prefill_decode_and_total() -> None:
    clock = StepClock(FakeTimer([100, 150, 170, 200, 260]))
    clock.start()
    for _ in range(4):
        clock.mark()
    assert clock.tokens == 4
    prefill, decode, total = clock.intervals()
    assert prefill == 50  # request start -> first token
    assert decode == (20, 30, 60)  # end of token i -> end of token i+1
    assert total == 160 == prefill + sum(decode)


def test_single_token_has_no_decode_steps() -> None:
    clock = StepClock(FakeTimer([0, 7]))
    clock.start()
    clock.mark()
    assert clock.intervals() == (7, (), 7)


def test_clock_without_marks_refuses() -> None:
    clock = StepClock(FakeTimer([0]))
    clock.start()
    with pytest.raises(RuntimeError):
        clock.intervals()


def test_real_cpu_clock_is_monotonic() -> None:
    clock = StepClock(CpuTimer())
    clock.start()
    clock.mark()
    clock.mark()
    prefill, decode, total = clock.intervals()
    assert prefill >= 0 and decode[0] >= 0 and total == prefill + decode[0]


def test_timer_for_picks_by_device_type() -> None:
    assert isinstance(timer_for("cpu"), CpuTimer)
    assert isinstance(timer_for("cuda:0"), CudaTimer)  # constructing it does not sync


def _result(**overrides: object) -> GenerationResult:
    fields: dict[str, object] = {
        "prompt_tokens": 3,
        "output_tokens": 3,
        "output_ids": (1, 2, 3),
        "prefill_ns": 10,
        "decode_ns": (4, 5),
        "total_ns": 19,
        "start_time": datetime.now(UTC),
    }
    fields.update(overrides)
    return GenerationResult(**fields)


def test_consistent_result_is_accepted() -> None:
    assert _result().total_ns == 19


@pytest.mark.parametrize(
    "overrides",
    [
        {"output_ids": (1, 2)},  # fewer tokens than claimed
        {"decode_ns": (4,), "total_ns": 14},  # too few decode steps
        {"total_ns": 20},  # total != prefill + decode
        {"prompt_tokens": 0},
        {"batch_size": 0},
        {"prefill_ns": -1, "total_ns": 8},
    ],
)
def test_nonconforming_result_cannot_be_built(overrides: dict[str, object]) -> None:
    with pytest.raises(Internal) as e:
        _result(**overrides)
    assert e.value.reason == "NONCONFORMING_GENERATION"
