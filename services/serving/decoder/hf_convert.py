"""ModelSpec -> Hugging Face config: the inverse of `idealrt.core.hf_config`.

`hf_config_dict` is pure (no transformers import); `hf_config` builds the
`transformers.PretrainedConfig`, importing transformers only when called. Dropout is 0 and
`use_cache` true: these configs are for inference.
"""

from __future__ import annotations

from typing import Any

from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional
from idealrt.services.serving.reasons import DEPENDENCY_MISSING, SPEC_NOT_EXPRESSIBLE

__all__ = ["TRANSFORMERS_EXTRA", "hf_config", "hf_config_dict", "import_transformers"]

TRANSFORMERS_EXTRA = "pip install idealrt[transformers]"
_FIELD = "model.spec"

_ACT = {
    Activation.GELU: "gelu_new",
    Activation.GELU_EXACT: "gelu",
    Activation.RELU: "relu",
    Activation.SWIGLU: "silu",
}


def _unsupported(spec: ModelSpec, what: str) -> InvalidArgument:
    return InvalidArgument(
        SPEC_NOT_EXPRESSIBLE,
        f"spec {spec.name!r} (family {spec.family}) has no Hugging Face equivalent: {what}",
        field=_FIELD,
    )


def _expect(spec: ModelSpec, ok: bool, what: str) -> None:
    if not ok:
        raise _unsupported(spec, what)


def _common(spec: ModelSpec) -> dict[str, Any]:
    return {
        "vocab_size": spec.vocab,
        "tie_word_embeddings": spec.tied_embeddings,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": None,
    }


def hf_config_dict(spec: ModelSpec) -> dict[str, Any]:
    """`model_type` plus the keyword arguments of that family's HF config class."""
    f = spec.family
    ln = spec.norm == Norm.LAYERNORM
    hd = spec.head_dim
    plain_act = spec.activation != Activation.SWIGLU
    no_extras = not spec.embedding_norm_effective and not spec.sliding_window
    _expect(spec, spec.lm_head_bias_effective == (f == "gptj"), "lm_head_bias")
    if f == "gpt2":
        _expect(spec, ln and spec.positional == Positional.LEARNED, "norm/positional")
        _expect(spec, plain_act and spec.bias and spec.attn_bias_effective, "activation/bias")
        _expect(spec, not spec.parallel_attention and no_extras, "block layout")
        return {
            "model_type": "gpt2",
            **_common(spec),
            "n_positions": spec.max_positions,
            "n_embd": spec.d_model,
            "n_layer": spec.layers,
            "n_head": spec.heads,
            "n_inner": spec.d_ff,
            "activation_function": _ACT[spec.activation],
            "layer_norm_epsilon": spec.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    if f == "gptj":
        _expect(spec, ln and spec.positional == Positional.ROTARY and plain_act, "norm/act")
        _expect(spec, spec.shared_norm_effective and spec.parallel_attention, "block layout")
        _expect(spec, spec.bias and not spec.attn_bias_effective and no_extras, "biases")
        _expect(spec, spec.rotary_base == 10000.0, "rotary_base (GPT-J fixes 10000)")
        return {
            "model_type": "gptj",
            **_common(spec),
            "n_positions": spec.max_positions,
            "n_embd": spec.d_model,
            "n_layer": spec.layers,
            "n_head": spec.heads,
            "n_inner": spec.d_ff,
            "rotary_dim": int(hd * spec.rotary_pct),
            "activation_function": _ACT[spec.activation],
            "layer_norm_epsilon": spec.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    if f == "gpt_neox":
        _expect(spec, ln and spec.positional == Positional.ROTARY and plain_act, "norm/act")
        _expect(spec, not spec.shared_norm_effective and no_extras, "block layout")
        _expect(spec, spec.bias, "bias (NeoX MLP biases are fixed)")
        return {
            "model_type": "gpt_neox",
            **_common(spec),
            "hidden_size": spec.d_model,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "intermediate_size": spec.d_ff,
            "hidden_act": _ACT[spec.activation],
            "max_position_embeddings": spec.max_positions,
            "layer_norm_eps": spec.norm_eps,
            "use_parallel_residual": spec.parallel_attention,
            "attention_bias": spec.attn_bias_effective,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": spec.rotary_base,
                "partial_rotary_factor": spec.rotary_pct,
            },
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        }
    if f == "opt":
        _expect(spec, ln and spec.positional == Positional.LEARNED_OFFSET and plain_act, "norm")
        _expect(spec, spec.bias == spec.attn_bias_effective, "bias (one switch in OPT)")
        _expect(spec, not spec.parallel_attention and no_extras, "block layout")
        return {
            "model_type": "opt",
            **_common(spec),
            "hidden_size": spec.d_model,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "ffn_dim": spec.d_ff,
            "max_position_embeddings": spec.max_positions,
            "activation_function": _ACT[spec.activation],
            "do_layer_norm_before": True,
            "word_embed_proj_dim": spec.d_model,
            "enable_bias": spec.bias,
            "layer_norm_elementwise_affine": True,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "layerdrop": 0.0,
        }
    if f in ("llama", "mistral"):
        _expect(spec, not ln and spec.positional == Positional.ROTARY, "norm/positional")
        _expect(spec, spec.activation == Activation.SWIGLU and spec.rotary_pct == 1.0, "act/rope")
        _expect(spec, not spec.parallel_attention and not spec.embedding_norm_effective, "block")
        _expect(spec, f == "mistral" or not spec.sliding_window, "sliding_window (llama)")
        out = {
            "model_type": f,
            **_common(spec),
            "hidden_size": spec.d_model,
            "intermediate_size": spec.d_ff,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads_effective,
            "head_dim": hd,
            "hidden_act": "silu",
            "max_position_embeddings": spec.max_positions,
            "rms_norm_eps": spec.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rotary_base},
            "attention_bias": spec.attn_bias_effective,
            "attention_dropout": 0.0,
        }
        if f == "llama":
            out["mlp_bias"] = spec.bias
        else:
            _expect(spec, not spec.bias, "mlp bias (mistral has none)")
            out["sliding_window"] = spec.sliding_window or None
        return out
    if f == "bloom":
        _expect(spec, ln and spec.positional == Positional.ALIBI, "norm/positional")
        _expect(spec, spec.activation == Activation.GELU and spec.d_ff == 4 * spec.d_model, "mlp")
        _expect(spec, spec.embedding_norm_effective and not spec.sliding_window, "embedding norm")
        _expect(spec, spec.bias and spec.attn_bias_effective, "biases")
        _expect(spec, not spec.parallel_attention and spec.kv_heads_effective == spec.heads, "attn")
        return {
            "model_type": "bloom",
            **_common(spec),
            "hidden_size": spec.d_model,
            "n_layer": spec.layers,
            "n_head": spec.heads,
            "layer_norm_epsilon": spec.norm_eps,
            "seq_length": spec.max_positions,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        }
    raise _unsupported(spec, "unknown family")


def import_transformers() -> Any:
    """The transformers module, or FailedPrecondition naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise FailedPrecondition(
            DEPENDENCY_MISSING,
            f"this needs the Hugging Face transformers package: {TRANSFORMERS_EXTRA}",
        ) from None
    return transformers


def hf_config(spec: ModelSpec) -> Any:
    """A `transformers.PretrainedConfig` for `spec` (imports transformers)."""
    transformers = import_transformers()
    kwargs = hf_config_dict(spec)
    model_type = kwargs.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **kwargs)
