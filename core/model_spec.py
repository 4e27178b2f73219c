"""Architecture of an autoregressive decoder: the shape that determines its runtime.

Derived quantities (parameter count, weight bytes, FLOPs, KV-cache bytes) are defined here
once; every service (serving's memory checks, metrics' roofline, the catalog) uses them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json

from idealrt.core.errors import InvalidArgument

__all__ = [
    "Activation",
    "DTYPE_BYTES",
    "ModelSpec",
    "Norm",
    "Positional",
    "dtype_bytes",
]


class Norm(enum.StrEnum):
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class Activation(enum.StrEnum):
    GELU = "gelu"  # tanh approximation (GPT-2 "gelu_new", GPT-J/NeoX)
    GELU_EXACT = "gelu_exact"
    RELU = "relu"
    SWIGLU = "swiglu"  # gated SiLU MLP (Llama, Mistral): three d_model x d_ff matrices


class Positional(enum.StrEnum):
    LEARNED = "learned"  # GPT-2: absolute learned position embeddings
    LEARNED_OFFSET = "learned_offset"  # OPT: learned, indices offset by 2
    ROTARY = "rotary"  # GPT-J / NeoX / Llama / Mistral
    ALIBI = "alibi"  # BLOOM


DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise InvalidArgument(
            "DTYPE_INVALID",
            f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}",
            field="dtype",
        ) from None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer. Weights are not part of the spec.

    kv_heads == heads is multi-head attention; 1 is multi-query; in between is GQA.
    rotary_pct is the fraction of each head's dims that are rotated (GPT-J 0.25 of 256 = 64).
    """

    name: str
    layers: int
    d_model: int
    heads: int
    d_ff: int
    vocab: int
    max_positions: int
    kv_heads: int = 0  # 0 means == heads
    norm: Norm = Norm.LAYERNORM
    activation: Activation = Activation.GELU
    positional: Positional = Positional.LEARNED
    tied_embeddings: bool = True
    parallel_attention: bool = False
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    bias: bool = True  # linear-layer biases (GPT-2/OPT/BLOOM yes, Llama no)
    norm_eps: float = 1e-5
    family: str = "gpt2"  # gpt2 | gptj | gpt_neox | opt | llama | mistral | bloom

    # ---- derived quantities: implemented in idealrt.core.model_spec (see below) ----
