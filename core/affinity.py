"""CPU affinity: the kernel's cpulist syntax, pinning a whole process to cores, and keeping
a process off cores that another one is measured on.

Design: CPU jobs are pinned to cores. A stack option `cores` ("0-3,6") pins the serving
process (every thread) at load time, and the profiler watches exactly those cores for
foreign activity. Linux affinity belongs to each thread (sched_setaffinity(0, ...) sets the
calling thread's only; a new thread inherits its creator's), so `pin_to_cores` sets it for
every thread listed in /proc/<pid>/task. `CoreExclusion` keeps a process (the embedded
suite's, which measures a serving child) off the cores its measurements pin.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterable

from idealrt.core.errors import InvalidArgument
from idealrt.core.fingerprint import current_affinity
from idealrt.core.reasons import CPU_CORES_INVALID

__all__ = ["CoreExclusion", "parse_cores", "pin_to_cores"]


def parse_cores(text: str) -> frozenset[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6} (the kernel's cpulist syntax)."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise InvalidArgument(
                CPU_CORES_INVALID,
                f"cpu core list {text!r} is not like '0-3,6' (ascending ranges of core ids)",
                field="cpu_cores",
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        cores.update(range(lo, hi + 1))
    if not cores:
        raise InvalidArgument(
            CPU_CORES_INVALID, f"cpu core list {text!r} names no core", field="cpu_cores"
        )
    return frozenset(cores)


def pin_to_cores(cores: Iterable[int], pid: int = 0) -> frozenset[int]:
    """Pin every thread of a process (0: this one) to `cores`, and so the threads they
    create later; returns the previous affinity (of its main thread) to restore later."""
    pid = pid or os.getpid()
    wanted = set(cores)
    previous = current_affinity(pid)
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that just exited
            os.sched_setaffinity(tid, wanted)
    return previous


class CoreExclusion:
    """Keeps this process (every thread) off the cores that holders of an exclusion measure
    on, while any holds one: `exclude(cores)` narrows the process's affinity to what it had
    before the first exclusion minus the union of the cores still excluded, and the release
    it returns widens it again (to that affinity itself after the last). When the
    difference would be empty (one CPU, or the measured cores are all the process has) the
    affinity is left as it was: the process then shares the cores, and `excluded()` says
    so. Thread-safe; a no-op where the OS has no affinity API."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, frozenset[int]] = {}
        self._next = 0
        self._base: frozenset[int] | None = None
        self.supported = hasattr(os, "sched_setaffinity")

    def exclude(self, cores: Iterable[int]) -> Callable[[], None]:
        """Keep off `cores` until the returned release is called (a second call of it does
        nothing)."""
        wanted = frozenset(cores)
        with self._lock:
            if self._base is None and self.supported:
                self._base = current_affinity()
            key = self._next
            self._next += 1
            self._held[key] = wanted
            self._apply()

        def release() -> None:
            with self._lock:
                if self._held.pop(key, None) is not None:
                    self._apply()

        return release

    def excluded(self) -> frozenset[int]:
        """The cores held now that this process really is off (empty when it could not
        leave them)."""
        with self._lock:
            held = frozenset().union(*self._held.values())
            if not held or not self.supported:
                return frozenset()
            return held - current_affinity()

    def _apply(self) -> None:
        base = self._base
        if base is None:
            return
        if not self._held:
            pin_to_cores(base)
            self._base = None
            return
        keep = base - frozenset().union(*self._held.values())
        pin_to_cores(keep or base)
