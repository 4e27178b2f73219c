"""What one serving request may ask for, checked before any work is done on it.

Every check here is arithmetic over the request and the server's `ServingLimits` (built
from `ServingConfig` in `server.build_server` and handed to the `ModelRegistry`): nothing is
built, allocated, imported or read from disk first, so a hostile value costs the server no
more than a refusal. The backends repeat the checks they depend on (they are usable on
their own), but the registry runs these first, so every field gets its own name in the
error and no value reaches a native library (libgomp, ONNX Runtime's thread pool, a CUDA
allocation) outside the range it can take.

- Stack options: every numeric option is a plain decimal integer (ASCII digits) in its
  range: `threads` in 1..max_threads (ServingConfig.max_threads, 0 there meaning the CPUs
  this process may run on); `kv_bucket` in 1..the model's positions; `max_prompt` in
  1..max_context; `max_batch` in 1..MAX_BATCH_SIZE; `workspace_mib` in 1..MAX_OPTION_INT
  (the device's memory is the backend's check). `cores` names CPUs of the set this
  process was allowed to run on when the server started (a cpulist such as "0-3,6").
- Models: text fields have a bounded length; a spec has at most `max_layers` layers (the
  decoder is built one module per layer, before any memory check could refuse it).
- Queues: at most max_queued_generations calls wait per model (`device_queue`).
- Generations: batch_size in 1..MAX_BATCH_SIZE, output_tokens >= 1, the prompt length
  (synthetic or the ids given) in 1..max_prompt_tokens, and prompt + output within the
  model's max_context, all before the prompt is drawn.
"""

from __future__ import annotations

import dataclasses
import re

from idealrt.core.affinity import parse_cores
from idealrt.core.config import ServingConfig
from idealrt.core.domain import ModelRef, StackSpec
from idealrt.core.errors import InvalidArgument, invalid
from idealrt.core.fingerprint import current_affinity, format_cores
from idealrt.core.model_spec import ModelSpec, check_fits_context
from idealrt.core.reasons import (
    CPU_CORES_INVALID,
    MODEL_SPEC_INVALID,
    OPTION_INVALID,
    OUTPUT_TOKENS_INVALID,
)
from idealrt.services.serving.device_queue import DEFAULT_MAX_QUEUED
from idealrt.services.serving.reasons import (
    BATCH_SIZE_INVALID,
    PROMPT_EMPTY,
    PROMPT_LENGTH_MISMATCH,
    PROMPT_TOO_LONG,
    VALUE_TOO_LONG,
)

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_LAYERS",
    "MAX_NAME_CHARS",
    "MAX_OPTION_INT",
    "MAX_PATH_CHARS",
    "ServingLimits",
    "check_generation_request",
    "check_model_ref",
    "check_spec_size",
    "check_stack_options",
    "check_stack_sizes",
    "shown",
]

MAX_BATCH_SIZE = 64
# Limits that are not (yet) ServingConfig settings: the decoder builds one module per layer
# (~0.3 ms and tens of KiB of Python objects each) before the memory check can refuse it;
# the largest published decoders have ~130 layers.
MAX_LAYERS = 1024
MAX_NAME_CHARS = 256  # model.name, stack.device
MAX_PATH_CHARS = 4096  # model.weights_path (Linux PATH_MAX)
MAX_OPTION_INT = (1 << 31) - 1  # every integer option fits the C int of the libraries
_MAX_CORES_CHARS = 1024
_DIGITS = re.compile(r"[0-9]+")


def shown(value: str, limit: int = 64) -> str:
    """`value` for an error message: repr'd, cut to `limit` characters (a message echoing a
    megabyte of input would not fit in the status trailer)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """The ranges requests are held to. `cpus`: the CPUs the process may run on, read
    once when the server starts (pinning a model to `cores` narrows the live affinity, and
    must not narrow what the next load may ask for)."""

    max_threads: int
    max_prompt_tokens: int
    cpus: frozenset[int]
    max_layers: int = MAX_LAYERS
    # calls that may wait per model for its device (`device_queue`); one more is
    # ResourceExhausted GENERATION_QUEUE_FULL
    max_queued_generations: int = DEFAULT_MAX_QUEUED

    def __post_init__(self) -> None:
        if self.max_queued_generations < 1:
            raise ValueError(
                f"max_queued_generations must be >= 1, got {self.max_queued_generations}"
            )

    @classmethod
    def from_config(cls, cfg: ServingConfig, cpus: frozenset[int] | None = None) -> ServingLimits:
        allowed = current_affinity() if cpus is None else cpus
        return cls(
            max_threads=cfg.max_threads or len(allowed),
            max_prompt_tokens=cfg.max_prompt_tokens,
            cpus=allowed,
            max_queued_generations=cfg.max_queued_generations,
        )


# ---- models ----
def _check_chars(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise invalid(
            field, VALUE_TOO_LONG, f"{field} must be at most {limit} characters, got {len(value)}"
        )


def check_model_ref(model: ModelRef, stack: StackSpec) -> None:
    """Lengths of the text fields of a LoadModel request."""
    _check_chars("model.name", model.name, MAX_NAME_CHARS)
    _check_chars("model.weights_path", model.weights_path, MAX_PATH_CHARS)
    _check_chars("stack.device", stack.device, MAX_NAME_CHARS)


def check_spec_size(spec: ModelSpec, limits: ServingLimits) -> None:
    """InvalidArgument(MODEL_SPEC_INVALID, model.spec.layers) beyond `max_layers`."""
    if spec.layers > limits.max_layers:
        raise invalid(
            "model.spec.layers",
            MODEL_SPEC_INVALID,
            f"model.spec.layers must be in 1..{limits.max_layers} to be served, got {spec.layers}",
        )


# ---- stack options ----
def _int_option(stack: StackSpec, key: str, hi: int, what: str = "") -> int | None:
    """Option `key` as an integer in 1..hi (None when absent or blank);
    InvalidArgument(OPTION_INVALID, stack.options.<key>) otherwise."""
    raw = stack.options.get(key, "").strip()
    if not raw:
        return None
    field = f"stack.options.{key}"
    allowed = f"1..{hi}" + (f" ({what})" if what else "")
    if not _DIGITS.fullmatch(raw) or len(raw) > len(str(hi)) or not 1 <= int(raw) <= hi:
        raise invalid(
            field, OPTION_INVALID, f"{field} must be an integer in {allowed}, got {shown(raw)}"
        )
    return int(raw)


def _cores_option(stack: StackSpec, cpus: frozenset[int]) -> frozenset[int] | None:
    raw = stack.options.get("cores", "").strip()
    if not raw:
        return None
    field = "stack.options.cores"
    allowed = format_cores(cpus)
    if len(raw) > _MAX_CORES_CHARS or any(
        len(n) > len(str(max(cpus))) or int(n) not in cpus for n in _DIGITS.findall(raw)
    ):
        # before parse_cores: it expands ranges, and "0-999999999999" would not end
        raise invalid(
            field,
            CPU_CORES_INVALID,
            f"{field} must name CPUs this process may run on ({allowed}), got {shown(raw)}",
        )
    try:
        cores = parse_cores(raw)
    except InvalidArgument as err:
        raise invalid(field, err.reason, err.message) from None
    if not cores <= cpus:
        raise invalid(
            field,
            CPU_CORES_INVALID,
            f"{field} must name CPUs this process may run on ({allowed}), got {shown(raw)}",
        )
    return cores


def check_stack_options(stack: StackSpec, limits: ServingLimits) -> frozenset[int] | None:
    """The checks that need no model: `threads` and `cores`. Returns the cores to pin
    to (None: no pinning asked)."""
    _int_option(
        stack, "threads", limits.max_threads, "ServingConfig.max_threads, or this process' CPUs"
    )
    return _cores_option(stack, limits.cpus)


def check_stack_sizes(stack: StackSpec, spec: ModelSpec, max_context: int) -> None:
    """The integer options sized by the model: kv_bucket, max_prompt, max_batch,
    workspace_mib (whichever the stack sets; whether its backend knows them is the
    backend's check)."""
    _int_option(stack, "kv_bucket", spec.max_positions, "the model's positions")
    _int_option(stack, "max_prompt", max_context, "max_context")
    _int_option(stack, "max_batch", MAX_BATCH_SIZE)
    _int_option(stack, "workspace_mib", MAX_OPTION_INT)


# ---- generations ----
def check_generation_request(
    *,
    prompt_ids_given: bool,
    n_ids: int,
    prompt_length: int,
    output_tokens: int,
    batch_size: int,
    max_context: int,
    limits: ServingLimits,
) -> int:
    """The prompt length the generation will have, after checking every size of it
    against the limits and the model's max_context (before the prompt is built)."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise invalid(
            "batch_size",
            BATCH_SIZE_INVALID,
            f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {batch_size}",
        )
    if output_tokens < 1:
        raise invalid(
            "output_tokens",
            OUTPUT_TOKENS_INVALID,
            f"output_tokens must be >= 1, got {output_tokens}",
        )
    if prompt_ids_given:
        if prompt_length and prompt_length != n_ids:
            raise invalid(
                "prompt.length",
                PROMPT_LENGTH_MISMATCH,
                f"prompt.length {prompt_length} != {n_ids} token ids given",
            )
        p, field = n_ids, "prompt.token_ids"
    else:
        p, field = prompt_length, "prompt.length"
    if p < 1:
        raise invalid("prompt.length", PROMPT_EMPTY, f"prompt.length must be >= 1, got {p}")
    if p > limits.max_prompt_tokens:
        raise invalid(
            field,
            PROMPT_TOO_LONG,
            f"{field}: a prompt must be 1..{limits.max_prompt_tokens} tokens "
            f"(ServingConfig.max_prompt_tokens), got {p}",
        )
    # the prompt alone leaves no room for an output token: the prompt is what is wrong
    check_fits_context(
        p, output_tokens, max_context, field if p >= max_context else "output_tokens"
    )
    return p
