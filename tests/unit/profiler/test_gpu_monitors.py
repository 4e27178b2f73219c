"""NVML on a real GPU (skipped without a driver): the monitor, the lease key and the
fingerprint see the device. Needs no CUDA build of torch."""

from __future__ import annotations

import time

import pytest

from idealrt.services.profiler import monitors as M
from idealrt.services.profiler.fingerprint import collect_fingerprint
from idealrt.services.profiler.lease import device_key

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(M.load_nvml() is None, reason="needs an NVIDIA driver (NVML)"),
]


def test_gpu_monitor_reads_the_device() -> None:
    gpu = M.GpuMonitor("cuda:0")
    assert gpu.available
    ms = M.MonitorSet(gpu=gpu)
    window = ms.before()
    time.sleep(M.NVML_ENERGY_PERIOD_S * 3)  # long enough for the energy counter to move
    obs = ms.after(window)
    assert obs.sm_clock_mhz >= 0 and obs.temperature_c > 0
    assert obs.gpu_foreign_processes == 0  # nobody else on a leased test GPU
    if gpu.energy_mj() is not None:
        assert obs.energy_source == "nvml" and obs.energy_j > 0
    short = ms.after(ms.before())  # far shorter than the counter's period: no energy figure
    assert (short.energy_j, short.energy_source) == (0.0, "")


def test_lease_key_and_fingerprint_name_the_gpu(kit) -> None:  # type: ignore[no-untyped-def]
    assert device_key("cuda:0").startswith("gpu-")
    entries = collect_fingerprint(kit.make_profile()).entries
    assert int(entries["gpu.count"]) >= 1
    assert entries["gpu.0.name"] and entries["gpu.0.uuid"] and entries["gpu.driver"]
