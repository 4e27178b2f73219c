"""The machine's fingerprint: hardware, drivers, library versions, idealrt revision.

Shared by the serving service (GetEnvironment: the process that measures) and the profiler
(provenance of every profile). Library versions come from importlib.metadata: nothing heavy
is imported. NVML (nvidia-ml-py) is used when present and a driver is loaded.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "LIBRARIES",
    "current_affinity",
    "format_cores",
    "git_revision",
    "library_version",
    "load_nvml",
    "machine_environment",
]

LIBRARIES = (
    "torch",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "transformers",
    "numpy",
    "grpcio",
    "nvidia-ml-py",
)


_SIMD = (
    "avx",
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_bf16",
    "amx_tile",
    "fma",
    "neon",
    "sve",
)


def format_cores(cores: Iterable[int]) -> str:
    """{0, 1, 2, 6} -> '0-2,6'."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def current_affinity(pid: int = 0) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(pid))


def load_nvml() -> Any | None:
    """The initialised `pynvml` module, or None when nvidia-ml-py or the driver is absent."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    return pynvml


def git_revision(path: Path | None = None) -> str:
    """`git rev-parse HEAD` of the checkout holding this package (+ "-dirty" when the
    working tree differs), or "unknown" outside a checkout."""
    where = path or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        )
        suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return rev.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"cpu.model": platform.processor() or "unknown"}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    out["cpu.model"] = fields.get("model name") or fields.get("Model") or "unknown"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    out["cpu.flags"] = ",".join(f for f in _SIMD if f in flags)
    return out


def _meminfo_bytes() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return str(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


def _gpus() -> dict[str, str]:
    nvml = load_nvml()
    if nvml is None:
        return {"gpu.count": "0", "gpu.nvml": "unavailable"}
    out: dict[str, str] = {"gpu.nvml": "available"}
    try:
        out["gpu.driver"] = str(nvml.nvmlSystemGetDriverVersion())
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        out["gpu.cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        count = int(nvml.nvmlDeviceGetCount())
        out["gpu.count"] = str(count)
        for i in range(count):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            out[f"gpu.{i}.name"] = str(nvml.nvmlDeviceGetName(h))
            out[f"gpu.{i}.uuid"] = str(nvml.nvmlDeviceGetUUID(h))
            out[f"gpu.{i}.memory_bytes"] = str(int(nvml.nvmlDeviceGetMemoryInfo(h).total))
    except Exception as exc:  # a partial fingerprint beats none
        out["gpu.error"] = f"{type(exc).__name__}: {exc}"
    return out


library_version = _version


def machine_environment() -> dict[str, str]:
    """Flat entries for this machine and process (what GetEnvironment returns)."""
    e: dict[str, str] = {}
    e.update(_cpuinfo())
    e["cpu.logical_cores"] = str(os.cpu_count() or 0)
    e["cpu.affinity"] = format_cores(current_affinity())
    e["cpu.governor"] = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    e["mem.total_bytes"] = _meminfo_bytes()
    e["os.system"] = platform.system()
    e["os.kernel"] = platform.release()
    e["os.release"] = platform.version()
    e["python.version"] = platform.python_version()
    e["python.implementation"] = platform.python_implementation()
    for lib in LIBRARIES:
        e[f"{lib}.version"] = _version(lib)
    e.update(_gpus())
    e["idealrt.version"] = _version("idealrt")
    e["idealrt.git_rev"] = git_revision()
    e["process.pid"] = str(os.getpid())
    e["host.name"] = socket.gethostname()
    return e
