"""ModelSpec: validation, derived counts, FLOP/byte conventions, identity, serialization."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional, dtype_bytes


def tiny(**kw: Any) -> ModelSpec:
    base: dict[str, Any] = dict(
        name="t", layers=2, d_model=64, heads=4, d_ff=256, vocab=512, max_positions=256
    )
    base.update(kw)
    return ModelSpec(**base)


def llama(**kw: Any) -> ModelSpec:
    base: dict[str, Any] = dict(
        kv_heads=2, d_ff=128, norm=Norm.RMSNORM, activation=Activation.SWIGLU,
        positional=Positional.ROTARY, tied_embeddings=False, bias=False, family="llama",
    )  # fmt: skip
    base.update(kw)
    return tiny(**base)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"layers": 0}, "layers"),
        ({"d_model": -64}, "d_model"),
        ({"heads": 0}, "heads"),
        ({"d_ff": 0}, "d_ff"),
        ({"vocab": 0}, "vocab"),
        ({"max_positions": 0}, "max_positions"),
        ({"layers": 2.0}, "layers"),
        ({"layers": True}, "layers"),
        ({"heads": 6}, "heads"),  # 64 % 6 != 0
        ({"kv_heads": 3}, "kv_heads"),  # 4 % 3 != 0
        ({"kv_heads": 8}, "kv_heads"),  # more kv heads than heads
        ({"kv_heads": -1}, "kv_heads"),
        ({"norm": "batchnorm"}, "norm"),
        ({"activation": "tanh"}, "activation"),
        ({"positional": "sinusoid"}, "positional"),
        ({"rotary_pct": 0.0}, "rotary_pct"),
        ({"rotary_pct": 1.5}, "rotary_pct"),
        ({"rotary_base": -1.0}, "rotary_base"),
        ({"norm_eps": 0}, "norm_eps"),
        ({"bias": 1}, "bias"),
        ({"attn_bias": "yes"}, "attn_bias"),
        ({"family": "gpt5"}, "family"),
        ({"sliding_window": -1}, "sliding_window"),
        ({"shared_norm": True}, "shared_norm"),  # needs parallel_attention
    ],
)
def test_validation_names_reason_and_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        tiny(**changes)
    assert ei.value.reason == "MODEL_SPEC_INVALID"
    assert ei.value.field == f"model.spec.{field}"


def test_validation_message_gives_allowed_range() -> None:
    with pytest.raises(InvalidArgument) as ei:
        tiny(kv_heads=3)
    assert "divisor of heads=4" in ei.value.message


def test_enum_strings_are_coerced_and_floats_normalised() -> None:
    s = tiny(norm="rmsnorm", activation="swiglu", positional="rotary", rotary_pct=1)
    assert s.norm is Norm.RMSNORM and s.activation is Activation.SWIGLU
    assert s.positional is Positional.ROTARY
    assert isinstance(s.rotary_pct, float)
    assert s == tiny(norm=Norm.RMSNORM, activation=Activation.SWIGLU,
                     positional=Positional.ROTARY, rotary_pct=1.0)  # fmt: skip


def test_derived_shape() -> None:
    assert tiny().kv_heads_effective == 4
    assert tiny(kv_heads=1).kv_heads_effective == 1
    assert tiny().head_dim == 16
    assert not tiny().ffn_gated
    assert llama().ffn_gated


def test_param_count_gpt2_style_by_hand() -> None:
    d, ff, v, pos, L = 64, 256, 512, 256, 2
    per_layer = (
        2 * d  # ln_1
        + d * 3 * d + 3 * d  # c_attn
        + d * d + d  # attn c_proj
        + 2 * d  # ln_2
        + d * ff + ff  # c_fc
        + ff * d + d  # mlp c_proj
    )  # fmt: skip
    expected = v * d + pos * d + L * per_layer + 2 * d
    assert tiny().param_count() == expected
    # untied adds a separate LM head; OPT's offset adds two position rows
    assert tiny(tied_embeddings=False).param_count() == expected + v * d
    assert tiny(positional=Positional.LEARNED_OFFSET).param_count() == expected + 2 * d
    assert tiny(positional=Positional.ROTARY).param_count() == expected - pos * d


def test_param_count_llama_style_by_hand() -> None:
    d, ff, v, L, kv_dim = 64, 128, 512, 2, 2 * 16
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ff + 2 * d
    assert llama().param_count() == 2 * v * d + L * per_layer + d
    with_attn_bias = llama(attn_bias=True).param_count()
    assert with_attn_bias - llama().param_count() == L * (2 * d + 2 * kv_dim)
    # MLP bias alone (gated: two d_ff biases + one d_model bias)
    assert llama(bias=True, attn_bias=False).param_count() - llama().param_count() == L * (
        2 * ff + d
    )


def test_family_defaults_gptj_and_bloom() -> None:
    gptj = tiny(family="gptj", parallel_attention=True, tied_embeddings=False)
    plain = tiny(parallel_attention=True, tied_embeddings=False)
    d, v, L = 64, 512, 2
    # GPT-J: no attention biases, one shared norm per layer, LM head bias
    assert plain.param_count() - gptj.param_count() == L * (4 * d) + L * (2 * d) - v
    explicit: dict[str, Any] = dict(attn_bias=False, shared_norm=True, lm_head_bias=True)
    assert plain.replace(**explicit).param_count() == gptj.param_count()
    # the hash resolves family defaults: None and the value it stands for hash equal
    assert gptj.replace(**explicit).spec_hash() == gptj.spec_hash()
    bloom = tiny(family="bloom", positional=Positional.ALIBI)
    assert bloom.param_breakdown()["embedding_norm"] == 2 * d
    assert bloom.replace(embedding_norm=False).param_breakdown()["embedding_norm"] == 0


def test_weight_and_kv_bytes() -> None:
    s = llama()
    assert s.weight_bytes("fp16") == 2 * s.param_count()
    assert s.weight_bytes("fp32") == 4 * s.param_count()
    # 2 (K,V) * layers * kv_heads * head_dim * bytes
    assert s.kv_cache_bytes_per_token("fp16") == 2 * 2 * 2 * 16 * 2
    assert s.kv_cache_bytes(100, "fp16", batch=3) == 300 * s.kv_cache_bytes_per_token("fp16")
    windowed = s.replace(sliding_window=16)
    assert windowed.kv_cache_bytes(100, "fp16") == 16 * s.kv_cache_bytes_per_token("fp16")
    assert windowed.kv_cache_bytes(10, "fp16") == 10 * s.kv_cache_bytes_per_token("fp16")
    with pytest.raises(InvalidArgument) as ei:
        s.kv_cache_bytes(1, "fp64")
    assert ei.value.reason == "DTYPE_INVALID"
    with pytest.raises(InvalidArgument):
        s.kv_cache_bytes(1, "fp16", batch=0)
    assert dtype_bytes("bf16") == 2


def test_flops_by_hand() -> None:
    s = tiny()
    d, ff, v, L = 64, 256, 512, 2
    mm = L * (4 * d * d + 2 * d * ff) + v * d
    assert s.matmul_params() == mm
    assert s.decode_flops(10) == 2 * mm + 4 * L * d * 10
    assert s.prefill_flops(3) == 2 * mm * 3 + 4 * L * d * (1 + 2 + 3)
    lm_head = 2 * v * d
    assert s.prefill_flops(3, last_logits_only=True) == s.prefill_flops(3) - 2 * lm_head


def test_gqa_does_not_change_flops_but_window_does() -> None:
    # fewer KV heads shrink the k/v projections, not the attention arithmetic
    mqa, mha = llama(kv_heads=1), llama(kv_heads=4)
    assert mha.matmul_params() - mqa.matmul_params() == 2 * 2 * 64 * (64 - 16)
    attn = 4 * 2 * 64 * 49  # 49 more keys at c=50 than at c=1
    assert mqa.decode_flops(50) - mqa.decode_flops(1) == attn
    assert mha.decode_flops(50) - mha.decode_flops(1) == attn
    w = llama(sliding_window=8)
    assert w.decode_flops(50) == w.decode_flops(8) < llama().decode_flops(50)


@pytest.mark.parametrize("spec", [tiny(), llama(), llama(sliding_window=5)])
def test_prefill_is_the_sum_of_single_token_steps(spec: ModelSpec) -> None:
    for p in (1, 2, 7, 12):
        assert spec.prefill_flops(p) == sum(spec.decode_flops(c) for c in range(1, p + 1))


def test_decode_bytes_reads_weights_once_plus_kv() -> None:
    s = tiny()  # tied: the embedding table is read as the LM head; one position row
    d, pos = 64, 256
    weights = (s.param_count() - pos * d + d) * 4
    assert s.decode_bytes(10, "fp32") == weights + s.kv_cache_bytes(10, "fp32")
    u = llama()  # untied, no position table: one embedding row instead of the table
    assert u.decode_bytes(1, "fp16") == (u.param_count() - 512 * 64 + 64) * 2 + u.kv_cache_bytes(
        1, "fp16"
    )
    assert u.decode_bytes(20, "fp16") - u.decode_bytes(10, "fp16") == u.kv_cache_bytes(10, "fp16")


@pytest.mark.parametrize("call", ["prefill_flops", "decode_flops"])
def test_token_counts_must_be_positive(call: str) -> None:
    with pytest.raises(InvalidArgument):
        getattr(tiny(), call)(0)
    with pytest.raises(InvalidArgument):
        tiny().decode_bytes(0, "fp16")


def test_dict_round_trip_is_json_safe() -> None:
    s = llama(sliding_window=32, rotary_base=500000.0)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["norm"] == "rmsnorm" and d["attn_bias"] is None
    assert ModelSpec.from_dict(d) == s
    assert ModelSpec.from_dict(d).spec_hash() == s.spec_hash()
    assert set(d) == {f.name for f in dataclasses.fields(ModelSpec)}


def test_from_dict_rejects_unknown_and_missing_fields() -> None:
    d = tiny().to_dict()
    with pytest.raises(InvalidArgument) as ei:
        ModelSpec.from_dict({**d, "n_layer": 3})
    assert ei.value.field == "model.spec.n_layer"
    del d["vocab"]
    with pytest.raises(InvalidArgument) as ei:
        ModelSpec.from_dict(d)
    assert ei.value.field == "model.spec.vocab"
    minimal = {"name": "m", "layers": 1, "d_model": 8, "heads": 2, "d_ff": 8, "vocab": 4,
               "max_positions": 4}  # fmt: skip
    assert ModelSpec.from_dict(minimal).kv_heads_effective == 2


def test_spec_hash_identifies_the_shape() -> None:
    h = tiny().spec_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert tiny(name="other").spec_hash() == h  # the name is not the shape
    assert tiny(kv_heads=4).spec_hash() == h  # 0 means == heads
    assert tiny(d_ff=512).spec_hash() != h
    assert tiny(norm_eps=1e-6).spec_hash() != h
    assert tiny(sliding_window=8).spec_hash() != h


def test_replace_validates_again() -> None:
    s = tiny()
    assert s.replace(layers=4).layers == 4 and s.layers == 2
    with pytest.raises(InvalidArgument) as ei:
        s.replace(heads=5)
    assert ei.value.field == "model.spec.heads"
