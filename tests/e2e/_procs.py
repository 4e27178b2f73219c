"""Helpers for e2e tests that run services as real processes (`python -m
idealrt.services.NAME`): start one, read its port line, kill it (SIGKILL) or stop it, and a
fixture that kills every process it started in a finally. The same patterns as
tests/e2e/test_shutdown.py, shared by tests/e2e/test_faults.py."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

START_S = 120.0  # generous: a loaded CI machine imports torch slowly


class Service:
    """One `python -m idealrt.services.NAME` process; stderr (JSON logs) goes to a file."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        env: dict[str, str],
        address: str = "",
        cores: set[int] | None = None,
    ) -> None:
        self.name = name
        self.log = tmp / f"{name}-{time.monotonic_ns()}.log"
        full = {
            **os.environ,
            "IDEALRT_LOG_LEVEL": "warning",
            "IDEALRT_DATA_DIR": str(tmp / "data"),
            f"IDEALRT_{name.upper()}_ADDRESS": address or "127.0.0.1:0",
            **env,
        }
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"idealrt.services.{name}"],
                env=full,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                preexec_fn=None if cores is None else (lambda: os.sched_setaffinity(0, cores)),
            )
        self.port = self._port()

    def _port(self) -> int:
        box: list[str] = []
        out = self.proc.stdout
        assert out is not None
        reader = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
        reader.start()
        reader.join(START_S)
        line = box[0] if box else ""
        m = re.fullmatch(rf"{self.name} listening on port (\d+)\n", line)
        if m is None:
            self.kill()
            pytest.fail(f"{self.name}: no port line ({line!r}); log: {self.stderr()[-3000:]}")
        return int(m.group(1))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def terminate(self) -> int:
        """SIGTERM, then the exit status (killed and failed if it does not exit)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit on SIGTERM; log: {self.stderr()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL (nothing of the process runs after it), and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


Start = Callable[..., Service]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Start]:
    """`start(name, env=None, address="", cores=None)`; every process started is killed at
    the end."""
    started: list[Service] = []

    def start(
        name: str,
        env: dict[str, str] | None = None,
        address: str = "",
        cores: set[int] | None = None,
    ) -> Service:
        svc = Service(name, tmp_path, env or {}, address, cores)
        started.append(svc)
        return svc

    try:
        yield start
    finally:
        for svc in started:
            svc.kill()


class Background:
    """`fn()` on a thread; `result()` re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._box: list[Any] = []
        self._err: list[BaseException] = []

        def run() -> None:
            try:
                self._box.append(fn())
            except BaseException as exc:  # handed to the test by result()
                self._err.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 300) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not finish"
        if self._err:
            raise self._err[0]
        return self._box[0]


def wait_busy(svc: Service, since: float, job: Background, cpu_s: float = 0.1) -> None:
    """Until `svc` has burnt `cpu_s` of CPU beyond `since` (the call is being served)."""
    deadline = time.monotonic() + START_S
    while svc.cpu_s() - since < cpu_s:
        if job.done():
            job.result()  # raises what the call raised
            pytest.fail("the call ended before the test could stop the server")
        assert time.monotonic() < deadline, "the server never got busy with the call"
        time.sleep(0.02)


def split_cores() -> tuple[set[int], set[int]]:
    """(one core for the measured serving process, the others for everything else; the
    same core when there is only one)."""
    mine = os.sched_getaffinity(0)
    core = max(mine)
    return {core}, (mine - {core}) or {core}


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
        return port
