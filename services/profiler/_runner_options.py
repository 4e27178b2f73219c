"""What a profile run is given: its options, the sample sink and the default monitors, and
the text of a failure; public through `idealrt.services.profiler.runner`.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from idealrt.core.domain import Profile, Sample
from idealrt.core.errors import IdealrtError
from idealrt.services.profiler._outage import RetryPolicy
from idealrt.services.profiler.adaptive import AdaptiveOptions
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.monitors import MonitorSet, current_affinity, parse_cores

__all__ = [
    "MonitorFactory",
    "RunnerOptions",
    "SampleSink",
    "default_monitors",
    "error_text",
    "wait_on",
]


class SampleSink(Protocol):
    """Where samples go (the store, or its gRPC client)."""

    def append_samples(self, profile_id: str, batch_id: str, samples: Sequence[Sample]) -> int: ...

    def all_samples(self, profile_id: str) -> list[Sample]: ...

    def count_samples(self, profile_id: str) -> int: ...


MonitorFactory = Callable[[Profile, Mapping[str, str]], MonitorSet]


def default_monitors(
    profile: Profile, target_env: Mapping[str, str], cores: Iterable[int] | None = None
) -> MonitorSet:
    """CPU monitor on `cores` (default: this process's affinity; bind other cores with
    functools.partial), counting the serving process as ours when the target reports it on
    this host, and this process only while it may run on those cores (the embedded suite
    keeps itself off the cores its serving child is pinned to: services/suite.py); NVML
    for GPUs; RAPL."""
    if cores is None and profile.stack.options.get("cores", "").strip():
        cores = parse_cores(profile.stack.options["cores"])
    own: list[int] = []
    pid = target_env.get("serving.pid", "")
    if pid.isdigit() and target_env.get("serving.host") == socket.gethostname():
        own.append(int(pid))
    if cores is not None:
        cores = frozenset(cores)
    count_self = cores is None or not cores.isdisjoint(current_affinity())
    return MonitorSet.for_device(profile.stack.device, cores, own, count_self=count_self)


def wait_on(event: threading.Event, seconds: float) -> bool:
    """The default `RunnerOptions.sleep`: block up to `seconds` or until `event` is set;
    True when it was set (cancelled)."""
    return event.wait(seconds)


@dataclasses.dataclass(frozen=True)
class RunnerOptions:
    """clock: the monotonic clock of the budget, the spread schedule and outage windows
    (waits block on the cancel event with timeouts measured on it; tests substitute both).

    Outages (see _outage.py): a store or serving call that fails UNAVAILABLE or
    DEADLINE_EXCEEDED is retried with exponential backoff (full jitter, from retry_base_s
    up to retry_cap_s) for `outage_window_s` from the outage's first failure, then the
    profile ends FAILED (STORE_UNAVAILABLE / SERVING_UNAVAILABLE). While the store is
    unreachable measuring goes on and samples wait in memory, at most
    `max_buffered_samples` of them; at that many the run stops measuring until the store
    takes them. `sleep(event, seconds)` is every backoff wait: it blocks on the cancel
    event (True when cancelled; tests substitute it with the clock).

    background_writes: sample batches and progress go to the store on threads of their
    own (ProfilerConfig.background_writes; False: between samples, on the measuring
    thread, for a profiler in one process with the serving it measures)."""

    lease_dir: Path = Path(".idealrt/leases")
    lease_timeout_s: float | None = None  # WAIT policy: give up (DEVICE_BUSY) after this
    contention: ContentionPolicy = dataclasses.field(default_factory=ContentionPolicy)
    batch_samples: int = 16
    batch_interval_s: float = 2.0
    max_nonconforming: int = 3
    monitors: MonitorFactory = default_monitors
    adaptive: AdaptiveOptions = dataclasses.field(default_factory=AdaptiveOptions)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[threading.Event, float], bool] = wait_on
    outage_window_s: float = 300.0  # ProfilerConfig.outage_window_s
    retry_base_s: float = 0.5
    retry_cap_s: float = 30.0
    max_buffered_samples: int = 1024
    background_writes: bool = True

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.outage_window_s, self.retry_base_s, self.retry_cap_s)


def error_text(exc: BaseException) -> str:
    """Profile.error of a failure: "<REASON>: <message>" (INTERNAL for foreign errors)."""
    if isinstance(exc, IdealrtError):
        return f"{exc.reason}: {exc.message}"
    return f"INTERNAL: {type(exc).__name__}: {exc}"
