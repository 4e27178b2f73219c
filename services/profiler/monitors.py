"""Observations of the conditions of measurement, taken around (never inside) a sample.

Every monitor has two cheap reads: `before()` right before a generation is requested and
`after()` right after it returns. Nothing runs in between: no thread, no polling, no timer.

CPU (`CpuMonitor`). `foreign_cpu_s` is the CPU time others took from us during the sample,
the larger of two estimates:
 (a) busy time of the monitored cores from the per-cpu lines of /proc/stat
     (user+nice+system+irq+softirq+steal) minus the CPU time of our own processes
     (utime+stime from /proc/<pid>/stat). /proc/stat is not namespaced, so inside a
     container it still sees other containers, the host and hypervisor steal on the same
     cores, which a scan of the pids in our namespace would miss; it needs no privileges.
     Its resolution is one clock tick (USER_HZ, 10 ms), so it is used only for windows of
     at least `STAT_MIN_TICKS` ticks. When our processes also run on other cores the
     subtraction over-counts them and (a) errs low; it is clamped at 0.
 (b) run delay of the threads doing the work: the time they were runnable but waiting
     for a CPU (/proc/<pid>/task/<tid>/schedstat: on-CPU ns, run-delay ns), nanosecond
     resolution, so it catches contention within a few-millisecond sample where (a) is all
     quantisation. Only the *working* threads of our processes count (those whose CPU time
     in the window is at least `WORKING_THREAD_SHARE` of the busiest one's), and the
     figure is the largest delay among them: a wake-up of an idle helper thread (an RPC
     poller, a store writer) that waited behind the model is no evidence, while any
     delayed worker of a multi-threaded operator holds the whole operator up.
"Our processes" are this one plus `own_pids` (the serving process when it is local);
this one is left out (`count_self=False`) when it cannot run on the monitored cores (the
embedded suite keeps itself off the cores its serving child is pinned to): its CPU time
then lands on other cores, and subtracting it would hide foreign load.

GPU (NVML) and RAPL monitors live in `_device_monitors` and are re-exported here.

Pinning helpers: `parse_cores`, `format_cores`, `pin_to_cores` (every thread of a process:
Linux affinity is per thread), `current_affinity`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from pathlib import Path

from idealrt.core.affinity import parse_cores, pin_to_cores
from idealrt.core.domain import ContentionObservation
from idealrt.core.fingerprint import current_affinity, format_cores
from idealrt.services.profiler._device_monitors import (
    NVML_ENERGY_PERIOD_S,
    RAPL_ENERGY_PERIOD_S,
    GpuMonitor,
    RaplMonitor,
    gpu_index,
    load_nvml,
    nvml_handle,
)

__all__ = [
    "NVML_ENERGY_PERIOD_S",
    "STAT_MIN_TICKS",
    "WORKING_THREAD_SHARE",
    "CpuMonitor",
    "CpuReading",
    "GpuMonitor",
    "MonitorSet",
    "RaplMonitor",
    "Window",
    "current_affinity",
    "format_cores",
    "gpu_index",
    "load_nvml",
    "nvml_handle",
    "parse_cores",
    "pin_to_cores",
]

STAT_MIN_TICKS = 10  # /proc/stat estimates need windows of at least this many clock ticks
WORKING_THREAD_SHARE = 0.25  # a thread with this share of the busiest one's CPU is working
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal


# ---------------------------------------------------------------- pinning helpers


# ---------------------------------------------------------------- CPU


def _read_cpu_busy_ticks(cores: frozenset[int], proc: Path) -> int:
    total = 0
    with open(proc / "stat", encoding="ascii") as fh:
        for line in fh:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if int(name[3:]) in cores:
                total += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
    return total


def _read_pid_ticks(pid: int, proc: Path) -> int:
    try:
        text = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:  # the process is gone
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


def _read_threads(pid: int, proc: Path) -> dict[tuple[int, int], tuple[int, int]] | None:
    """(pid, tid) -> (on-CPU ns, run-delay ns) for every thread of `pid`; None when the
    kernel has no schedstat (or the process is gone)."""
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return None
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for tid in tids:
        try:
            fields = (proc / str(pid) / "task" / tid / "schedstat").read_text().split()
        except OSError:
            continue  # a thread that just exited, or no schedstat in this kernel
        if len(fields) >= 2:
            out[(pid, int(tid))] = (int(fields[0]), int(fields[1]))
    return out if out else None


@dataclasses.dataclass(frozen=True)
class CpuReading:
    busy_ticks: int  # of the monitored cores
    own_ticks: int  # CPU time of our processes
    threads: dict[tuple[int, int], tuple[int, int]] | None  # schedstat; None without it


class CpuMonitor:
    """CPU time taken from us on `cores` between two readings (see the module docstring)."""

    def __init__(
        self,
        cores: Iterable[int] | None = None,
        own_pids: Iterable[int] = (),
        *,
        proc: Path = Path("/proc"),
        count_self: bool = True,
    ) -> None:
        self.cores = frozenset(cores) if cores is not None else current_affinity()
        self.own_pids = frozenset({*([os.getpid()] if count_self else []), *own_pids})
        self._proc = proc
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
        try:
            _read_cpu_busy_ticks(self.cores, proc)
            self.available = True
        except (OSError, ValueError):
            self.available = False
        self.schedstat = self.available and self.read().threads is not None

    def read(self) -> CpuReading:
        busy = _read_cpu_busy_ticks(self.cores, self._proc)
        own = sum(_read_pid_ticks(pid, self._proc) for pid in self.own_pids)
        threads: dict[tuple[int, int], tuple[int, int]] | None = None
        for pid in self.own_pids:
            found = _read_threads(pid, self._proc)
            if found is not None:
                threads = {**(threads or {}), **found}
        return CpuReading(busy, own, threads)

    def stat_foreign_seconds(self, before: CpuReading, after: CpuReading) -> float:
        """Estimate (a): foreign busy time of the cores (clamped at 0)."""
        ticks = (after.busy_ticks - before.busy_ticks) - (after.own_ticks - before.own_ticks)
        return max(0, ticks) * self._tick_s

    def run_delay_seconds(self, before: CpuReading, after: CpuReading) -> float:
        """Estimate (b): the longest wait for a CPU among our working threads."""
        if before.threads is None or after.threads is None:
            return 0.0
        deltas = [
            (cpu - before.threads[key][0], delay - before.threads[key][1])
            for key, (cpu, delay) in after.threads.items()
            if key in before.threads
        ]
        busiest = max((cpu for cpu, _ in deltas), default=0)
        if busiest <= 0:
            return 0.0
        working = [d for cpu, d in deltas if cpu >= WORKING_THREAD_SHARE * busiest]
        return max(0, *working) / 1e9

    def foreign_seconds(self, before: CpuReading, after: CpuReading, window_s: float) -> float:
        stat = self.stat_foreign_seconds(before, after)
        if window_s < STAT_MIN_TICKS * self._tick_s:
            stat = 0.0  # a handful of ticks is quantisation, not evidence
        return max(stat, self.run_delay_seconds(before, after))


# ---------------------------------------------------------------- the set


@dataclasses.dataclass(frozen=True)
class Window:
    """What before() read; handed back to after()."""

    t_ns: int
    cpu: CpuReading | None
    gpu_energy_mj: int | None
    gpu_pids: frozenset[int]
    rapl: tuple[int, ...] | None


class MonitorSet:
    """The monitors of one profile. `before()`/`after()` bracket one sample."""

    def __init__(
        self,
        cpu: CpuMonitor | None = None,
        gpu: GpuMonitor | None = None,
        rapl: RaplMonitor | None = None,
    ) -> None:
        self.cpu = cpu if cpu is not None and cpu.available else None
        self.gpu = gpu if gpu is not None and gpu.available else None
        self.rapl = rapl if rapl is not None and rapl.available else None

    @classmethod
    def for_device(
        cls,
        device: str,
        cores: Iterable[int] | None = None,
        own_pids: Iterable[int] = (),
        *,
        count_self: bool = True,
    ) -> MonitorSet:
        own = tuple(own_pids)
        gpu = GpuMonitor(device, own) if gpu_index(device) is not None else None
        cpu = CpuMonitor(cores, own, count_self=count_self)
        return cls(cpu=cpu, gpu=gpu, rapl=RaplMonitor())

    @property
    def watching(self) -> bool:
        """Whether anything is watched (a CPU or GPU monitor): the runner waits contention
        out on quiet windows of these, else it backs off blind."""
        return self.cpu is not None or self.gpu is not None

    def describe(self) -> dict[str, str]:
        """Provenance entries saying which monitors observed the run."""
        out = {
            "monitor.cpu": (
                ("proc-stat+schedstat" if self.cpu.schedstat else "proc-stat")
                if self.cpu
                else "unavailable"
            ),
            "monitor.gpu": "nvml" if self.gpu else "unavailable",
            "monitor.rapl": f"{len(self.rapl.zones)} zones" if self.rapl else "unavailable",
        }
        if self.cpu:
            out["monitor.cpu.cores"] = format_cores(self.cpu.cores)
            out["monitor.cpu.own_pids"] = ",".join(map(str, sorted(self.cpu.own_pids)))
        return out

    def before(self) -> Window:
        cpu = self.cpu.read() if self.cpu else None
        gpu_e = self.gpu.energy_mj() if self.gpu else None
        gpu_p = frozenset(self.gpu.foreign_pids()) if self.gpu else frozenset()
        rapl = self.rapl.read() if self.rapl else None
        return Window(time.perf_counter_ns(), cpu, gpu_e, gpu_p, rapl)

    def after(self, w: Window) -> ContentionObservation:
        t_ns = time.perf_counter_ns()
        window_s = (t_ns - w.t_ns) / 1e9
        rapl = self.rapl.read() if self.rapl else None
        foreign_cpu = 0.0
        if self.cpu and w.cpu is not None:
            foreign_cpu = self.cpu.foreign_seconds(w.cpu, self.cpu.read(), window_s)
        energy_j, source = 0.0, ""
        foreign_gpu, sm, temp, reasons = 0, 0.0, 0.0, 0
        if self.gpu:
            foreign_gpu = len(w.gpu_pids | self.gpu.foreign_pids())
            sm, temp, reasons = self.gpu.state()
            e = self.gpu.energy_mj()
            if (
                e is not None
                and w.gpu_energy_mj is not None
                and window_s >= self.gpu.energy_period_s
            ):
                energy_j, source = (e - w.gpu_energy_mj) / 1e3, "nvml"
        elif (
            self.rapl
            and w.rapl is not None
            and rapl is not None
            and window_s >= RAPL_ENERGY_PERIOD_S
        ):
            energy_j, source = self.rapl.joules(w.rapl, rapl), "rapl"
        return ContentionObservation(
            foreign_cpu_s=foreign_cpu,
            gpu_foreign_processes=foreign_gpu,
            sm_clock_mhz=sm,
            temperature_c=temp,
            throttle_reasons=reasons,
            energy_j=energy_j,
            energy_source=source,
        )
