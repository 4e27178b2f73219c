"""Deployed mode end to end: `idealrt serve` x 4 as separate processes on loopback (the
profiler and metrics told the store's address, the profiler the serving's), then the CLI
in-process with --store/--profiler/--metrics: a small tiny-gpt2 profile on pytorch/cpu,
its fit and an estimate. Nothing embedded is started (no data under --data-dir).

The serving process is pinned to one core, its backend to one thread, and the profile's
contention monitors watch that core (`--option cores=`), so that the measurement is of
a process the test controls. Every process is killed in a finally.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idealrt.clients.cli import main

pytestmark = pytest.mark.timeout(600)

IDEALRT = Path(sys.executable).with_name("idealrt")
START_S = 120.0


class Served:
    def __init__(
        self, name: str, args: list[str], tmp: Path, preexec: Callable[[], None] | None
    ) -> None:
        self.name = name
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "IDEALRT_DATA_DIR": str(tmp / f"{name}-data")}
        env["IDEALRT_LOG_LEVEL"] = "warning"
        # a shared machine: other processes' CPU time says nothing about these samples (the
        # rules on the samples' own times still judge them; see tests/conftest.py `suite`)
        env["IDEALRT_CONTENTION_MONITORS"] = "0"
        env["IDEALRT_CONTENTION_CHECKS"] = "0"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [str(IDEALRT), "serve", name, "--address", "127.0.0.1:0", *args],
                env=env,
                cwd=tmp,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                preexec_fn=preexec,
            )
        box: list[str] = []
        reader = threading.Thread(
            target=lambda: box.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(START_S)
        line = box[0] if box else ""
        m = re.fullmatch(rf"{name} listening on port (\d+)\n", line)
        if m is None:
            self.kill()
            pytest.fail(f"{name}: no port line ({line!r}); log: {self.log.read_text()[-3000:]}")
        self.target = f"127.0.0.1:{m.group(1)}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[dict[str, Served]]:
    core = max(os.sched_getaffinity(0))
    others = (os.sched_getaffinity(0) - {core}) or {core}

    def pin(cores: set[int]) -> Callable[[], None]:
        return lambda: os.sched_setaffinity(0, cores)

    started: dict[str, Served] = {}
    try:
        started["store"] = Served("store", [], tmp_path, pin(others))
        started["serving"] = Served("serving", [], tmp_path, pin({core}))
        store, serving = started["store"].target, started["serving"].target
        started["profiler"] = Served(
            "profiler",
            ["--store-target", store, "--serving-target", serving],
            tmp_path,
            pin(others),
        )
        started["metrics"] = Served("metrics", ["--store-target", store], tmp_path, pin(others))
        yield started
        for svc in reversed(started.values()):  # a deployed suite stops cleanly too
            svc.proc.send_signal(signal.SIGTERM)
            assert svc.proc.wait(timeout=120) == 0, svc.log.read_text()[-3000:]
    finally:
        for svc in started.values():
            svc.kill()


def test_profile_fit_estimate_against_deployed_services(
    deployed: dict[str, Served], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    core = max(os.sched_getaffinity(0))
    data = tmp_path / "cli-data"
    remote = [
        "--store",
        deployed["store"].target,
        "--profiler",
        deployed["profiler"].target,
        "--metrics",
        deployed["metrics"].target,
        "--data-dir",
        str(data),
        "--json",
    ]

    def cli(*args: str, expect: tuple[int, ...] = (0,)) -> Any:
        capsys.readouterr()
        rc = main([*args, *remote])
        out = capsys.readouterr()
        assert rc in expect, out.err[-3000:]
        return json.loads(out.out)

    # The serving process has a core of its own among this test's processes, but the
    # machine is shared: a profile that other load made INVALID (contention, exit 1) is
    # measured again, a few times at most.
    for _attempt in range(3):
        prof = profile(cli, core)
        if prof["state"] != "invalid":
            break
    assert prof["state"] == "succeeded", prof.get("error")
    assert prof["completed_samples"] == prof["total_samples"] > 0
    pid = prof["id"]
    listed = cli("profiles")
    assert pid in {p["id"] for p in listed["profiles"]}
    cm = cli("fit", "--profile", pid, "--bootstrap", "20")
    assert cm["profile_id"] == pid and cm["quality"]["method"] == "heldout"
    one = cli("estimate", "--cost-model", cm["id"], "--prompt-tokens", "16", "--output-tokens", "4")
    assert one["summary"]["count"] == 1
    assert one["queries"][0]["runtime_s"] > 0
    watched = cli("watch", pid)
    assert watched["state"] == "succeeded"
    assert not (data / "idealrt.sqlite").exists()  # nothing ran embedded


def profile(cli: Callable[..., Any], core: int) -> Any:
    """One small tiny-gpt2 profile on pytorch/cpu: one backend thread, the contention
    monitors on the serving's core."""
    return cli(
        "profile",
        "--model",
        "tiny-gpt2",
        "--backend",
        "pytorch",
        "--device",
        "cpu",
        "--option",
        "threads=1",
        "--option",
        f"cores={core}",
        "--prompt-tokens",
        "1,16,32",
        "--output-tokens",
        "1,4",
        "--repeats",
        "2",
        "--holdout-prompt-tokens",
        "8",
        expect=(0, 1),
    )
