"""What a profile run is given: its options, the sample sink and the default monitors, and
the text of a failure; public through `idealrt.services.profiler.runner`.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from idealrt.core.domain import Profile, Sample
from idealrt.core.errors import IdealrtError
from idealrt.services.profiler.adaptive import AdaptiveOptions
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.monitors import MonitorSet, parse_cores

__all__ = ["MonitorFactory", "RunnerOptions", "SampleSink", "default_monitors", "error_text"]


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
    this host; NVML for GPUs; RAPL."""
    if cores is None and profile.stack.options.get("cores", "").strip():
        cores = parse_cores(profile.stack.options["cores"])
    own: list[int] = []
    pid = target_env.get("serving.pid", "")
    if pid.isdigit() and target_env.get("serving.host") == socket.gethostname():
        own.append(int(pid))
    return MonitorSet.for_device(profile.stack.device, cores, own)


@dataclasses.dataclass(frozen=True)
class RunnerOptions:
    """clock: the monotonic clock of the budget and the spread schedule (waits block on the
    cancel event with timeouts measured on it; tests substitute both)."""

    lease_dir: Path = Path(".idealrt/leases")
    lease_timeout_s: float | None = None  # WAIT policy: give up (DEVICE_BUSY) after this
    contention: ContentionPolicy = dataclasses.field(default_factory=ContentionPolicy)
    batch_samples: int = 16
    batch_interval_s: float = 2.0
    max_nonconforming: int = 3
    append_retries: int = 3
    monitors: MonitorFactory = default_monitors
    adaptive: AdaptiveOptions = dataclasses.field(default_factory=AdaptiveOptions)
    clock: Callable[[], float] = time.monotonic


def error_text(exc: BaseException) -> str:
    """Profile.error of a failure: "<REASON>: <message>" (INTERNAL for foreign errors)."""
    if isinstance(exc, IdealrtError):
        return f"{exc.reason}: {exc.message}"
    return f"INTERNAL: {type(exc).__name__}: {exc}"
