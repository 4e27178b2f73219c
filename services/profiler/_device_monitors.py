"""GPU (NVML) and RAPL monitors; public through `idealrt.services.profiler.monitors`.

GPU (`GpuMonitor`, NVML through nvidia-ml-py, imported lazily): processes on the device that
are not ours, SM clock, temperature, clock-event (throttle) reasons and the total-energy
counter (mJ). The counter refreshes only every `NVML_ENERGY_PERIOD_S`; a window shorter than
that reports no energy (0 J, source "") instead of a number that is mostly quantisation.
In a container NVML may report host pids that cannot be matched to ours: processes already
on the device when the monitor starts (after the model is loaded) that are not visible in
our /proc are taken to be ours seen through another pid namespace.

RAPL (`RaplMonitor`): /sys/class/powercap/intel-rapl:N/energy_uj of each package when
readable, wraparound handled with max_energy_range_uj.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from idealrt.core.fingerprint import load_nvml

__all__ = [
    "NVML_ENERGY_PERIOD_S",
    "RAPL_ENERGY_PERIOD_S",
    "GpuMonitor",
    "RaplMonitor",
    "gpu_index",
    "load_nvml",
    "nvml_handle",
]

NVML_ENERGY_PERIOD_S = 0.1  # conservative refresh period of nvmlDeviceGetTotalEnergyConsumption
RAPL_ENERGY_PERIOD_S = 0.001


# ---------------------------------------------------------------- GPU (NVML)


def gpu_index(device: str) -> int | None:
    """'cuda' -> 0, 'cuda:1' -> 1, 'cpu' -> None."""
    m = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", device.strip().lower())
    if m is None:
        return None
    return int(m.group(1) or 0)


def nvml_handle(nvml: Any, device: str) -> Any | None:
    """NVML handle of a torch-style device name, honouring CUDA_VISIBLE_DEVICES (indices or
    GPU-/MIG- UUIDs)."""
    index = gpu_index(device)
    if index is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        if visible:
            entries = [e.strip() for e in visible.split(",") if e.strip()]
            if index >= len(entries):
                return None
            entry = entries[index]
            if entry.isdigit():
                return nvml.nvmlDeviceGetHandleByIndex(int(entry))
            return nvml.nvmlDeviceGetHandleByUUID(entry)
        return nvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def _nvml_pids(nvml: Any, handle: Any) -> set[int]:
    pids: set[int] = set()
    for name in (
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
        "nvmlDeviceGetMPSComputeRunningProcesses",
    ):
        fn = getattr(nvml, name, None)
        if fn is None:
            continue
        with contextlib.suppress(Exception):
            pids.update(int(p.pid) for p in fn(handle))
    return pids


def _nvml_call(fn: Any, *args: Any) -> Any | None:
    try:
        return fn(*args)
    except Exception:
        return None


class GpuMonitor:
    """NVML observations of one GPU."""

    def __init__(
        self,
        device: str,
        own_pids: Iterable[int] = (),
        *,
        nvml: Any | None = None,
        proc: Path = Path("/proc"),
        energy_period_s: float = NVML_ENERGY_PERIOD_S,
    ) -> None:
        self.nvml = nvml if nvml is not None else load_nvml()
        self.handle = nvml_handle(self.nvml, device) if self.nvml is not None else None
        self.available = self.handle is not None
        self.own_pids = frozenset({os.getpid(), *own_pids})
        self.energy_period_s = energy_period_s
        self._unmatched: frozenset[int] = frozenset()
        if self.available:
            # Processes already there and invisible in our /proc: ourselves through another
            # pid namespace (see the module docstring).
            present = _nvml_pids(self.nvml, self.handle)
            self._unmatched = frozenset(p for p in present if not (proc / str(p)).exists())

    def foreign_pids(self) -> set[int]:
        if not self.available:
            return set()
        return _nvml_pids(self.nvml, self.handle) - self.own_pids - self._unmatched

    def energy_mj(self) -> int | None:
        nv = self.nvml
        if not self.available or nv is None:
            return None
        value = _nvml_call(nv.nvmlDeviceGetTotalEnergyConsumption, self.handle)
        return int(value) if value is not None else None

    def state(self) -> tuple[float, float, int]:
        """(SM clock MHz, temperature C, clock-event reasons bitmask)."""
        nv = self.nvml
        if not self.available or nv is None:
            return 0.0, 0.0, 0
        sm = _nvml_call(nv.nvmlDeviceGetClockInfo, self.handle, nv.NVML_CLOCK_SM)
        temp = _nvml_call(nv.nvmlDeviceGetTemperature, self.handle, nv.NVML_TEMPERATURE_GPU)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        reasons = _nvml_call(reasons_fn, self.handle) if reasons_fn is not None else None
        return float(sm or 0.0), float(temp or 0.0), int(reasons or 0)


# ---------------------------------------------------------------- RAPL


@dataclasses.dataclass(frozen=True)
class _RaplZone:
    energy: Path
    max_range_uj: int


class RaplMonitor:
    """Package energy from the powercap RAPL interface (top-level zones only)."""

    def __init__(self, root: Path = Path("/sys/class/powercap")) -> None:
        self.zones: list[_RaplZone] = []
        try:
            candidates = sorted(root.glob("intel-rapl:*"))
        except OSError:
            candidates = []
        for zone in candidates:
            if not re.fullmatch(r"intel-rapl:\d+", zone.name):
                continue  # sub-zones (core, uncore, dram) are inside the package total
            try:
                int((zone / "energy_uj").read_text())
                max_range = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue  # not readable (often root-only)
            self.zones.append(_RaplZone(zone / "energy_uj", max_range))
        self.available = bool(self.zones)

    def read(self) -> tuple[int, ...]:
        return tuple(int(z.energy.read_text()) for z in self.zones)

    def joules(self, before: Sequence[int], after: Sequence[int]) -> float:
        total = 0
        for zone, b, a in zip(self.zones, before, after, strict=True):
            delta = a - b
            if delta < 0:  # the counter wrapped around
                delta += zone.max_range_uj
            total += delta
        return total / 1e6
