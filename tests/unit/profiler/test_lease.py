"""Device leases: threads, real separate processes, SIGKILLed holders, FAIL vs WAIT."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from idealrt.core.domain import LeasePolicy
from idealrt.core.errors import FailedPrecondition
from idealrt.services.profiler.lease import (
    LeaseWaitCancelled,
    acquire_lease,
    device_key,
    read_holder,
)

HOLDER = """
import sys, time
from pathlib import Path
from idealrt.services.profiler.lease import acquire_lease
lease = acquire_lease(Path(sys.argv[1]), sys.argv[2], profile_id="child-profile")
print("held", flush=True)
time.sleep(float(sys.argv[3]))
lease.release()
print("released", flush=True)
"""


@contextlib.contextmanager
def holder_process(
    lease_dir: Path, device: str = "cpu", hold_s: float = 60
) -> Iterator[subprocess.Popen[str]]:
    """A separate Python process that holds the lease (killed and reaped at the end)."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lease_dir), device, str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "held"
            yield child
        finally:
            child.kill()
            child.wait()


def test_acquire_release_and_holder_info(lease_dir: Path) -> None:
    with acquire_lease(lease_dir, "cpu", profile_id="p1") as lease:
        assert lease.held
        holder = read_holder(lease.path)
        assert holder is not None
        assert (holder.pid, holder.profile_id) == (os.getpid(), "p1")
    assert not lease.held
    acquire_lease(lease_dir, "cpu", profile_id="p2", policy=LeasePolicy.FAIL).release()


def test_two_threads_exclude_each_other(lease_dir: Path) -> None:
    lease = acquire_lease(lease_dir, "cpu", profile_id="first")
    errors: list[BaseException] = []

    def contender() -> None:
        try:
            acquire_lease(lease_dir, "cpu", profile_id="second", policy=LeasePolicy.FAIL)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=contender)
    t.start()
    t.join()
    lease.release()
    assert len(errors) == 1 and isinstance(errors[0], FailedPrecondition)
    assert errors[0].reason == "DEVICE_BUSY"
    assert "first" in errors[0].message  # names the holder


def test_devices_are_independent(lease_dir: Path) -> None:
    with acquire_lease(lease_dir, "cpu", profile_id="a"):
        acquire_lease(lease_dir, "cuda:3", profile_id="b", policy=LeasePolicy.FAIL).release()


def test_fail_policy_across_processes_names_the_holder(lease_dir: Path) -> None:
    with holder_process(lease_dir) as child:
        with pytest.raises(FailedPrecondition) as info:
            acquire_lease(lease_dir, "cpu", profile_id="me", policy=LeasePolicy.FAIL)
        assert info.value.reason == "DEVICE_BUSY"
        assert info.value.field == "plan.lease"
        holder = read_holder(lease_dir / "cpu.lock")
        assert holder is not None and holder.pid == child.pid
        assert f"pid {child.pid}" in info.value.message


def test_lease_released_when_holder_is_sigkilled(lease_dir: Path) -> None:
    with holder_process(lease_dir) as child:
        with pytest.raises(FailedPrecondition):
            acquire_lease(lease_dir, "cpu", profile_id="me", policy=LeasePolicy.FAIL)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        lease = acquire_lease(lease_dir, "cpu", profile_id="me", policy=LeasePolicy.FAIL)
    holder = read_holder(lease.path)
    assert holder is not None and holder.pid == os.getpid()
    lease.release()


def test_wait_policy_gets_the_lease_when_the_other_process_releases(lease_dir: Path) -> None:
    with holder_process(lease_dir, hold_s=0.5) as child:
        lease = acquire_lease(lease_dir, "cpu", profile_id="me", timeout_s=30)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "released"  # it let go before we got it
        lease.release()


def test_wait_is_cancellable_promptly(lease_dir: Path) -> None:
    held = acquire_lease(lease_dir, "cpu", profile_id="holder")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(LeaseWaitCancelled):
        acquire_lease(lease_dir, "cpu", profile_id="waiter", cancel=cancel)
    assert time.monotonic() - t0 < 5
    held.release()


def test_wait_timeout_is_device_busy(lease_dir: Path) -> None:
    with acquire_lease(lease_dir, "cpu", profile_id="holder"):
        with pytest.raises(FailedPrecondition) as info:
            acquire_lease(lease_dir, "cpu", profile_id="waiter", timeout_s=0.2)
        assert info.value.reason == "DEVICE_BUSY"


def test_device_key_is_file_safe() -> None:
    assert device_key("cpu") == "cpu"
    assert device_key("CPU") == "cpu"
    key = device_key("cuda:1")
    assert (
        key.startswith(("cuda-1", "gpu-"))
        and "/" not in key
        and ":" not in key.removeprefix("gpu-")
    )
