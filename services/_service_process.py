"""One service as a child process of the embedded suite: `python -m idealrt.services.NAME`,
supervised.

- Readiness and port: the service's own standalone mechanism (`serve_until_sigterm`
  prints "NAME listening on port N" once it serves); the child binds the address it is
  given (port 0: a free one) and the port is read from that line.
- No orphan: the child's stdin is a pipe this process holds, and SUPERVISOR_PIPE_VAR asks
  the child to stop (gracefully, as on SIGTERM) at its end of file. The kernel closes it
  however this process ends, SIGKILL included. (PR_SET_PDEATHSIG would fire when the
  *thread* that started the child exits, which is not the suite's life.) The child gets a
  process group of its own, so a terminal's Ctrl-C reaches the suite, which stops it in
  order, rather than both at once.
- Logs: the child's stderr (and anything else it prints) goes to `log_path`; a child that
  exits or stays silent before its port line is a RuntimeError naming its exit status and
  the end of that log.
- Stop: SIGTERM, `grace_s` for its drain plus a margin, then SIGKILL; always reaped.
"""

from __future__ import annotations

import contextlib
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import structlog

from idealrt.core.grpc_server import SUPERVISOR_PIPE_VAR

__all__ = ["START_TIMEOUT_S", "ServiceProcess"]

log = structlog.get_logger("idealrt.suite")

START_TIMEOUT_S = 120.0  # importing torch on a loaded machine is slow
_STOP_MARGIN_S = 10.0
_LOG_TAIL_CHARS = 3000


class ServiceProcess:
    """A child service: `spawn` starts it, `wait_listening` waits for its port, `stop`
    ends it (idempotent). `pid`, `port` (0 until it listens)."""

    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], first: queue.Queue[bytes], log_path: Path
    ) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.port = 0
        self.log_path = log_path
        self._first = first

    @classmethod
    def spawn(cls, name: str, env: Mapping[str, str], log_path: Path) -> ServiceProcess:
        """Start `python -m idealrt.services.NAME` with exactly `env` (plus
        SUPERVISOR_PIPE_VAR); it goes on starting while the caller does other work."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")  # this start's log only
        # appending: the child's stderr and the relay of its stdout share the file
        with log_path.open("ab") as err:  # the child holds its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", f"idealrt.services.{name}"],
                env={**env, SUPERVISOR_PIPE_VAR: "1"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                process_group=0,
            )
        assert proc.stdout is not None
        first: queue.Queue[bytes] = queue.Queue(maxsize=1)
        threading.Thread(
            target=_relay,
            args=(proc.stdout, first, log_path),
            name=f"{name}-stdout",
            daemon=True,
        ).start()
        return cls(name, proc, first, log_path)

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Block until the child prints its port line; its port. RuntimeError (the child
        stopped) when it exits first or says nothing within `timeout_s`."""
        try:
            line: bytes | None = self._first.get(timeout=timeout_s)
        except queue.Empty:
            line = None
        text = (line or b"").decode(errors="replace")
        m = re.fullmatch(rf"{re.escape(self.name)} listening on port (\d+)\n", text)
        if m is None:
            _end(self.proc, 0.0)
            if line is None:
                what = f"did not say it listens within {timeout_s:.0f} s"
            else:
                what = f"exited with status {self.proc.returncode} before it listened"
            raise RuntimeError(
                f"the {self.name} process {what}; its log ({self.log_path}) ends:\n"
                + _tail(self.log_path)
            )
        self.port = int(m.group(1))
        log.info("child_service_started", service=self.name, pid=self.pid, port=self.port)
        return self.port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM and wait (its drain takes up to `grace_s`), SIGKILL if it does not end;
        the exit status. At once (SIGKILL) with grace_s=0."""
        code = _end(self.proc, grace_s + _STOP_MARGIN_S if grace_s > 0 else 0.0)
        log.info("child_service_stopped", service=self.name, pid=self.pid, code=code)
        return code


def _relay(out: IO[bytes], first: queue.Queue[bytes], log_path: Path) -> None:
    """The child's stdout: the first line (its port line) to `first`, the rest appended
    to its log, so that a chatty child never blocks on a full pipe. Blocks in read(2)."""
    try:
        first.put(out.readline())
        with log_path.open("ab") as sink:
            for line in out:
                sink.write(line)
                sink.flush()
    except (OSError, ValueError):  # the pipe closed under us at stop
        return
    finally:
        out.close()


def _end(proc: subprocess.Popen[bytes], wait_s: float) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if wait_s > 0:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    log.warning("child_service_killed", pid=proc.pid, after_s=wait_s)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    return proc.returncode


def _tail(path: Path) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return "(no log)"
    return text[-_LOG_TAIL_CHARS:] or "(empty)"
