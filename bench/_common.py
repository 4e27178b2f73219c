"""Helpers shared by the benches: the machine description, result files, the machine's
measured limits (memory read bandwidth, fp32 matmul rate), in-process profiling, workloads.

Every bench writes one JSON document (`write_result`) with the machine it ran on (CPU model,
cores, affinity, load average before and after, library versions): on a shared machine an
absolute time means nothing without them. Ratios measured side by side in one run are the
numbers to compare across runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from idealrt.core.domain import (
    ContentionObservation,
    ModelRef,
    Profile,
    ProfilePlan,
    Sample,
    SampleFlag,
    StackSpec,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
QUICK_RESULTS = RESULTS / "quick"
EXTRA_LIBRARIES = ("scipy", "matplotlib", "onnx", "structlog")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# ---------------------------------------------------------------- the machine


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def machine() -> dict[str, Any]:
    """This machine and process: CPU, cores, affinity, memory, library versions, load."""
    from idealrt.core.fingerprint import library_version, machine_environment

    env = machine_environment()
    for lib in EXTRA_LIBRARIES:
        env[f"{lib}.version"] = library_version(lib)
    for key in ("process.pid", "host.name"):
        env.pop(key, None)
    return {
        "environment": env,
        "loadavg_1_5_15": loadavg(),
        "note": "shared 2-core machine: other processes run concurrently; compare ratios "
        "measured in one run, and absolute times only on this machine at this load",
    }


def default_core() -> int:
    """The core a single-threaded measurement is pinned to: the highest allowed one."""
    return max(os.sched_getaffinity(0))


@contextlib.contextmanager
def pinned(cores: Sequence[int], threads: int) -> Iterator[None]:
    """Pin this whole process to `cores` with `threads` torch threads; restore after."""
    import torch

    from idealrt.core.affinity import pin_to_cores

    previous = pin_to_cores(cores)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        pin_to_cores(previous)


def backend_available(backend: str) -> tuple[bool, str]:
    """(True, "") when the serving backend module imports, else (False, the reason)."""
    import importlib

    try:
        importlib.import_module(f"idealrt.services.serving.backends.{backend}_backend")
    except Exception as e:  # any failure means "not available", with the reason recorded
        return False, f"{type(e).__name__}: {e}"
    return True, ""


# ---------------------------------------------------------------- results


def out_dir(quick: bool, given: Path | None = None) -> Path:
    d = given or (QUICK_RESULTS if quick else RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    return d


def target(
    name: str, value: float | None, op: str, threshold: float, unit: str = ""
) -> dict[str, Any]:
    """One checked target: value `op` threshold with op in ("<=", ">="); met None when not
    measured. unit: "%" (a fraction shown as percent), "x" (a ratio) or "" (a number)."""
    met = None
    if value is not None and np.isfinite(value):
        met = bool(value <= threshold if op == "<=" else value >= threshold)
    return {
        "name": name,
        "value": value,
        "op": op,
        "threshold": threshold,
        "met": met,
        "unit": unit,
    }


def fmt(value: float | None, unit: str) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if unit == "%":
        return f"{value:.2%}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.4g}"


def begin_doc(benchmark: str, quick: bool, args: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "quick": quick,
        "time_start": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
        "machine": machine(),
    }


def write_result(path: Path, doc: dict[str, Any]) -> Path:
    doc["time_end"] = datetime.now(UTC).isoformat(timespec="seconds")
    doc["machine"]["loadavg_end_1_5_15"] = loadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def error_stats(pred: npt.ArrayLike, meas: npt.ArrayLike) -> dict[str, float]:
    """Relative errors |pred - meas| / meas: mean, p95 (numpy linear), max, points."""
    p = np.asarray(pred, dtype=np.float64)
    m = np.asarray(meas, dtype=np.float64)
    rel = np.abs(p - m) / m
    return {
        "points": float(rel.size),
        "mean_rel": float(rel.mean()),
        "p95_rel": float(np.percentile(rel, 95.0)),
        "max_rel": float(rel.max()),
    }


def pyplot() -> Any | None:
    """matplotlib.pyplot with the file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ---------------------------------------------------------------- samples


def sample_to_dict(s: Sample) -> dict[str, Any]:
    return {
        "p": s.prompt_tokens,
        "o": s.output_tokens,
        "prefill_ns": s.prefill_ns,
        "decode_ns": list(s.decode_ns),
        "total_ns": s.total_ns,
        "batch": s.batch_size,
        "start_time": s.start_time.isoformat() if s.start_time else None,
        "rpc_ns": s.rpc_ns,
        "heldout": s.heldout,
        "repeat": s.repeat,
        "flag": s.flag.value,
        "foreign_cpu_s": s.contention.foreign_cpu_s,
    }


def sample_from_dict(d: Mapping[str, Any]) -> Sample:
    start = d.get("start_time")
    return Sample(
        prompt_tokens=int(d["p"]),
        output_tokens=int(d["o"]),
        prefill_ns=int(d["prefill_ns"]),
        decode_ns=tuple(int(x) for x in d["decode_ns"]),
        total_ns=int(d["total_ns"]),
        batch_size=int(d.get("batch", 1)),
        start_time=datetime.fromisoformat(start) if start else None,
        rpc_ns=int(d.get("rpc_ns", 0)),
        heldout=bool(d.get("heldout", False)),
        repeat=int(d.get("repeat", 0)),
        flag=SampleFlag(d.get("flag", "ok")),
        contention=ContentionObservation(foreign_cpu_s=float(d.get("foreign_cpu_s", 0.0))),
    )


def save_samples(path: Path, samples: Sequence[Sample], meta: Mapping[str, Any]) -> None:
    doc = {"meta": dict(meta), "samples": [sample_to_dict(s) for s in samples]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, default=_json_default) + "\n")


def load_samples(path: Path) -> tuple[list[Sample], dict[str, Any]]:
    doc = json.loads(path.read_text())
    return [sample_from_dict(d) for d in doc["samples"]], dict(doc.get("meta", {}))


def flag_counts(samples: Sequence[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        out[s.flag.value] = out.get(s.flag.value, 0) + 1
    return out


def device_seconds(samples: Sequence[Sample]) -> float:
    """Sum of server-side total_ns of every sample (warm-ups and re-measurements too)."""
    return sum(s.total_ns for s in samples) * 1e-9


# ---------------------------------------------------------------- profiling


@dataclasses.dataclass
class ProfileRun:
    profile: Profile
    samples: list[Sample]
    wall_s: float


def profile_in_process(
    registry: Any,
    model: ModelRef,
    stack: StackSpec,
    plan: ProfilePlan,
    *,
    contention: bool = True,
) -> ProfileRun:
    """One profile through the real runner (`run_profile`) against `registry` in this
    process, with an in-memory store and a private lease directory. Contention detection
    and re-measurement follow the default policy unless `contention` is False; the CPU
    monitor watches the stack's `cores`."""
    from idealrt.services.profiler.contention import ContentionPolicy
    from idealrt.services.profiler.runner import RunnerOptions, run_profile
    from idealrt.services.profiler.serving_target import ServingTarget
    from idealrt.services.store.repository import open_store

    store = open_store("sqlite://")
    try:
        profile = store.create_profile(Profile(id="", model=model, stack=stack, plan=plan))[0]
        with tempfile.TemporaryDirectory(prefix="idealrt-bench-lease-") as lease:
            options = RunnerOptions(
                lease_dir=Path(lease), contention=ContentionPolicy(enabled=contention)
            )
            t0 = time.perf_counter()
            final = run_profile(
                profile,
                ServingTarget.in_process(registry, profile),
                store,
                cancel=threading.Event(),
                on_progress=lambda p: None,
                options=options,
            )
            wall = time.perf_counter() - t0
        return ProfileRun(final, store.all_samples(profile.id), wall)
    finally:
        store.close()


def quiet_logs() -> None:
    from idealrt.core.logging import configure_logging

    configure_logging("warning", json=False)


# ---------------------------------------------------------------- workloads


def workload(
    n: int, seed: int, p_range: tuple[int, int], o_range: tuple[int, int]
) -> tuple[IntArray, IntArray]:
    """A benchmark-suite-like query mix: prompt lengths log-uniform in p_range, output
    lengths uniform in o_range (both inclusive), seeded."""
    rng = np.random.default_rng(seed)
    lo, hi = np.log(p_range[0]), np.log(p_range[1] + 1)
    p = np.floor(np.exp(rng.uniform(lo, hi, size=n))).astype(np.int64)
    p = np.clip(p, p_range[0], p_range[1])
    o = rng.integers(o_range[0], o_range[1] + 1, size=n, dtype=np.int64)
    return p, o
