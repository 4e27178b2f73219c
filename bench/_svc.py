"""Processes for bench_service.py: a service started as `python -m idealrt.services.<name>`
(its own process, configured by environment variables like any deployment), and the load
generator (`_load.py`) in another, both on this machine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
_PORT_LINE = re.compile(r"(\w+) listening on port (\d+)")


class Service:
    """`python -m idealrt.services.<name>` with `env` (over a copy of os.environ), stopped
    with SIGTERM (graceful) on exit. `port` once it printed its port line; its log lines
    (stderr) are discarded except the last ones, kept for a failure's message."""

    def __init__(self, name: str, env: Mapping[str, str], *, start_timeout_s: float = 120) -> None:
        full = {**os.environ, "IDEALRT_LOG_LEVEL": "warning", **env}
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"idealrt.services.{name}"],
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._tail: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.port = self._read_port(start_timeout_s)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._tail = [*self._tail[-30:], line.rstrip()]

    def _read_port(self, timeout_s: float) -> int:
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout_s, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                m = _PORT_LINE.search(line)
                if m:
                    return int(m.group(2))
        finally:
            timer.cancel()
        raise RuntimeError(f"{self.name} did not start: " + "\n".join(self._tail))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        """The server process's resident memory (Linux /proc), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load(
    target: str,
    rpc: str,
    *,
    clients: int = 200,
    seconds: float = 60.0,
    channels: int = 8,
    params: Mapping[str, str] | None = None,
    watches: int = 0,
    watch_target: str = "",
    cores: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run the load generator in a process of its own; its JSON result."""
    cmd = [
        sys.executable,
        str(BENCH_DIR / "_load.py"),
        "--target",
        target,
        "--rpc",
        rpc,
        "--clients",
        str(clients),
        "--seconds",
        str(seconds),
        "--channels",
        str(channels),
    ]
    for k, v in (params or {}).items():
        cmd += ["--param", f"{k}={v}"]
    if watches:
        cmd += ["--watches", str(watches), "--watch-target", watch_target]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 300, check=False,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- seeded data

PROMPTS, OUTPUTS, REPEATS = (1, 16, 64, 128, 256, 512), (2, 8, 32, 128), 3


def new_profile(namespace: str = "default", target_address: str = "") -> Any:
    """A small profile (as CreateProfile takes it) of the catalog's tiny-gpt2 on the CPU."""
    from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec, Target

    return Profile(
        id="",
        model=ModelRef(name="tiny-gpt2"),
        stack=StackSpec(device="cpu", options={"threads": "1"}),
        plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,), repeats=1, warmups=0),
        target=Target(address=target_address),
        namespace=namespace,
    )


def synthetic_samples(seed: int = 0) -> list[Any]:
    """Samples of a grid as a linear alpha / beta model gives them, with 2% multiplicative
    noise (seeded): fittable, with bootstrap replicates that differ."""
    from datetime import UTC, datetime

    import numpy as np

    from idealrt.core.domain import Sample

    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    out = []
    for p in PROMPTS:
        for o in OUTPUTS:
            for r in range(REPEATS):
                noise = rng.lognormal(0.0, 0.02, size=o)
                decode = tuple(
                    int((2_000_000 + 1_000 * (p + k + 1)) * noise[k + 1]) for k in range(o - 1)
                )
                prefill = int((1_000_000 + 10_000 * p) * noise[0])
                out.append(
                    Sample(
                        prompt_tokens=p,
                        output_tokens=o,
                        prefill_ns=prefill,
                        decode_ns=decode,
                        total_ns=prefill + sum(decode),
                        repeat=r,
                        start_time=now,
                    )
                )
    return out


def seed_succeeded_profile(store_target: str) -> str:
    """A SUCCEEDED profile with `synthetic_samples` in the store at `store_target`; its id."""
    import dataclasses
    import uuid

    from idealrt.clients.store import StoreClient
    from idealrt.core.domain import ProfileState

    samples = synthetic_samples()
    with StoreClient(store_target) as st:
        prof, _ = st.create_profile(new_profile())
        running = dataclasses.replace(prof, state=ProfileState.RUNNING)
        st.update_profile(running)
        st.append_samples(prof.id, uuid.uuid4().hex, samples)
        done = dataclasses.replace(
            running,
            state=ProfileState.SUCCEEDED,
            completed_samples=len(samples),
            total_samples=len(samples),
        )
        st.update_profile(done)
    return str(prof.id)
