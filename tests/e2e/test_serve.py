"""`idealrt serve NAME` as a real process: it keeps the IDEALRT_DATA_DIR and IDEALRT_LOG_LEVEL
it is given, binds loopback unless told otherwise (as `idealrt up` does), and stops on
SIGTERM with exit status 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from idealrt.clients.store import StoreClient
from idealrt.core.config import DEFAULT_PORTS, standalone_env

IDEALRT = Path(sys.executable).with_name("idealrt")


def _serve(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [str(IDEALRT), "serve", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the server prints its port (or exits)
    m = re.fullmatch(r"store listening on port (\d+)\n", line)
    if m is None:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"no port line: {line!r}; stderr: {err[-2000:]}")
    return proc, int(m.group(1))


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return err


def test_serve_keeps_the_data_dir_and_log_level_it_is_given(tmp_path: Path) -> None:
    data = tmp_path / "elsewhere"
    env = {
        **os.environ,
        "IDEALRT_DATA_DIR": str(data),
        "IDEALRT_LOG_LEVEL": "warning",
    }
    proc, port = _serve(["store", "--address", "127.0.0.1:0"], env, cwd=tmp_path)
    try:
        store = StoreClient(f"127.0.0.1:{port}")
        try:
            assert store.list_profiles()[0] == []
        finally:
            store.close()
    finally:
        err = _stop(proc)
    assert (data / "idealrt.sqlite").is_file()
    assert not (tmp_path / ".idealrt").exists()  # the CLI's own default was not used
    levels = {json.loads(x).get("level") for x in err.splitlines() if x.startswith("{")}
    assert "info" not in levels  # server_started etc. are info: the warning level held


def test_serve_logs_at_info_by_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IDEALRT_LOG_LEVEL"}
    env["IDEALRT_DATA_DIR"] = str(tmp_path / "d")
    proc, _ = _serve(["store", "--address", "127.0.0.1:0"], env, cwd=tmp_path)
    err = _stop(proc)
    events = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any(e.get("event") == "server_started" for e in events), err[-2000:]


def test_a_standalone_service_binds_loopback_unless_told() -> None:
    env = standalone_env("store", env={})
    assert env["IDEALRT_STORE_ADDRESS"] == f"127.0.0.1:{DEFAULT_PORTS['store']}"
    told = standalone_env("store", {"address": "0.0.0.0:1"}, env={})
    assert told["IDEALRT_STORE_ADDRESS"] == "0.0.0.0:1"
    kept = standalone_env("profiler", {"data_dir": ""}, env={"IDEALRT_DATA_DIR": "/x"})
    assert kept["IDEALRT_DATA_DIR"] == "/x"  # an empty flag does not replace the variable
    with pytest.raises(ValueError):
        standalone_env("store", {"adress": "x"}, env={})
