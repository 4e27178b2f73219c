"""bench/_stack_proc.py: a benchmarked stack in a process of its own, driven over a pipe.
A real spawned worker loads the catalog GPT-2 on the pytorch backend and runs one small
round; a worker that cannot load reports why instead of hanging the coordinator."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _stack_proc import StackProcess  # noqa: E402

CORE = [min(os.sched_getaffinity(0))]


@pytest.mark.slow
def test_a_worker_loads_its_stack_and_measures_a_round() -> None:
    proc = StackProcess("pytorch", CORE, 1)
    try:
        assert proc.info["options"]["threads"] == "1"
        assert proc.info["resolved_options"]["kernels"] in ("native", "aten")
        assert proc._proc.pid != os.getpid()
        decode, prefill, settling = proc.measure_round([24], 4, 0, 3)
        assert len(decode["24"]) == 4 and all(ns > 0 for ns in decode["24"])
        assert len(settling["24"]) == 3
        assert set(prefill) == {"128", "512"} and all(ns > 0 for ns in prefill.values())
    finally:
        proc.close()
    assert not proc._proc.is_alive()


def test_a_worker_that_cannot_load_says_why() -> None:
    with pytest.raises(RuntimeError, match="KeyError: 'no-such-stack'"):
        StackProcess("no-such-stack", CORE, 1)
