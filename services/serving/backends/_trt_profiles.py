"""Pure helpers of the tensorrt backend (no TensorRT, no GPU): the optimization profile of
the exported decoder step, the tensor dtypes the engine must have, shape checks, and the
engine cache key.

One profile covers both phases of a generation:
    input_ids            [B, T]                 T in 1..max_prompt (prefill) and 1 (decode)
    past_k_i, past_v_i   [B, kv, S, hd]         one per layer i; S in 1..max_context
    B in 1..batch; the optimum is the decode shape (B=batch, T=1, S=max_context/2), where
    a generation spends its time.
S starts at 1, not 0: the prefill binds one masked past slot (position 0 masks every past
key) instead of an empty tensor, so the engine never depends on zero-size inputs.
`position` is 0-d and static, so it is not part of the profile.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import ModelSpec, resolve_max_context
from idealrt.core.reasons import OPTION_INVALID
from idealrt.services.serving.decoder.export import OUTPUT_NAMES, past_names

__all__ = [
    "Dims",
    "Profile",
    "dynamic_inputs",
    "engine_key",
    "expected_dtypes",
    "profile_shapes",
    "shape_problem",
]

Dims = tuple[int, ...]
Profile = dict[str, tuple[Dims, Dims, Dims]]
_FLOAT = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}


def dynamic_inputs(layers: int) -> tuple[str, ...]:
    """The step's inputs with dynamic axes (all but the 0-d `position`)."""
    keys, values = past_names(layers)
    return ("input_ids", *keys, *values)


def profile_shapes(spec: ModelSpec, *, max_prompt: int, max_context: int, batch: int) -> Profile:
    """name -> (min, opt, max) shapes of every dynamic input of the step graph
    (max_context as `resolve_max_context` reads it: 0 is the model's positions)."""
    max_context = resolve_max_context(spec, max_context)
    if not 1 <= max_prompt <= max_context:
        raise InvalidArgument(
            OPTION_INVALID,
            f"option max_prompt must be in 1..max_context ({max_context}), got {max_prompt}",
            field="stack.options",
        )
    if batch < 1:
        raise InvalidArgument(
            OPTION_INVALID, f"option max_batch must be >= 1, got {batch}", field="stack.options"
        )
    layers, kv, hd = spec.layers, spec.kv_heads_effective, spec.head_dim
    s_opt = max(1, max_context // 2)
    past = ((1, kv, 1, hd), (batch, kv, s_opt, hd), (batch, kv, max_context, hd))
    profile: Profile = {"input_ids": ((1, 1), (batch, 1), (batch, max_prompt))}
    for name in dynamic_inputs(layers)[1:]:
        profile[name] = past
    return profile


def shape_problem(profile: Mapping[str, tuple[Dims, Dims, Dims]], name: str, shape: Dims) -> str:
    """ "" when `shape` lies within the profile's [min, max] for `name`, else what is wrong."""
    lo, _, hi = profile[name]
    if len(shape) != len(lo):
        return f"{name} has rank {len(shape)}, the engine wants {len(lo)}"
    for axis, (a, x, b) in enumerate(zip(lo, shape, hi, strict=True)):
        if not a <= x <= b:
            return f"{name} axis {axis} is {x}, the engine was built for {a}..{b}"
    return ""


def expected_dtypes(dtype: str, layers: int) -> dict[str, str]:
    """`trt.DataType` member names every IO tensor of a strongly typed engine of the graph
    of a `layers`-layer decoder exported in `dtype` must have (its keys: every IO name)."""
    f = _FLOAT[dtype]
    floats = (*dynamic_inputs(layers)[1:], *OUTPUT_NAMES)
    return {"input_ids": "INT64", "position": "INT64", **dict.fromkeys(floats, f)}


def engine_key(
    onnx_digest: str,
    *,
    trt_version: str,
    device_name: str,
    capability: tuple[int, int],
    dtype: str,
    profile: Profile,
    workspace_bytes: int,
) -> str:
    """sha256 over everything an engine depends on: the graph (its ONNX cache key), the
    TensorRT version, the GPU (name and compute capability: engines are not portable), the
    precision, the profile and the workspace limit."""
    blob = json.dumps(
        {
            "onnx": onnx_digest,
            "tensorrt": trt_version,
            "device": device_name,
            "capability": list(capability),
            "dtype": dtype,
            "profile": {k: [list(d) for d in v] for k, v in sorted(profile.items())},
            "workspace": workspace_bytes,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
