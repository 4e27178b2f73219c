"""Catalog: published parameter counts, lookups and the tiny test shapes."""

from __future__ import annotations

from typing import Any

import pytest

from idealrt.core import catalog
from idealrt.core.catalog import CATALOG, names, resolve
from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import Activation, Norm, Positional

# Exact counts: sum(p.numel()) of the Hugging Face implementation (the model cards quote
# the same figures rounded: GPT-2 124M, Llama-2-7B 6.74B, ...).
EXACT = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "gpt-j-6b": 6_050_882_784,
    "gpt-neox-20b": 20_554_567_680,
    "opt-1.3b": 1_315_758_080,
    "llama-2-7b": 6_738_415_616,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "bloom-176b": 176_247_271_424,
}

# Published (rounded) sizes: (count, relative tolerance).
PUBLISHED = {
    "gpt2": (124.4e6, 0.001),
    "gpt2-medium": (355e6, 0.005),
    "gpt2-xl": (1.56e9, 0.005),
    "gpt-j-6b": (6_053_381_344, 0.001),  # model card (mesh-transformer-jax count)
    "gpt-neox-20b": (20.6e9, 0.005),
    "opt-1.3b": (1.3e9, 0.015),
    "llama-2-7b": (6.74e9, 0.001),
    "llama-2-70b": (68.98e9, 0.001),
    "llama-3-8b": (8.03e9, 0.001),
    "mistral-7b": (7.24e9, 0.001),
    "bloom-176b": (176.2e9, 0.001),
    "davinci": (175e9, 0.005),
    "opt-66b": (66e9, 0.005),
    "anthropic-52b": (52e9, 0.005),
    "j1-jumbo": (178e9, 0.005),
    "tnlg-530b": (530e9, 0.005),
    "yalm-100b": (100e9, 0.025),  # "100B" is a round name
    "ada": (350e6, 0.02),  # "350M" is a round name
}


@pytest.mark.parametrize(("name", "count"), EXACT.items())
def test_exact_parameter_counts(name: str, count: int) -> None:
    assert resolve(name).param_count() == count


@pytest.mark.parametrize(("name", "published"), PUBLISHED.items())
def test_published_parameter_counts(name: str, published: tuple[float, float]) -> None:
    count, tol = published
    assert resolve(name).param_count() == pytest.approx(count, rel=tol)


def test_required_entries_exist_with_their_names() -> None:
    required = {*EXACT, *PUBLISHED, "gpt2-large", "tiny-gpt2", "tiny-llama"}
    assert required <= set(CATALOG)
    for name, spec in CATALOG.items():
        assert spec.name == name
    assert names() == sorted(CATALOG)


def test_shapes_from_published_configs() -> None:
    l70 = resolve("llama-2-70b")
    assert (l70.kv_heads_effective, l70.d_ff, l70.layers) == (8, 28672, 80)
    l3 = resolve("llama-3-8b")
    assert (l3.vocab, l3.kv_heads_effective, l3.d_ff, l3.rotary_base) == (128256, 8, 14336, 5e5)
    dv = resolve("davinci")
    assert (dv.layers, dv.d_model, dv.heads, dv.d_ff, dv.vocab, dv.max_positions) == (
        96, 12288, 96, 49152, 50257, 2048,
    )  # fmt: skip
    assert resolve("mistral-7b").sliding_window == 4096
    assert resolve("gpt-j-6b").rotary_pct * resolve("gpt-j-6b").head_dim == 64
    assert resolve("bloom-176b").positional is Positional.ALIBI
    assert resolve("yalm-100b").d_ff == 27308


def test_tiny_shapes() -> None:
    g = resolve("tiny-gpt2")
    assert (g.layers, g.d_model, g.heads, g.d_ff, g.vocab, g.max_positions) == (
        2, 64, 4, 256, 512, 256,
    )  # fmt: skip
    t = resolve("tiny-llama")
    assert (t.layers, t.d_model, t.heads, t.kv_heads_effective, t.d_ff) == (2, 64, 4, 2, 128)
    assert (t.vocab, t.max_positions) == (512, 256)
    assert t.norm is Norm.RMSNORM and t.activation is Activation.SWIGLU
    assert t.positional is Positional.ROTARY
    assert not t.bias and not t.attn_bias_effective and not t.tied_embeddings
    assert g.param_count() < 200_000 and t.param_count() < 200_000


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("GPT2", "gpt2"),
        (" llama-2-7b ", "llama-2-7b"),
        ("together/opt-66b", "opt-66b"),
        ("openai/davinci", "davinci"),
        ("EleutherAI/gpt-neox-20b", "gpt-neox-20b"),
        ("meta-llama/Meta-Llama-3-8B", "llama-3-8b"),
        ("bigscience/bloom", "bloom-176b"),
        ("anthropic/stanford-online-all-v4-s3", "anthropic-52b"),
    ],
)
def test_aliases(alias: str, name: str) -> None:
    assert resolve(alias) is CATALOG[name]


def test_aliases_point_at_catalog_entries() -> None:
    assert set(catalog.ALIASES.values()) <= set(CATALOG)


@pytest.mark.parametrize("bad", ["gpt-5", "", "openai/"])
def test_unknown_model(bad: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        resolve(bad)
    assert ei.value.reason == "UNKNOWN_MODEL"
    assert ei.value.field == "model.name"
    assert "tiny-gpt2" in ei.value.message  # lists the known names


def test_catalog_is_read_only() -> None:
    mutable: Any = CATALOG
    with pytest.raises(TypeError):
        mutable["x"] = CATALOG["gpt2"]


def test_all_exported() -> None:
    assert set(catalog.__all__) == {"ALIASES", "CATALOG", "names", "resolve"}
    for n in catalog.__all__:
        assert hasattr(catalog, n)
