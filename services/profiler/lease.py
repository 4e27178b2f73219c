"""An exclusive lease on a device, across threads and processes, that survives a crash.

Mechanism: `fcntl.flock(LOCK_EX | LOCK_NB)` on one file per device under the lease
directory (e.g. `.idealrt/leases/cpu.lock`). The kernel drops the lock when the holder's
file descriptor is closed, including when the process dies (SIGKILL, OOM), so a crashed
holder never leaves a stale lease. Lock files are never deleted (deleting a lock file lets
two processes lock two different inodes).

Threads. flock locks belong to the open file description, so each acquisition opens its
own descriptor (two threads of one process then conflict like two processes). Some
filesystems (NFS) emulate flock with per-*process* POSIX locks, under which threads of one
process would not exclude each other, so a process-wide table of held lock paths is
checked first. It must be process-wide, like the kernel lock it mirrors.

Holder info (pid, profile id, host, since) is written into the file after locking, for the
DEVICE_BUSY message; it is read back only while the lock is held by someone else.

Waiting (LeasePolicy.WAIT): retry the non-blocking lock, sleeping on the cancel event
between tries (0.05 s growing to 1 s). This is a sleep, not a busy loop (one syscall per
try), and cancellation takes effect at once. A blocking flock in a helper thread would wake
sooner but cannot be cancelled and would leave a thread blocked in the kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from idealrt.core.clock import utcnow
from idealrt.core.domain import LeasePolicy
from idealrt.core.errors import FailedPrecondition
from idealrt.services.profiler.reasons import DEVICE_BUSY

__all__ = [
    "DeviceLease",
    "LeaseHolder",
    "LeaseWaitCancelled",
    "acquire_lease",
    "device_key",
    "read_holder",
]


class LeaseWaitCancelled(Exception):
    """The cancel event was set while waiting for a lease."""


@dataclasses.dataclass(frozen=True)
class LeaseHolder:
    pid: int
    profile_id: str
    host: str = ""
    since: str = ""

    def describe(self) -> str:
        where = f" on {self.host}" if self.host else ""
        when = f" since {self.since}" if self.since else ""
        return f"pid {self.pid}{where} (profile {self.profile_id or '?'}){when}"


class _ProcessTable:
    """Lock paths held by this process -> holder (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, LeaseHolder] = {}

    def try_take(self, path: str, holder: LeaseHolder) -> LeaseHolder | None:
        with self._lock:
            current = self._held.get(path)
            if current is None:
                self._held[path] = holder
            return current

    def drop(self, path: str) -> None:
        with self._lock:
            self._held.pop(path, None)


_PROCESS_TABLE = _ProcessTable()


def device_key(device: str) -> str:
    """A file-name-safe key per physical device: 'cpu'; GPUs by NVML UUID when NVML is
    available (so CUDA_VISIBLE_DEVICES renumbering cannot alias two GPUs), else 'cuda-N'."""
    from idealrt.services.profiler.monitors import gpu_index, load_nvml, nvml_handle

    name = device.strip().lower() or "cpu"
    index = gpu_index(name)
    if index is not None:
        nvml = load_nvml()
        handle = nvml_handle(nvml, name) if nvml is not None else None
        if handle is not None and nvml is not None:
            with contextlib.suppress(Exception):
                uuid = nvml.nvmlDeviceGetUUID(handle)
                return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(uuid))
        return f"cuda-{index}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def read_holder(path: Path) -> LeaseHolder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return LeaseHolder(
        pid=int(data.get("pid", 0)),
        profile_id=str(data.get("profile_id", "")),
        host=str(data.get("host", "")),
        since=str(data.get("since", "")),
    )


class DeviceLease:
    """A held lease; release() (or leaving the `with` block) gives it back."""

    def __init__(self, device: str, path: Path, fd: int, holder: LeaseHolder) -> None:
        self.device = device
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            _PROCESS_TABLE.drop(str(self.path))

    def __enter__(self) -> DeviceLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _try_lock(path: Path, holder: LeaseHolder) -> int | LeaseHolder | None:
    """The locked fd, or who holds it (None when unknown)."""
    local = _PROCESS_TABLE.try_take(str(path), holder)
    if local is not None:
        return local
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        _PROCESS_TABLE.drop(str(path))
        return read_holder(path)
    except BaseException:
        os.close(fd)
        _PROCESS_TABLE.drop(str(path))
        raise
    payload = json.dumps(dataclasses.asdict(holder)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, payload, 0)
    return fd


def acquire_lease(
    lease_dir: Path,
    device: str,
    *,
    profile_id: str,
    policy: LeasePolicy = LeasePolicy.WAIT,
    cancel: threading.Event | None = None,
    timeout_s: float | None = None,
) -> DeviceLease:
    """Take the lease of `device`.

    FAIL: raise FailedPrecondition(reason="DEVICE_BUSY") naming the holder when it is held.
    WAIT: wait (sleeping) until it is free; raise LeaseWaitCancelled when `cancel` is set,
    and DEVICE_BUSY when `timeout_s` passes first.
    """
    lease_dir.mkdir(parents=True, exist_ok=True)
    path = lease_dir / f"{device_key(device)}.lock"
    holder = LeaseHolder(
        pid=os.getpid(),
        profile_id=profile_id,
        host=socket.gethostname(),
        since=utcnow().isoformat(timespec="seconds"),
    )
    waiter = cancel if cancel is not None else threading.Event()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay = 0.05
    while True:
        if waiter.is_set():
            raise LeaseWaitCancelled(f"cancelled while waiting for the {device} lease")
        got = _try_lock(path, holder)
        if isinstance(got, int):
            return DeviceLease(device, path, got, holder)
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if policy == LeasePolicy.FAIL or out_of_time:
            who = got.describe() if got is not None else "another process"
            raise FailedPrecondition(
                DEVICE_BUSY,
                f"device {device!r} is leased by {who} (lease file {path}); wait for it to "
                "finish, cancel it, or use lease policy WAIT",
                field="plan.lease",
            )
        pause = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
        waiter.wait(pause)
        delay = min(1.0, delay * 2)
