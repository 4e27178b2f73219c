"""Shared fixtures: the real suite on 127.0.0.1 port 0 with a SQLite store in tmp_path."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    from idealrt.core.logging import configure_logging

    configure_logging("warning", json=True)


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """All four services, each its own gRPC server on a free loopback port. Its profiles run
    unpinned on a shared machine, where other load is expected and says nothing about what
    these tests check (the pipeline, not contention): contention checks are off, so other
    load cannot make a profile INVALID at random. Contention detection is tested with
    injected contention in tests/unit/profiler (test_contention, test_runner,
    test_real_serving)."""
    from idealrt.services.suite import start_suite

    data = tmp_path_factory.mktemp("suite")
    s = start_suite(data_dir=Path(data), contention_monitors=False, contention_checks=False)
    try:
        yield s
    finally:
        s.stop(1.0)


# ---------------------------------------------------------------- leaked threads
# A non-daemon thread that outlives the session keeps the interpreter from exiting: pytest
# prints its summary and then hangs until CI kills it (stop 20: all tests passed, then a
# 90-minute timeout). After the last teardown, each such thread gets a grace period to end;
# any still alive fail the run with their names and stacks, and the process exits with that
# status instead of hanging.

_LEAK_GRACE_S = 10.0
_leaked_exit: list[int] = []


def _idle_pool_worker(frame: FrameType) -> bool:
    """A concurrent.futures worker waiting for work: the interpreter's exit hook stops it."""
    import traceback

    stack = traceback.extract_stack(frame)
    pool = os.path.join("concurrent", "futures", "thread.py")
    in_worker = any(f.name == "_worker" and f.filename.endswith(pool) for f in stack)
    return in_worker and stack[-1].name == "wait"


def _leaked_threads() -> list[threading.Thread]:
    import sys
    import time

    end = time.monotonic() + _LEAK_GRACE_S
    while True:
        frames = sys._current_frames()
        alive = [
            t
            for t in threading.enumerate()
            if t is not threading.main_thread()
            and not t.daemon
            and t.is_alive()
            and not (t.ident in frames and _idle_pool_worker(frames[t.ident]))
        ]
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sys
    import traceback

    leaked = _leaked_threads()
    if not leaked:
        return
    frames = sys._current_frames()
    out = [f"\n{len(leaked)} non-daemon thread(s) still alive after the session:"]
    for t in leaked:
        out.append(f"--- {t!r}")
        frame = frames.get(t.ident) if t.ident is not None else None
        if frame is not None:
            out.append("".join(traceback.format_stack(frame)))
    sys.stderr.write("\n".join(out) + "\n")
    sys.stderr.flush()
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _leaked_exit.append(int(pytest.ExitCode.TESTS_FAILED))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _leaked_exit:  # the leaked threads would block interpreter exit: leave now
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_leaked_exit[0])
