"""A CPU hog switched on and off on a seeded random schedule (bench_denoise).

The hog is one subprocess spinning in a busy loop, pinned to one core; it is paused and
resumed with SIGSTOP / SIGCONT by a controller thread that *sleeps* between switches (the
harness itself never busy-waits). Every on-interval is recorded in both clocks the samples
use: `time.monotonic()` (measured around a generation in the bench) and the epoch (a stored
Sample's start_time), so each sample's overlap with the hog is known exactly.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

_SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
print("go", flush=True)
end = time.monotonic() + float(sys.argv[2])  # a safety limit: the bench kills it earlier
while time.monotonic() < end:
    pass
"""


def segments(seed: int, duty: float, lo_s: float, hi_s: float) -> Iterator[tuple[bool, float]]:
    """Endless (on, duration_s) segments: durations uniform in [lo_s, hi_s], each segment
    on with probability `duty` (so the long-run fraction of time on is `duty`)."""
    rng = random.Random(seed)
    while True:
        yield rng.random() < duty, rng.uniform(lo_s, hi_s)


def overlap_fraction(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Fraction of [start, end] covered by the (disjoint) intervals."""
    if end <= start:
        return 0.0
    covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
    return min(1.0, covered / (end - start))


@dataclasses.dataclass
class HogLog:
    monotonic: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    epoch: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    on_s: float = 0.0
    total_s: float = 0.0

    @property
    def duty_observed(self) -> float:
        return self.on_s / self.total_s if self.total_s > 0 else 0.0


class Hog:
    """`with Hog(core, duty, seed) as hog:` runs the schedule until the block ends;
    `hog.log` holds the on-intervals. duty 0 keeps it paused throughout."""

    def __init__(
        self, core: int, duty: float, seed: int, lo_s: float = 0.3, hi_s: float = 2.0
    ) -> None:
        self.core, self.duty, self.seed, self.lo_s, self.hi_s = core, duty, seed, lo_s, hi_s
        self.log = HogLog()
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> Hog:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SPIN, str(self.core), "3600"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "go":
            raise RuntimeError("the CPU hog did not start")
        self._proc.send_signal(signal.SIGSTOP)
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._control, name="hog-control", daemon=True)
        self._thread.start()
        return self

    def _control(self) -> None:
        assert self._proc is not None
        for on, dur in segments(self.seed, self.duty, self.lo_s, self.hi_s):
            if self._stop.is_set():
                return
            if on:
                m0, e0 = time.monotonic(), time.time()
                self._proc.send_signal(signal.SIGCONT)
                stopped = self._stop.wait(dur)
                self._proc.send_signal(signal.SIGSTOP)
                m1, e1 = time.monotonic(), time.time()
                self.log.monotonic.append((m0, m1))
                self.log.epoch.append((e0, e1))
                self.log.on_s += m1 - m0
                if stopped:
                    return
            elif self._stop.wait(dur):
                return

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.log.total_s = time.monotonic() - self._t0
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()


def confusion(
    samples: Sequence[Any], hog_epoch: Sequence[tuple[float, float]], min_overlap: float = 0.10
) -> dict[str, int]:
    """Judged samples (OK or CONTENDED) by flag and by whether the hog covered at least
    `min_overlap` of them (their start_time and total_ns against the hog's epoch intervals)."""
    tally = {"flagged_and_hog": 0, "flagged_no_hog": 0, "missed_hog": 0, "clean_ok": 0}
    for s in samples:
        if s.flag.value not in ("ok", "contended"):
            continue
        start = s.start_time.timestamp()
        hit = overlap_fraction(hog_epoch, start, start + s.total_ns * 1e-9) >= min_overlap
        flagged = s.flag.value == "contended"
        key = (
            ("flagged_and_hog" if hit else "flagged_no_hog")
            if flagged
            else ("missed_hog" if hit else "clean_ok")
        )
        tally[key] += 1
    return tally
