"""Architecture of an autoregressive decoder: the shape that determines its runtime.

Derived quantities (parameter count, weight bytes, FLOPs, KV-cache bytes) are defined here
once; every service (serving's memory checks, metrics' roofline, the catalog) uses them.

Conventions (used by every method below):
- A multiply-add is 2 FLOPs. A matmul of an (n x k) by a (k x m) matrix is 2*n*k*m FLOPs.
- "Matmul parameters" are the weights of the linear layers that every token multiplies:
  attention q/k/v/o and MLP matrices in every layer, plus the LM head (vocab x d_model),
  counted even when it is tied to the input embedding. Embedding lookups, norms, biases,
  activations, softmax and rotary/ALiBi arithmetic are not counted as FLOPs (they are
  O(d_model) per token, < 1% of the total for every catalog model).
- Attention is causal and only the unmasked entries are counted: a query that sees k keys
  costs 2*d_model*k FLOPs for the scores (QK^T) and the same for the weighted sum of values
  (AV), per layer. GQA/MQA shrink the KV cache, not these FLOPs. With a sliding window w a
  query sees at most w keys.
- Context length c of a decode step = the number of positions the new token attends to,
  itself included (the cost model's beta(p + i)).

The context a model is loaded for (`max_context`) is checked here too, once for every
service: `check_max_context` (>= 0), `resolve_max_context` (0 -> the model's positions,
at most those) and `check_fits_context` (a prompt plus its output fit in it).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from idealrt.core.errors import InvalidArgument
from idealrt.core.reasons import (
    CONTEXT_EXCEEDED,
    DTYPE_INVALID,
    MAX_CONTEXT_INVALID,
    MODEL_SPEC_INVALID,
)

__all__ = [
    "DTYPE_BYTES",
    "FAMILIES",
    "Activation",
    "ModelSpec",
    "Norm",
    "Positional",
    "check_fits_context",
    "check_max_context",
    "dtype_bytes",
    "resolve_max_context",
]

REASON = MODEL_SPEC_INVALID  # of every spec error
FAMILIES: tuple[str, ...] = ("gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "bloom")


class Norm(enum.StrEnum):
    LAYERNORM = "layernorm"  # weight + bias
    RMSNORM = "rmsnorm"  # weight only


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
            DTYPE_INVALID,
            f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}",
            field="dtype",
        ) from None


def _invalid(name: str, message: str) -> InvalidArgument:
    return InvalidArgument(REASON, f"model.spec.{name} {message}", field=f"model.spec.{name}")


_POSITIVE_INTS = ("layers", "d_model", "heads", "d_ff", "vocab", "max_positions")
_BOOLS = ("tied_embeddings", "parallel_attention", "bias")
_OPTIONAL_BOOLS = ("attn_bias", "lm_head_bias", "embedding_norm", "shared_norm")
_ENUMS: dict[str, type[enum.StrEnum]] = {
    "norm": Norm,
    "activation": Activation,
    "positional": Positional,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer. Weights are not part of the spec.

    kv_heads == heads is multi-head attention; 1 is multi-query; in between is GQA.
    rotary_pct is the fraction of each head's dims that are rotated (GPT-J 0.25 of 256 = 64).

    The four optional booleans default to None, "what the family does", so that a spec that
    only carries the original fields (e.g. over an older protobuf) still counts exactly:
    - attn_bias: biases on q/k/v/o (None: same as `bias`, except GPT-J: none).
    - lm_head_bias: a vocab-sized bias on the LM head (None: GPT-J only).
    - embedding_norm: a norm right after the token embedding (None: BLOOM only).
    - shared_norm: one input norm feeds both attention and MLP, which needs
      parallel_attention (None: GPT-J only; GPT-NeoX is parallel with two norms).
    sliding_window: 0 = full attention; w > 0 = each query sees at most w keys and the KV
    cache holds at most w positions (Mistral-7B v0.1: 4096).
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
    attn_bias: bool | None = None
    lm_head_bias: bool | None = None
    embedding_norm: bool | None = None
    shared_norm: bool | None = None
    sliding_window: int = 0

    # ---- validation ----
    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise _invalid("name", f"must be a string, got {self.name!r}")
        for f in _POSITIVE_INTS:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _invalid(f, f"must be an integer >= 1, got {v!r}")
        for f in ("kv_heads", "sliding_window"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _invalid(f, f"must be an integer >= 0 (0 = default), got {v!r}")
        if self.d_model % self.heads:
            raise _invalid("heads", f"must divide d_model={self.d_model} exactly, got {self.heads}")
        if self.kv_heads and (self.kv_heads > self.heads or self.heads % self.kv_heads):
            raise _invalid(
                "kv_heads",
                f"must be 0 (= heads) or a divisor of heads={self.heads} in 1..{self.heads}, "
                f"got {self.kv_heads}",
            )
        for f, cls in _ENUMS.items():
            v = getattr(self, f)
            try:
                object.__setattr__(self, f, cls(v))
            except ValueError:
                allowed = ", ".join(m.value for m in cls)
                raise _invalid(f, f"must be one of {allowed}; got {v!r}") from None
        for f in _BOOLS:
            if not isinstance(getattr(self, f), bool):
                raise _invalid(f, f"must be true or false, got {getattr(self, f)!r}")
        for f in _OPTIONAL_BOOLS:
            v = getattr(self, f)
            if v is not None and not isinstance(v, bool):
                raise _invalid(f, f"must be true, false or null (family default), got {v!r}")
        for f, low_open in (("rotary_pct", 0.0), ("rotary_base", 0.0), ("norm_eps", 0.0)):
            v = getattr(self, f)
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > low_open:
                raise _invalid(f, f"must be a number > 0, got {v!r}")
            object.__setattr__(self, f, float(v))  # 1 and 1.0 hash the same
        if self.rotary_pct > 1.0:
            raise _invalid("rotary_pct", f"must be in (0, 1], got {self.rotary_pct}")
        if self.family not in FAMILIES:
            raise _invalid("family", f"must be one of {', '.join(FAMILIES)}; got {self.family!r}")
        if self.shared_norm_effective and not self.parallel_attention:
            raise _invalid("shared_norm", "requires parallel_attention (GPT-J style block)")

    # ---- derived shape ----
    @property
    def kv_heads_effective(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def ffn_gated(self) -> bool:
        """True for gated MLPs (SwiGLU): three d_model x d_ff matrices instead of two."""
        return self.activation == Activation.SWIGLU

    @property
    def attn_bias_effective(self) -> bool:
        if self.attn_bias is not None:
            return self.attn_bias
        return self.bias and self.family != "gptj"

    @property
    def lm_head_bias_effective(self) -> bool:
        return self.lm_head_bias if self.lm_head_bias is not None else self.family == "gptj"

    @property
    def embedding_norm_effective(self) -> bool:
        if self.embedding_norm is not None:
            return self.embedding_norm
        return self.family == "bloom"

    @property
    def shared_norm_effective(self) -> bool:
        return self.shared_norm if self.shared_norm is not None else self.family == "gptj"

    def _norm_params(self) -> int:
        return 2 * self.d_model if self.norm == Norm.LAYERNORM else self.d_model

    def _position_rows(self) -> int:
        if self.positional == Positional.LEARNED:
            return self.max_positions
        if self.positional == Positional.LEARNED_OFFSET:
            return self.max_positions + 2  # OPT reserves two rows (padding offset)
        return 0

    def _attn_weights(self) -> int:
        """q and o are d x d; k and v are d x (kv_heads * head_dim)."""
        kv_dim = self.kv_heads_effective * self.head_dim
        return 2 * self.d_model * self.d_model + 2 * self.d_model * kv_dim

    def _mlp_weights(self) -> int:
        return (3 if self.ffn_gated else 2) * self.d_model * self.d_ff

    # ---- parameters and bytes ----
    def param_breakdown(self) -> dict[str, int]:
        """Exact parameter count by component (tied weights counted once)."""
        d, kv_dim = self.d_model, self.kv_heads_effective * self.head_dim
        attn = self._attn_weights() + ((2 * d + 2 * kv_dim) if self.attn_bias_effective else 0)
        mlp_bias = (2 * self.d_ff + d if self.ffn_gated else self.d_ff + d) if self.bias else 0
        norms_per_layer = 1 if self.shared_norm_effective else 2
        head = 0 if self.tied_embeddings else self.vocab * d
        if self.lm_head_bias_effective:
            head += self.vocab
        return {
            "embedding": self.vocab * d,
            "positions": self._position_rows() * d,
            "embedding_norm": self._norm_params() if self.embedding_norm_effective else 0,
            "attention": self.layers * attn,
            "mlp": self.layers * (self._mlp_weights() + mlp_bias),
            "layer_norms": self.layers * norms_per_layer * self._norm_params(),
            "final_norm": self._norm_params(),
            "lm_head": head,
        }

    def param_count(self) -> int:
        """All parameters, as `sum(p.numel() for p in model.parameters())` counts them."""
        return sum(self.param_breakdown().values())

    def matmul_params(self) -> int:
        """Weights multiplied by every token: layers' attention + MLP matrices + LM head."""
        return (
            self.layers * (self._attn_weights() + self._mlp_weights()) + self.vocab * self.d_model
        )

    def weight_bytes(self, dtype: str) -> int:
        return self.param_count() * dtype_bytes(dtype)

    def kv_cache_bytes_per_token(self, dtype: str) -> int:
        """K and V of one position in every layer: 2 * layers * kv_heads * head_dim values."""
        return 2 * self.layers * self.kv_heads_effective * self.head_dim * dtype_bytes(dtype)

    def _cached_positions(self, tokens: int) -> int:
        if tokens < 0:
            raise InvalidArgument(REASON, f"tokens must be >= 0, got {tokens}", field="tokens")
        return min(tokens, self.sliding_window) if self.sliding_window else tokens

    def kv_cache_bytes(self, tokens: int, dtype: str, batch: int = 1) -> int:
        """KV cache for `tokens` positions of `batch` sequences (capped by sliding_window)."""
        if batch < 1:
            raise InvalidArgument(REASON, f"batch must be >= 1, got {batch}", field="batch")
        return batch * self._cached_positions(tokens) * self.kv_cache_bytes_per_token(dtype)

    # ---- FLOPs and bytes moved (see the module docstring for the conventions) ----
    def _attended_keys(self, p: int) -> int:
        """Sum over query positions 1..p of the keys each sees (causal, sliding window)."""
        w = self.sliding_window
        if not w or w >= p:
            return p * (p + 1) // 2
        return w * (w + 1) // 2 + (p - w) * w

    def prefill_flops(self, p: int, *, last_logits_only: bool = False) -> float:
        """Forward pass over a p-token prompt at batch 1:
        2 * matmul_params * p + 4 * layers * d_model * sum_{i=1..p} min(i, window).

        By default the LM head runs on all p positions (as HF/Megatron forwards do); with
        last_logits_only=True only on the last one (all that generation needs).
        """
        if p < 1:
            raise InvalidArgument(REASON, f"prompt tokens must be >= 1, got {p}", field="p")
        linear = 2 * self.matmul_params() * p
        if last_logits_only:
            linear -= 2 * self.vocab * self.d_model * (p - 1)
        return float(linear + 4 * self.layers * self.d_model * self._attended_keys(p))

    def decode_flops(self, c: int) -> float:
        """One decode step (one token, batch 1) attending to c positions:
        2 * matmul_params + 4 * layers * d_model * min(c, window)."""
        if c < 1:
            raise InvalidArgument(REASON, f"context must be >= 1, got {c}", field="c")
        return float(
            2 * self.matmul_params() + 4 * self.layers * self.d_model * self._cached_positions(c)
        )

    def decode_bytes(self, c: int, dtype: str) -> float:
        """Minimum bytes one decode step (batch 1) reads at context c: every weight except
        the input embedding and position tables, of which only one row each is read (a
        tied table is read in full, as the LM head), plus the KV cache of c positions."""
        if c < 1:
            raise InvalidArgument(REASON, f"context must be >= 1, got {c}", field="c")
        b = self.param_breakdown()
        params = self.param_count() - b["positions"] + (self.d_model if b["positions"] else 0)
        if not self.tied_embeddings:
            params -= b["embedding"] - self.d_model
        return float(params * dtype_bytes(dtype) + self.kv_cache_bytes(c, dtype))

    # ---- identity and serialization ----
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (enums as their string values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Inverse of to_dict; missing optional fields take their defaults."""
        if not isinstance(d, Mapping):
            raise InvalidArgument(REASON, "model.spec must be an object", field="model.spec")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise _invalid(str(key), f"is not a field; known fields: {', '.join(known)}")
        for name, f in known.items():
            if name not in d and f.default is dataclasses.MISSING:
                raise _invalid(name, "is required")
        return cls(**dict(d))

    def spec_hash(self) -> str:
        """16 hex chars of sha256 over the canonical JSON of the *shape*: `name` is left out
        and family defaults are resolved, so equal shapes hash equal whatever they are called.
        """
        d = self.to_dict()
        del d["name"]
        d["attn_bias"] = self.attn_bias_effective
        d["lm_head_bias"] = self.lm_head_bias_effective
        d["embedding_norm"] = self.embedding_norm_effective
        d["shared_norm"] = self.shared_norm_effective
        d["kv_heads"] = self.kv_heads_effective
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def check_max_context(requested: int, field: str = "max_context") -> int:
    """`requested` when it is >= 0 tokens; InvalidArgument(MAX_CONTEXT_INVALID, `field`)
    otherwise. The check that needs no model (whether 0 means the model's positions is the
    caller's convention)."""
    if requested < 0:
        raise InvalidArgument(
            MAX_CONTEXT_INVALID,
            f"{field} must be >= 0 tokens, got {requested}",
            field=field,
        )
    return requested


def resolve_max_context(spec: ModelSpec, requested: int, field: str = "max_context") -> int:
    """The context to allocate for: `requested`, 0 meaning the model's max_positions;
    InvalidArgument(MAX_CONTEXT_INVALID, `field`) below 0 or above those positions."""
    check_max_context(requested, field)
    positions = spec.max_positions
    if requested > positions:
        raise InvalidArgument(
            MAX_CONTEXT_INVALID,
            f"{field} must be in 0..{positions} (0 = the model's {positions} positions), "
            f"got {requested}",
            field=field,
        )
    return requested or positions


def check_fits_context(
    prompt_tokens: int, output_tokens: int, max_context: int, field: str = "output_tokens"
) -> None:
    """InvalidArgument(CONTEXT_EXCEEDED, `field`) unless prompt + output tokens fit in
    `max_context` positions."""
    total = prompt_tokens + output_tokens
    if total > max_context:
        raise InvalidArgument(
            CONTEXT_EXCEEDED,
            f"prompt ({prompt_tokens}) + output_tokens ({output_tokens}) = {total} exceeds "
            f"the model's max_context {max_context}",
            field=field,
        )
