"""Read a Hugging Face `config.json` into a ModelSpec (no transformers import needed).

Supported `model_type`s: gpt2, gptj, gpt_neox, opt, llama, mistral, bloom. Both the keys
found in published config.json files (`rope_theta`, `rotary_pct`, `rotary_emb_base`) and
the `rope_parameters` block that transformers 5 writes are understood. Features that
change the shape in ways ModelSpec does not describe (OPT-350m's projection, a Llama
head_dim that is not hidden/heads, cross-attention) are refused, never approximated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional
from idealrt.core.reasons import (
    CONFIG_INVALID,
    CONFIG_NOT_FOUND,
    CONFIG_UNSUPPORTED,
    UNSUPPORTED_MODEL_TYPE,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "load_hf_config", "spec_from_hf_config"]

FIELD = "model.config"

_GELU_TANH = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_accurate")
_ACTIVATIONS: dict[str, Activation] = {
    **dict.fromkeys(_GELU_TANH, Activation.GELU),
    "gelu": Activation.GELU_EXACT,
    "relu": Activation.RELU,
}


def _unsupported(key: str, message: str) -> InvalidArgument:
    return InvalidArgument(CONFIG_UNSUPPORTED, message, field=f"{FIELD}.{key}")


_REQUIRED = object()


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = _REQUIRED) -> Any:
    """The first of `keys` present with a non-null value; `default` if none is."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is _REQUIRED:
        raise InvalidArgument(
            CONFIG_INVALID,
            f"config of model_type {cfg.get('model_type')!r} lacks {' or '.join(keys)}",
            field=f"{FIELD}.{keys[0]}",
        )
    return default


def _rope(cfg: Mapping[str, Any], key: str, *legacy: str, default: float) -> float:
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, Mapping) and params.get(key) is not None:
        return float(params[key])
    return float(_get(cfg, key, *legacy, default=default))


def _activation(cfg: Mapping[str, Any], *keys: str, default: str) -> Activation:
    name = _get(cfg, *keys, default=default)
    if name not in _ACTIVATIONS:
        raise _unsupported(keys[0], f"activation {name!r} is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _gpt2(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    if cfg.get("add_cross_attention"):
        raise _unsupported("add_cross_attention", "cross-attention is not a decoder-only shape")
    d = int(_get(cfg, "n_embd", "hidden_size"))
    return ModelSpec(
        name,
        layers=int(_get(cfg, "n_layer", "num_hidden_layers")),
        d_model=d,
        heads=int(_get(cfg, "n_head", "num_attention_heads")),
        d_ff=int(_get(cfg, "n_inner", default=4 * d)),
        vocab=int(_get(cfg, "vocab_size")),
        max_positions=int(_get(cfg, "n_positions", "max_position_embeddings")),
        activation=_activation(cfg, "activation_function", default="gelu_new"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        norm_eps=float(_get(cfg, "layer_norm_epsilon", default=1e-5)),
        family="gpt2",
    )


def _gptj(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    d, heads = int(_get(cfg, "n_embd")), int(_get(cfg, "n_head"))
    head_dim = d // heads if heads and d % heads == 0 else 1
    return ModelSpec(
        name,
        layers=int(_get(cfg, "n_layer")),
        d_model=d,
        heads=heads,
        d_ff=int(_get(cfg, "n_inner", default=4 * d)),
        vocab=int(_get(cfg, "vocab_size")),
        max_positions=int(_get(cfg, "n_positions")),
        activation=_activation(cfg, "activation_function", default="gelu_new"),
        positional=Positional.ROTARY,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        parallel_attention=True,
        rotary_pct=int(_get(cfg, "rotary_dim", default=head_dim)) / head_dim,
        norm_eps=float(_get(cfg, "layer_norm_epsilon", default=1e-5)),
        family="gptj",
    )


def _gpt_neox(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    return ModelSpec(
        name,
        layers=int(_get(cfg, "num_hidden_layers")),
        d_model=int(_get(cfg, "hidden_size")),
        heads=int(_get(cfg, "num_attention_heads")),
        d_ff=int(_get(cfg, "intermediate_size")),
        vocab=int(_get(cfg, "vocab_size")),
        max_positions=int(_get(cfg, "max_position_embeddings")),
        activation=_activation(cfg, "hidden_act", default="gelu"),
        positional=Positional.ROTARY,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        parallel_attention=bool(cfg.get("use_parallel_residual", True)),
        rotary_pct=_rope(cfg, "partial_rotary_factor", "rotary_pct", default=1.0),
        rotary_base=_rope(cfg, "rope_theta", "rotary_emb_base", default=10000.0),
        attn_bias=bool(cfg.get("attention_bias", True)),
        norm_eps=float(_get(cfg, "layer_norm_eps", default=1e-5)),
        family="gpt_neox",
    )


def _opt(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    d = int(_get(cfg, "hidden_size"))
    if int(cfg.get("word_embed_proj_dim") or d) != d:
        raise _unsupported("word_embed_proj_dim", "OPT embedding projections (opt-350m)")
    if not cfg.get("do_layer_norm_before", True) or cfg.get("_remove_final_layer_norm"):
        raise _unsupported("do_layer_norm_before", "post-LayerNorm OPT (opt-350m)")
    if not cfg.get("layer_norm_elementwise_affine", True):
        raise _unsupported("layer_norm_elementwise_affine", "LayerNorm without parameters")
    return ModelSpec(
        name,
        layers=int(_get(cfg, "num_hidden_layers")),
        d_model=d,
        heads=int(_get(cfg, "num_attention_heads")),
        d_ff=int(_get(cfg, "ffn_dim")),
        vocab=int(_get(cfg, "vocab_size")),
        max_positions=int(_get(cfg, "max_position_embeddings")),
        activation=_activation(cfg, "activation_function", default="relu"),
        positional=Positional.LEARNED_OFFSET,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bias=bool(cfg.get("enable_bias", True)),
        family="opt",
    )


def _llama(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    family = str(cfg["model_type"])
    d, heads = int(_get(cfg, "hidden_size")), int(_get(cfg, "num_attention_heads"))
    if cfg.get("head_dim") is not None and heads and int(cfg["head_dim"]) * heads != d:
        raise _unsupported("head_dim", f"head_dim {cfg['head_dim']} != hidden_size / heads")
    act = _get(cfg, "hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise _unsupported("hidden_act", f"gated MLP activation {act!r} (only silu)")
    mlp_bias = bool(cfg.get("mlp_bias", False))
    return ModelSpec(
        name,
        layers=int(_get(cfg, "num_hidden_layers")),
        d_model=d,
        heads=heads,
        d_ff=int(_get(cfg, "intermediate_size")),
        vocab=int(_get(cfg, "vocab_size")),
        max_positions=int(_get(cfg, "max_position_embeddings")),
        kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        norm=Norm.RMSNORM,
        activation=Activation.SWIGLU,
        positional=Positional.ROTARY,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rotary_base=_rope(cfg, "rope_theta", default=10000.0),
        bias=mlp_bias,
        attn_bias=bool(cfg.get("attention_bias", False)),
        norm_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
        family=family,
        sliding_window=int(cfg.get("sliding_window") or 0) if family == "mistral" else 0,
    )


def _bloom(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    d = int(_get(cfg, "hidden_size", "n_embed"))
    return ModelSpec(
        name,
        layers=int(_get(cfg, "n_layer", "num_hidden_layers")),
        d_model=d,
        heads=int(_get(cfg, "n_head", "num_attention_heads")),
        d_ff=4 * d,
        vocab=int(_get(cfg, "vocab_size")),
        max_positions=int(_get(cfg, "seq_length", default=2048)),  # ALiBi: no hard limit
        positional=Positional.ALIBI,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        norm_eps=float(_get(cfg, "layer_norm_epsilon", default=1e-5)),
        family="bloom",
    )


_BUILDERS: dict[str, Callable[[Mapping[str, Any], str], ModelSpec]] = {
    "gpt2": _gpt2,
    "gptj": _gptj,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "llama": _llama,
    "mistral": _llama,
    "bloom": _bloom,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def load_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed config.json at `path` (a file, or a directory holding config.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InvalidArgument(
            CONFIG_NOT_FOUND,
            f"no Hugging Face config at {str(p)!r}: pass a config.json or a model directory",
            field=FIELD,
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(CONFIG_INVALID, f"cannot read {str(p)!r}: {e}", field=FIELD) from e
    if not isinstance(data, dict):
        raise InvalidArgument(CONFIG_INVALID, f"{str(p)!r} is not a JSON object", field=FIELD)
    return data


def spec_from_hf_config(
    source: str | os.PathLike[str] | Mapping[str, Any], *, name: str = ""
) -> ModelSpec:
    """ModelSpec of a Hugging Face config: a dict (`PretrainedConfig.to_dict()`), a
    config.json path or a model directory. `name` defaults to `_name_or_path`, then to
    the model_type."""
    cfg = source if isinstance(source, Mapping) else load_hf_config(source)
    model_type = cfg.get("model_type")
    builder = _BUILDERS.get(model_type) if isinstance(model_type, str) else None
    if builder is None:
        raise InvalidArgument(
            UNSUPPORTED_MODEL_TYPE,
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
            field=FIELD,
        )
    try:
        return builder(cfg, name or str(cfg.get("_name_or_path") or model_type))
    except (TypeError, ValueError) as e:  # e.g. "n_layer": "twelve"
        raise InvalidArgument(
            CONFIG_INVALID, f"malformed {model_type} config: {e}", field=FIELD
        ) from e
