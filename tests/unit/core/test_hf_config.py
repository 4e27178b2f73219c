"""Hugging Face configs -> ModelSpec, checked against transformers' own models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.catalog import resolve
from idealrt.core.errors import InvalidArgument
from idealrt.core.hf_config import SUPPORTED_MODEL_TYPES, spec_from_hf_config
from idealrt.core.model_spec import Activation, Positional

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOKENS: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
V = {"vocab_size": 96}
LLAMA: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, **V, **TOKENS,
)  # fmt: skip
GPT2: dict[str, Any] = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, **V, **TOKENS)
NEOX: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, **V, **TOKENS,
)  # fmt: skip
OPT: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
    max_position_embeddings=64, word_embed_proj_dim=32, **V, **TOKENS,
)  # fmt: skip

# (config class, kwargs); each a tiny randomly initialised model
CASES: list[tuple[str, dict[str, Any]]] = [
    ("GPT2Config", GPT2),
    ("GPT2Config", {**GPT2, "n_inner": 48, "activation_function": "relu"}),
    ("GPT2Config", {**GPT2, "tie_word_embeddings": False}),
    ("GPTJConfig", dict(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=64, **V,
                        **TOKENS)),
    ("GPTNeoXConfig", {**NEOX, "rotary_pct": 0.25}),
    ("GPTNeoXConfig", {**NEOX, "attention_bias": False, "use_parallel_residual": False}),
    ("GPTNeoXConfig", {**NEOX, "tie_word_embeddings": True}),
    ("OPTConfig", OPT),
    ("OPTConfig", {**OPT, "enable_bias": False}),
    ("LlamaConfig", LLAMA),
    ("LlamaConfig", {**LLAMA, "attention_bias": True, "tie_word_embeddings": True}),
    ("LlamaConfig", {**LLAMA, "mlp_bias": True, "num_key_value_heads": 1}),
    ("MistralConfig", {**LLAMA, "sliding_window": 16, "head_dim": 8}),
    ("BloomConfig", dict(n_layer=2, hidden_size=32, n_head=4, **V, **TOKENS)),
]  # fmt: skip


def build(cls_name: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return config, model.eval()


@pytest.mark.parametrize(("cls_name", "kwargs"), CASES)
def test_param_count_equals_transformers(cls_name: str, kwargs: dict[str, Any]) -> None:
    config, model = build(cls_name, kwargs)
    spec = spec_from_hf_config(config.to_dict())
    assert spec.family == config.model_type
    assert spec.param_count() == sum(p.numel() for p in model.parameters())  # tied: once


@pytest.mark.parametrize(("cls_name", "kwargs"), CASES[::3])
def test_single_token_flops_equal_torch_flop_counter(cls_name: str, kwargs: dict[str, Any]) -> None:
    """With one token there is one key, so causal and full attention agree."""
    from torch.utils.flop_counter import FlopCounterMode

    config, model = build(cls_name, kwargs)
    spec = spec_from_hf_config(config.to_dict())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.tensor([[3]]))
    assert counter.get_total_flops() == spec.decode_flops(1) == spec.prefill_flops(1)


def test_prefill_counts_only_unmasked_attention() -> None:
    """Eager attention multiplies the full p x p score matrix; our convention counts the
    causal half (with the diagonal): the difference is exactly the masked entries."""
    from torch.utils.flop_counter import FlopCounterMode

    config, model = build("GPT2Config", GPT2)
    spec = spec_from_hf_config(config.to_dict())
    p, L, d = 5, 2, 32
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.arange(p).unsqueeze(0))
    masked = p * p - p * (p + 1) // 2
    assert counter.get_total_flops() - spec.prefill_flops(p) == 4 * L * d * masked


def test_fields_are_mapped() -> None:
    gptj = spec_from_hf_config(transformers.GPTJConfig(**CASES[3][1]).to_dict())
    assert gptj.rotary_pct == 0.5 and gptj.parallel_attention and gptj.shared_norm_effective
    assert not gptj.tied_embeddings and gptj.lm_head_bias_effective
    neox = spec_from_hf_config(transformers.GPTNeoXConfig(**NEOX, rotary_pct=0.25).to_dict())
    assert neox.rotary_pct == 0.25 and neox.positional is Positional.ROTARY
    llama = transformers.LlamaConfig(**LLAMA, rope_theta=500000.0)
    spec = spec_from_hf_config(llama.to_dict(), name="mine")
    assert spec.name == "mine" and spec.rotary_base == 500000.0
    assert spec.kv_heads_effective == 2 and spec.activation is Activation.SWIGLU
    mistral = transformers.MistralConfig(**LLAMA, sliding_window=16, head_dim=8)
    assert spec_from_hf_config(mistral.to_dict()).sliding_window == 16
    opt = spec_from_hf_config(transformers.OPTConfig(**OPT).to_dict())
    assert opt.positional is Positional.LEARNED_OFFSET and opt.activation is Activation.RELU


# Published config.json files (the fields that matter), legacy key spellings included.
PUBLISHED: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12,
             "vocab_size": 50257, "n_positions": 1024, "n_ctx": 1024,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05},
    "gpt-j-6b": {"model_type": "gptj", "n_layer": 28, "n_embd": 4096, "n_head": 16,
                 "rotary_dim": 64, "vocab_size": 50400, "n_positions": 2048,
                 "activation_function": "gelu_new", "tie_word_embeddings": False},
    "gpt-neox-20b": {"model_type": "gpt_neox", "num_hidden_layers": 44, "hidden_size": 6144,
                     "num_attention_heads": 64, "intermediate_size": 24576,
                     "vocab_size": 50432, "max_position_embeddings": 2048,
                     "hidden_act": "gelu_fast", "rotary_pct": 0.25, "rotary_emb_base": 10000,
                     "use_parallel_residual": True, "tie_word_embeddings": False,
                     "layer_norm_eps": 1e-05},
    "opt-1.3b": {"model_type": "opt", "num_hidden_layers": 24, "hidden_size": 2048,
                 "num_attention_heads": 32, "ffn_dim": 8192, "vocab_size": 50272,
                 "max_position_embeddings": 2048, "activation_function": "relu",
                 "do_layer_norm_before": True, "word_embed_proj_dim": 2048},
    "llama-3-8b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
                   "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0,
                   "rms_norm_eps": 1e-05, "hidden_act": "silu", "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096,
                   "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-05, "sliding_window": 4096, "hidden_act": "silu",
                   "tie_word_embeddings": False},
    "bloom-176b": {"model_type": "bloom", "n_layer": 70, "n_embed": 14336,
                   "num_attention_heads": 112, "vocab_size": 250880,
                   "layer_norm_epsilon": 1e-05},
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_match_the_catalog(name: str) -> None:
    spec = spec_from_hf_config(PUBLISHED[name])
    assert spec.spec_hash() == resolve(name).spec_hash()
    assert spec.param_count() == resolve(name).param_count()


def test_reads_a_file_or_a_model_directory(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**LLAMA)
    config.save_pretrained(tmp_path)
    from_dir = spec_from_hf_config(tmp_path)
    assert from_dir == spec_from_hf_config(str(tmp_path / "config.json"))
    assert from_dir.spec_hash() == spec_from_hf_config(config.to_dict()).spec_hash()


def test_missing_file(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "nope.json"):
        with pytest.raises(InvalidArgument) as ei:
            spec_from_hf_config(path)
        assert (ei.value.reason, ei.value.field) == ("CONFIG_NOT_FOUND", "model.config")


def test_malformed_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument) as ei:
        spec_from_hf_config(tmp_path)
    assert (ei.value.reason, ei.value.field) == ("CONFIG_INVALID", "model.config")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(InvalidArgument) as ei:
        spec_from_hf_config(tmp_path)
    assert ei.value.reason == "CONFIG_INVALID"


@pytest.mark.parametrize("model_type", ["t5", "bert", None, 3])
def test_unsupported_model_type(model_type: object) -> None:
    with pytest.raises(InvalidArgument) as ei:
        spec_from_hf_config({"model_type": model_type, "hidden_size": 8})
    assert (ei.value.reason, ei.value.field) == ("UNSUPPORTED_MODEL_TYPE", "model.config")
    assert all(t in ei.value.message for t in SUPPORTED_MODEL_TYPES)


def test_missing_and_malformed_keys() -> None:
    cfg = dict(PUBLISHED["gpt2"])
    del cfg["n_layer"]
    with pytest.raises(InvalidArgument) as ei:
        spec_from_hf_config(cfg)
    assert (ei.value.reason, ei.value.field) == ("CONFIG_INVALID", "model.config.n_layer")
    with pytest.raises(InvalidArgument) as ei:
        spec_from_hf_config({**PUBLISHED["gpt2"], "n_layer": "twelve"})
    assert ei.value.reason == "CONFIG_INVALID"


@pytest.mark.parametrize(
    ("base", "change", "field"),
    [
        ("opt-1.3b", {"word_embed_proj_dim": 512}, "word_embed_proj_dim"),
        ("opt-1.3b", {"do_layer_norm_before": False}, "do_layer_norm_before"),
        ("llama-3-8b", {"head_dim": 256}, "head_dim"),
        ("llama-3-8b", {"hidden_act": "gelu"}, "hidden_act"),
        ("gpt2", {"activation_function": "mish"}, "activation_function"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ],
)
def test_unsupported_features_are_refused(base: str, change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        spec_from_hf_config({**PUBLISHED[base], **change})
    assert (ei.value.reason, ei.value.field) == ("CONFIG_UNSUPPORTED", f"model.config.{field}")


def test_invalid_shape_is_reported_on_the_spec() -> None:
    with pytest.raises(InvalidArgument) as ei:
        spec_from_hf_config({**PUBLISHED["gpt2"], "n_head": 7})
    assert (ei.value.reason, ei.value.field) == ("MODEL_SPEC_INVALID", "model.spec.heads")
