"""The backend protocol, its result types, and the checks every backend shares.

A backend loads one model on one stack and runs exact-length greedy generations, timing
them itself (`idealrt.services.serving.timing`). Contract:
- `load` checks that weights + the KV cache at max_context fit in the device's free memory
  *before* allocating (`check_memory`; ResourceExhausted MODEL_TOO_LARGE otherwise), and
  refuses a device it does not have (Unavailable DEVICE_UNAVAILABLE).
- `generate` feeds exactly len(prompt_ids) tokens (the same prompt in every batch row) and
  produces exactly `output_tokens` tokens per row by greedy argmax, EOS ignored. It returns
  a `GenerationResult`, which cannot be constructed with counts that disagree.
- Torch is imported inside the helpers that need it, so ONNX/TensorRT backends can use
  this module without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from idealrt.core.domain import StackSpec
from idealrt.core.errors import Internal, InvalidArgument, ResourceExhausted, Unavailable
from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving.timing import StepClock

__all__ = [
    "Backend",
    "BackendFactory",
    "GenerationResult",
    "MemoryReport",
    "check_memory",
    "check_options",
    "choice_option",
    "clock_result",
    "device_memory",
    "resolve_device",
    "resolve_max_context",
]


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes after a load: what the model holds, and the device's total and free memory."""

    weights_bytes: int
    kv_cache_bytes: int
    device_total_bytes: int
    device_free_bytes: int
    # Options the backend settled where the stack left the choice to it (e.g. pytorch's
    # gemv=auto -> native or aten); the registry records them in the loaded model's stack.
    resolved_options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One exact-length generation, timed inside the backend.

    output_ids: the tokens of the first batch row (every row has the same prompt).
    prefill_ns: request start -> first output token; decode_ns[i]: end of token i+1 -> end
    of token i+2 (output_tokens - 1 entries); total_ns = prefill_ns + sum(decode_ns).
    Construction raises Internal(NONCONFORMING_GENERATION) when the counts disagree.
    """

    prompt_tokens: int
    output_tokens: int
    output_ids: tuple[int, ...]
    prefill_ns: int
    decode_ns: tuple[int, ...]
    total_ns: int
    start_time: datetime
    batch_size: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.prompt_tokens < 1:
            problems.append(f"prompt_tokens={self.prompt_tokens} < 1")
        if self.output_tokens < 1:
            problems.append(f"output_tokens={self.output_tokens} < 1")
        if len(self.output_ids) != self.output_tokens:
            problems.append(f"{len(self.output_ids)} output ids for {self.output_tokens} tokens")
        if len(self.decode_ns) != self.output_tokens - 1:
            problems.append(f"{len(self.decode_ns)} decode steps for {self.output_tokens} tokens")
        if self.total_ns != self.prefill_ns + sum(self.decode_ns):
            problems.append("total_ns != prefill_ns + sum(decode_ns)")
        if self.prefill_ns < 0 or any(d < 0 for d in self.decode_ns):
            problems.append("negative duration")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} < 1")
        if problems:
            raise Internal("NONCONFORMING_GENERATION", "invalid generation: " + "; ".join(problems))


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
            "OPTION_UNKNOWN",
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
            "OPTION_INVALID",
            f"option {key} must be one of {', '.join(choices)}, got {value!r}",
            field="stack.options",
        )
    return value


def resolve_max_context(spec: ModelSpec, max_context: int) -> int:
    """The context a backend allocates for: `max_context`, 0 meaning the model's positions;
    InvalidArgument(MAX_CONTEXT_INVALID, field max_context) outside 1..positions."""
    max_context = max_context or spec.max_positions
    if not 1 <= max_context <= spec.max_positions:
        raise InvalidArgument(
            "MAX_CONTEXT_INVALID",
            f"max_context must be in 1..{spec.max_positions} (0 = that), got {max_context}",
            field="max_context",
        )
    return max_context


def resolve_device(device: str) -> Any:
    """The torch.device of a stack device ("cpu", "cuda", "cuda:1"), or
    Unavailable(DEVICE_UNAVAILABLE) when this machine lacks it."""
    import torch

    try:
        dev = torch.device(device or "cpu")
    except RuntimeError:
        raise InvalidArgument(
            "DEVICE_INVALID", f"stack.device {device!r} is not a device name", field="stack.device"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise Unavailable("DEVICE_UNAVAILABLE", f"device type {dev.type!r} is not supported")
    if not torch.cuda.is_available():
        raise Unavailable(
            "DEVICE_UNAVAILABLE", f"device {device!r} requested but CUDA is unavailable"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise Unavailable(
            "DEVICE_UNAVAILABLE",
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
            "MODEL_TOO_LARGE",
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
