"""The embedded suite runs serving as a real child process (services/suite.py): a different
pid that serving itself reports, reachable over gRPC; a profile with `cores` pins every
thread of the child there while every thread of the suite's process is off those cores
(and back where it was after the run); the CPU monitor counts the child, not the suite, as
ours; stop() and a SIGKILLed parent leave no child; a child that cannot start is a clear
error.

"While the run measures" is known without timing: the plan is far larger than the test
needs, the test samples affinities once the watch reports a stored sample, then cancels.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.serving import ServingClient
from idealrt.core.domain import (
    Backend,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    StackSpec,
)
from idealrt.core.fingerprint import format_cores
from idealrt.services.suite import Suite, start_suite

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GONE_S = 20.0  # a serving child stops within this after its parent is gone


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (no reaper in some containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pid: int, seconds: float = GONE_S) -> bool:
    end = time.monotonic() + seconds
    while not _gone(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def _thread_affinities(pid: int) -> dict[int, frozenset[int]]:
    """tid -> the CPUs it may run on, for every thread of `pid`."""
    out: dict[int, frozenset[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:  # a thread that just exited
            continue
    return out


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[Suite]:
    """A suite of this test's own (the session's is shared): contention monitors on, so
    the run records which processes it counted as ours; checks off, so load on a shared
    machine cannot make it retry or fail."""
    s = start_suite(data_dir=tmp_path / "data", contention_monitors=True, contention_checks=False)
    try:
        yield s
    finally:
        pid = s.serving_pid
        s.stop(1.0)
        if pid is not None:
            assert _wait_gone(pid, 5.0)


def test_serving_is_a_child_process_reachable_over_grpc(suite: Suite) -> None:
    pid = suite.serving_pid
    assert pid is not None and pid != os.getpid()
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^PPid:\s+{os.getpid()}$", status, re.M)
    client = ServingClient(suite.serving, timeout=30)
    try:
        env = client.environment()
    finally:
        client.close()
    assert env["process.pid"] == str(pid)  # what the profiler's CPU monitor counts as ours
    assert (suite.data_dir / "serving.log").is_file()


def test_stop_leaves_no_child(tmp_path: Path) -> None:
    s = start_suite(data_dir=tmp_path, contention_monitors=False, contention_checks=False)
    pid = s.serving_pid
    assert pid is not None and not _gone(pid)
    s.stop(1.0)
    assert _gone(pid)  # stop() waits for (and reaps) the child
    s.stop(1.0)  # a second stop is a no-op


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_a_profile_with_cores_pins_the_child_and_keeps_the_suite_off(suite: Suite) -> None:
    mine = frozenset(os.sched_getaffinity(0))
    core = max(mine)
    pid = suite.serving_pid
    assert pid is not None
    client = ProfilerClient(suite.profiler, timeout=60)
    try:
        created = client.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2", seed=0),
                stack=StackSpec(
                    backend=Backend.PYTORCH,
                    device="cpu",
                    dtype="fp32",
                    options={"threads": "1", "cores": str(core)},
                ),
                # far more than the test waits for: it is cancelled once sampled
                plan=ProfilePlan(prompt_tokens=(8, 16, 24), output_tokens=(8, 16), repeats=1000),
                request_id=uuid.uuid4().hex,
            )
        )
        during: tuple[dict[int, frozenset[int]], dict[int, frozenset[int]]] | None = None
        final: Profile | None = None
        for p in client.watch(created.id, timeout=90):
            if p.state == ProfileState.RUNNING and p.completed_samples > 0 and during is None:
                during = (_thread_affinities(pid), _thread_affinities(os.getpid()))
                client.cancel(created.id)
            if p.state.terminal:
                final = p
                break
        assert during is not None, f"the run ended before it was sampled: {final}"
        child, parent = during
        assert child and all(cpus == {core} for cpus in child.values()), child
        assert parent and all(core not in cpus for cpus in parent.values()), parent
        assert final is not None and final.state == ProfileState.CANCELLED
        # after the run the suite's process is back where it was, every thread of it
        assert all(cpus == mine for cpus in _thread_affinities(os.getpid()).values())
        stored = client.get_profile(created.id).provenance.entries
    finally:
        client.close()
    assert stored["monitor.cpu.cores"] == str(core)
    assert stored["monitor.cpu.own_pids"] == str(pid)  # the child, not the suite
    assert stored["target.harness.affinity"] == format_cores(mine - {core})


_PARENT = """
import sys, time
from pathlib import Path
from idealrt.core.logging import configure_logging
from idealrt.services.suite import start_suite
configure_logging("warning")
s = start_suite(data_dir=Path(sys.argv[1]), contention_monitors=False, contention_checks=False)
print(s.serving_pid, flush=True)
time.sleep(600)
"""


def test_a_killed_parent_leaves_no_serving_child(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), line
        child = int(line)
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _wait_gone(child), f"serving child {child} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_serving_child_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="serving process exited with status"):
            start_suite(
                data_dir=tmp_path,
                ports={"serving": port},
                contention_monitors=False,
                contention_checks=False,
            )
    assert (tmp_path / "serving.log").read_text()  # the child's own account of it


def test_the_serving_child_gets_no_idealrt_settings_but_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from idealrt.services.suite import serving_child_env

    monkeypatch.setenv("IDEALRT_TLS_CERT_FILE", "/nope.pem")  # the suite is plaintext
    monkeypatch.setenv("IDEALRT_MAX_THREADS", "1")
    monkeypatch.setenv("IDEALRT_CACHE_DIR", "/tmp/cache")  # read by the backends
    monkeypatch.delenv("IDEALRT_LOG_LEVEL", raising=False)
    env = serving_child_env("127.0.0.1:0", insecure=False)
    assert {k: v for k, v in env.items() if k.startswith("IDEALRT_")} == {
        "IDEALRT_SERVING_ADDRESS": "127.0.0.1:0",
        "IDEALRT_LOG_LEVEL": "warning",
        "IDEALRT_CACHE_DIR": "/tmp/cache",
    }
    assert env["PATH"] == os.environ["PATH"]
    assert serving_child_env("0.0.0.0:0", insecure=True)["IDEALRT_INSECURE"] == "1"
