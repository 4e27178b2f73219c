"""CPU affinity: the kernel's cpulist syntax and pinning a whole process to cores.

Design: CPU jobs are pinned to cores. A stack option `cores` ("0-3,6") pins the serving
process (every thread) at load time, and the profiler watches exactly those cores for
foreign activity.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable

from idealrt.core.errors import InvalidArgument
from idealrt.core.fingerprint import current_affinity
from idealrt.core.reasons import CPU_CORES_INVALID

__all__ = ["parse_cores", "pin_to_cores"]


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
