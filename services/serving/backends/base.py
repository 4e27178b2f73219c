"""The backend protocol and the checks every backend shares. Its result types
(`MemoryReport`, `GenerationResult`) are the serving contract, in
`idealrt.core.serving_contract`.

A backend loads one model on one stack and runs exact-length greedy generations, timing
them itself (`idealrt.services.serving.timing`). Contract:
- `load` checks that weights + the KV cache at max_context fit in the device's free memory
  *before* allocating (`check_memory`; ResourceExhausted MODEL_TOO_LARGE otherwise), and
  refuses a device it does not have (FailedPrecondition DEVICE_UNAVAILABLE).
- `generate` feeds exactly len(prompt_ids) tokens (the same prompt in every batch row) and
  produces exactly `output_tokens` tokens per row by greedy argmax, EOS ignored. It returns
  a `GenerationResult`, which cannot be constructed with counts that disagree.
- Torch is imported inside the helpers that need it, so ONNX/TensorRT backends can use
  this module without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from idealrt.core.domain import StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from idealrt.core.model_spec import ModelSpec
from idealrt.core.reasons import OPTION_INVALID
from idealrt.core.serving_contract import GenerationResult, MemoryReport
from idealrt.services.serving.reasons import (
    DEVICE_INVALID,
    DEVICE_UNAVAILABLE,
    MODEL_TOO_LARGE,
    OPTION_UNKNOWN,
)
from idealrt.services.serving.timing import StepClock

__all__ = [
    "Backend",
    "BackendFactory",
    "check_memory",
    "check_options",
    "choice_option",
    "clock_result",
    "device_memory",
    "resolve_device",
]


class Backend(Protocol):
    """One model on one stack. Not thread-safe: the registry serialises calls per model."""

    name: str

    def load(
        self, spec: ModelSpec, stack: StackSpec, weights_path: str, seed: int, max_context: int
    ) -> MemoryReport: ...

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult: ...

    def unload(self) -> None: ...


BackendFactory = Callable[[], Backend]
"""Makes a fresh, unloaded backend."""


# Options every backend accepts; the registry acts on them (cores: pin the process).
COMMON_OPTIONS = ("cores",)


def check_options(stack: StackSpec, known: Sequence[str]) -> None:
    """InvalidArgument(OPTION_UNKNOWN, field stack.options) for options a backend lacks."""
    unknown = sorted(set(stack.options) - set(known) - set(COMMON_OPTIONS))
    if unknown:
        raise InvalidArgument(
            OPTION_UNKNOWN,
            f"unknown option(s) {unknown} for backend {stack.backend}; "
            f"known: {', '.join(known) or 'none'}",
            field="stack.options",
        )


def choice_option(stack: StackSpec, key: str, choices: Sequence[str]) -> str:
    """Option `key` of the stack, lower-cased (choices[0] when absent or blank);
    InvalidArgument OPTION_INVALID naming the choices when it is none of them."""
    value = stack.options.get(key, "").strip().lower() or choices[0]
    if value not in choices:
        raise InvalidArgument(
            OPTION_INVALID,
            f"option {key} must be one of {', '.join(choices)}, got {value!r}",
            field="stack.options",
        )
    return value


def resolve_device(device: str) -> Any:
    """The torch.device of a stack device ("cpu", "cuda", "cuda:1"), or
    FailedPrecondition(DEVICE_UNAVAILABLE) when this machine lacks it (not retryable:
    asking again will not grow a GPU)."""
    import torch

    try:
        dev = torch.device(device or "cpu")
    except RuntimeError:
        raise InvalidArgument(
            DEVICE_INVALID, f"stack.device {device!r} is not a device name", field="stack.device"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise FailedPrecondition(DEVICE_UNAVAILABLE, f"device type {dev.type!r} is not supported")
    if not torch.cuda.is_available():
        raise FailedPrecondition(
            DEVICE_UNAVAILABLE, f"device {device!r} requested but CUDA is unavailable"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise FailedPrecondition(
            DEVICE_UNAVAILABLE,
            f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present",
        )
    return torch.device("cuda", index)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def device_memory(device: Any) -> tuple[int, int]:
    """(total, free) bytes: CUDA from cudaMemGetInfo; CPU from /proc/meminfo (MemTotal,
    MemAvailable), or from sysconf where /proc is absent."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    try:
        info = _meminfo()
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        import os

        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(
    device: Any, weights_bytes: int, kv_cache_bytes: int, what: str
) -> tuple[int, int]:
    """Refuse (ResourceExhausted MODEL_TOO_LARGE) unless weights + KV cache fit in the
    device's free memory; returns (total, free) as read."""
    total, free = device_memory(device)
    need = weights_bytes + kv_cache_bytes
    if need > free:
        gib = 1024**3
        raise ResourceExhausted(
            MODEL_TOO_LARGE,
            f"{what} needs {need / gib:.2f} GiB ({weights_bytes} B weights + {kv_cache_bytes} B "
            f"KV cache) but {device} has {free / gib:.2f} GiB free of {total / gib:.2f} GiB",
        )
    return total, free


def clock_result(
    clock: StepClock,
    prompt_tokens: int,
    output_ids: Sequence[int],
    start_time: datetime,
    batch_size: int,
) -> GenerationResult:
    """The GenerationResult of a finished generation timed by `clock` (one shape for every
    backend; GenerationResult itself refuses counts that differ)."""
    prefill, decode, total = clock.intervals()
    return GenerationResult(
        prompt_tokens=prompt_tokens,
        output_tokens=clock.tokens,
        output_ids=tuple(output_ids),
        prefill_ns=prefill,
        decode_ns=decode,
        total_ns=total,
        start_time=start_time,
        batch_size=batch_size,
    )
