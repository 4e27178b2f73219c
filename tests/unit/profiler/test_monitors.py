"""Monitors: /proc arithmetic on a constructed /proc tree, RAPL wraparound on a constructed
sysfs tree, NVML through a stand-in module (no GPU here), and one real CPU measurement."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest

from idealrt.core.errors import InvalidArgument
from idealrt.services.profiler import monitors as M


def test_parse_and_format_cores() -> None:
    assert M.parse_cores("0-3,6") == {0, 1, 2, 3, 6}
    assert M.format_cores({0, 1, 2, 3, 6}) == "0-3,6"
    assert M.format_cores(M.parse_cores("5,1, 2")) == "1-2,5"
    for bad in ("", "a", "3-1", "1-"):
        with pytest.raises(InvalidArgument) as info:
            M.parse_cores(bad)
        assert info.value.reason == "CPU_CORES_INVALID"


def test_pin_to_cores_on_a_child_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        core = min(os.sched_getaffinity(0))
        before = M.pin_to_cores({core}, child.pid)
        assert M.current_affinity(child.pid) == {core}
        M.pin_to_cores(before, child.pid)
        assert M.current_affinity(child.pid) == before
    finally:
        child.kill()
        child.wait()


def _write_proc(
    root: Path,
    cpu: Mapping[int, tuple[int, ...]],
    pids: dict[int, tuple[int, int]],
    threads: dict[int, list[tuple[int, int]]] | None = None,
) -> None:
    """A /proc tree: per-cpu lines of stat, utime/stime per pid, (on-CPU ns, run-delay ns)
    per thread."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    lines += [f"cpu{i} " + " ".join(map(str, f)) for i, f in cpu.items()]
    lines.append("intr 0")
    (root / "stat").write_text("\n".join(lines) + "\n")
    for pid, (ut, st) in pids.items():
        (root / str(pid)).mkdir(exist_ok=True)
        tail = ["S"] + ["0"] * 10 + [str(ut), str(st)] + ["0"] * 30
        (root / str(pid) / "stat").write_text(f"{pid} (odd) name) " + " ".join(tail) + "\n")
        for i, (cpu_ns, delay_ns) in enumerate((threads or {}).get(pid, [])):
            task = root / str(pid) / "task" / str(pid + i)
            task.mkdir(parents=True, exist_ok=True)
            (task / "schedstat").write_text(f"{cpu_ns} {delay_ns} 4\n")


def test_cpu_monitor_foreign_time_from_proc_stat(tmp_path: Path) -> None:
    me = os.getpid()
    # fields: user nice system idle iowait irq softirq steal
    _write_proc(
        tmp_path, {0: (100, 0, 50, 900, 9, 1, 1, 0), 1: (10, 0, 0, 0, 0, 0, 0, 0)}, {me: (40, 10)}
    )
    mon = M.CpuMonitor({0}, proc=tmp_path)
    assert mon.available and not mon.schedstat
    before = mon.read()
    # idle and iowait are not busy; cpu1 is not monitored
    assert (before.busy_ticks, before.own_ticks, before.threads) == (152, 50, None)
    # 60 busy ticks on cpu0 (incl. 5 steal), of which our process used 20
    _write_proc(
        tmp_path, {0: (140, 0, 65, 950, 9, 1, 1, 5), 1: (99, 0, 0, 0, 0, 0, 0, 0)}, {me: (55, 15)}
    )
    after = mon.read()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert mon.stat_foreign_seconds(before, after) == pytest.approx(40 * tick)
    assert mon.foreign_seconds(before, after, window_s=1.0) == pytest.approx(40 * tick)
    # a window of a few ticks: the tick counters are quantisation, not evidence
    assert mon.foreign_seconds(before, after, window_s=2 * tick) == 0.0
    # our own usage larger than the cores' busy time (we ran elsewhere): clamped, no alarm
    assert mon.stat_foreign_seconds(M.CpuReading(0, 0, None), M.CpuReading(10, 50, None)) == 0


def test_cpu_monitor_run_delay_of_our_working_threads(tmp_path: Path) -> None:
    me, serving = os.getpid(), 4242
    cpu = {0: (0, 0, 0, 0, 0, 0, 0, 0)}
    pids = {me: (0, 0), serving: (0, 0)}
    # threads: ours = (profiler thread, rpc poller); serving = (model thread, helper)
    _write_proc(tmp_path, cpu, pids, {me: [(0, 0), (0, 0)], serving: [(0, 0), (0, 0)]})
    mon = M.CpuMonitor({0}, own_pids=[serving], proc=tmp_path)
    assert mon.schedstat
    before = mon.read()
    assert before.threads is not None and len(before.threads) == 4
    _write_proc(
        tmp_path,
        cpu,
        pids,
        {
            me: [(100_000, 0), (50_000, 3_000_000)],  # an idle poller waited 3 ms: no evidence
            serving: [(5_000_000, 1_500_000), (2_000_000, 2_000_000)],  # the workers waited
        },
    )
    after = mon.read()
    # working threads: >= 25% of the busiest one's CPU (5 ms): the two serving threads
    assert mon.run_delay_seconds(before, after) == pytest.approx(0.002)
    # ns resolution: counts even in a window far shorter than a tick
    assert mon.foreign_seconds(before, after, window_s=0.005) == pytest.approx(0.002)
    # nobody worked: nothing to judge
    assert mon.run_delay_seconds(before, before) == 0.0


def test_cpu_monitor_unavailable_without_proc(tmp_path: Path) -> None:
    assert not M.CpuMonitor({0}, proc=tmp_path).available
    assert M.MonitorSet(cpu=M.CpuMonitor({0}, proc=tmp_path)).cpu is None


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_cpu_monitor_sees_a_real_busy_process() -> None:
    """A real hog pinned to the core our (pinned) thread spins on: both estimates see it."""
    core = min(M.current_affinity())
    previous = M.pin_to_cores({core})
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"]
    )
    try:
        mon = M.CpuMonitor({core})
        time.sleep(0.3)
        before = mon.read()
        _spin(0.4)
        after = mon.read()
    finally:
        hog.kill()
        hog.wait()
        M.pin_to_cores(previous)
    assert M.current_affinity() == previous
    assert mon.stat_foreign_seconds(before, after) >= 0.1
    if mon.schedstat:
        assert mon.run_delay_seconds(before, after) >= 0.1
    assert mon.foreign_seconds(before, after, 0.4) >= 0.1


def test_rapl_wraparound_and_subzones(tmp_path: Path) -> None:
    pkg = tmp_path / "intel-rapl:0"
    sub = tmp_path / "intel-rapl:0:0"
    for zone, energy in ((pkg, 999_000_000), (sub, 5)):
        zone.mkdir()
        (zone / "energy_uj").write_text(f"{energy}\n")
        (zone / "max_energy_range_uj").write_text("1000000000\n")
    mon = M.RaplMonitor(tmp_path)
    assert mon.available and len(mon.zones) == 1  # sub-zones are inside the package
    before = mon.read()
    (pkg / "energy_uj").write_text("2000000\n")  # wrapped past 1e9
    assert mon.joules(before, mon.read()) == pytest.approx(3.0)


def test_rapl_absent(tmp_path: Path) -> None:
    assert not M.RaplMonitor(tmp_path / "nope").available


def fake_nvml(pids: list[int], energy: list[int]) -> SimpleNamespace:
    def energy_fn(h: object) -> int:
        return energy.pop(0)

    return SimpleNamespace(
        NVML_CLOCK_SM=1,
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetHandleByUUID=lambda u: f"u{u}",
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=p) for p in pids],
        nvmlDeviceGetTotalEnergyConsumption=energy_fn,
        nvmlDeviceGetClockInfo=lambda h, kind: 1410,
        nvmlDeviceGetTemperature=lambda h, kind: 61,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4,
    )


def test_nvml_handle_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_nvml([], [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert M.nvml_handle(nv, "cuda:1") == "h1"
    assert M.nvml_handle(nv, "cpu") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")
    assert M.nvml_handle(nv, "cuda") == "h3"
    assert M.nvml_handle(nv, "cuda:1") == "uGPU-abc"
    assert M.nvml_handle(nv, "cuda:2") is None


def test_gpu_monitor_observations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    me = os.getpid()
    (tmp_path / "4242").mkdir()  # a process visible in our /proc: foreign
    pids = [me, 777]  # 777: present at start, invisible in /proc -> ourselves via host pid
    nv = fake_nvml(pids, [1_000, 6_000, 9_000, 9_010])
    gpu = M.GpuMonitor("cuda:0", nvml=nv, proc=tmp_path, energy_period_s=0.05)
    ms = M.MonitorSet(gpu=gpu)
    w = ms.before()
    time.sleep(0.06)
    obs = ms.after(w)
    assert obs.gpu_foreign_processes == 0
    assert (obs.sm_clock_mhz, obs.temperature_c, obs.throttle_reasons) == (1410, 61, 4)
    assert (obs.energy_j, obs.energy_source) == (5.0, "nvml")
    pids.append(4242)
    w = ms.before()
    obs = ms.after(w)  # far shorter than the counter period: no energy figure
    assert obs.gpu_foreign_processes == 1
    assert (obs.energy_j, obs.energy_source) == (0.0, "")


def test_load_nvml_without_a_driver_is_none() -> None:
    # This machine has nvidia-ml-py but no driver; the GPU machine has both.
    nv = M.load_nvml()
    if nv is not None:
        pytest.skip("NVML is available here")
    assert not M.GpuMonitor("cuda:0").available


def test_monitor_set_describe() -> None:
    ms = M.MonitorSet.for_device("cpu", {0}, own_pids=[1])
    d = ms.describe()
    assert d["monitor.cpu"].startswith("proc-stat") and d["monitor.cpu.cores"] == "0"
    assert "1" in d["monitor.cpu.own_pids"].split(",")
    assert d["monitor.gpu"] == "unavailable"
