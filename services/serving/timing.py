"""Clocks for server-side generation timing.

A `Timer` reads `time.perf_counter_ns` once the device has finished the work queued so far:
on the CPU that is immediate; on CUDA it synchronizes the device first (the design's
"after a device sync"), so a mark means "the token exists", not "the kernels were queued".
Synchronizing blocks in the driver; nothing here polls or busy-waits.

`StepClock` turns the marks of one generation into the design's statistics:
    marks  t0 (request start), t1 (token 1 exists), ..., to (token o exists)
    prefill_ns   = t1 - t0                       (alpha: start -> first output token)
    decode_ns[i] = t(i+2) - t(i+1), i < o-1      (end of token i+1 -> end of token i+2)
    total_ns     = to - t0 = prefill + sum(decode)
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Protocol

__all__ = ["CpuTimer", "CudaTimer", "StepClock", "Timer", "timer_for"]


class Timer(Protocol):
    def now_ns(self) -> int:
        """perf_counter_ns after all previously queued device work has finished."""
        ...


class CpuTimer:
    """Host execution is synchronous: the clock is read directly."""

    def now_ns(self) -> int:
        return time.perf_counter_ns()


class CudaTimer:
    """torch.cuda.synchronize(device), then perf_counter_ns."""

    def __init__(self, device: Any) -> None:
        import torch

        self._sync = torch.cuda.synchronize
        self._device = device

    def now_ns(self) -> int:
        self._sync(self._device)
        return time.perf_counter_ns()


def timer_for(device: Any) -> Timer:
    """The right Timer for a torch device (or its string): CUDA devices sync, others not."""
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
    return CudaTimer(device) if kind == "cuda" else CpuTimer()


class StepClock:
    """Marks of one generation: `start()` at request start, `mark()` after each token."""

    __slots__ = ("_marks", "_timer")

    def __init__(self, timer: Timer) -> None:
        self._timer = timer
        self._marks: list[int] = []

    def start(self) -> None:
        self._marks = [self._timer.now_ns()]

    def mark(self) -> None:
        self._marks.append(self._timer.now_ns())

    @property
    def tokens(self) -> int:
        """Tokens marked since start."""
        return max(0, len(self._marks) - 1)

    def intervals(self) -> tuple[int, tuple[int, ...], int]:
        """(prefill_ns, decode_ns, total_ns); needs start() and at least one mark()."""
        m = self._marks
        if len(m) < 2:
            raise RuntimeError("StepClock needs start() and at least one mark()")
        decode = tuple(b - a for a, b in itertools.pairwise(m[1:]))
        return m[1] - m[0], decode, m[-1] - m[0]
