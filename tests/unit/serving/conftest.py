"""Tiny specs of every family, and Hugging Face checkpoints of them saved to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional

_ROTARY: dict[str, Any] = {"positional": Positional.ROTARY, "tied_embeddings": False}
_LLAMA: dict[str, Any] = {
    **_ROTARY,
    "norm": Norm.RMSNORM,
    "activation": Activation.SWIGLU,
    "bias": False,
    "norm_eps": 1e-6,
}

# (layers, d_model, heads, d_ff, vocab, max_positions) kept tiny; every structural switch of
# each family is on (partial rotary, GQA/MQA, sliding window, ALiBi, embedding norm).
TINY: dict[str, ModelSpec] = {
    "gpt2": ModelSpec("t-gpt2", 2, 32, 4, 64, 97, 64, family="gpt2"),
    "gptj": ModelSpec(
        "t-gptj",
        2,
        32,
        4,
        64,
        97,
        64,
        family="gptj",
        parallel_attention=True,
        rotary_pct=0.5,
        **_ROTARY,
    ),
    "gpt_neox": ModelSpec(
        "t-neox",
        2,
        32,
        4,
        64,
        97,
        64,
        family="gpt_neox",
        parallel_attention=True,
        rotary_pct=0.25,
        activation=Activation.GELU_EXACT,
        **_ROTARY,
    ),
    "opt": ModelSpec(
        "t-opt",
        2,
        32,
        4,
        64,
        97,
        64,
        family="opt",
        positional=Positional.LEARNED_OFFSET,
        activation=Activation.RELU,
    ),
    "llama": ModelSpec("t-llama", 2, 32, 4, 64, 97, 64, kv_heads=2, family="llama", **_LLAMA),
    "mistral": ModelSpec(
        "t-mistral",
        2,
        32,
        4,
        64,
        97,
        64,
        kv_heads=1,
        family="mistral",
        sliding_window=6,
        **_LLAMA,
    ),
    "bloom": ModelSpec(
        "t-bloom", 2, 32, 4, 128, 97, 64, family="bloom", positional=Positional.ALIBI
    ),
}


def make_hf_model(spec: ModelSpec, seed: int = 0) -> Any:
    """The HF model of `spec` (eager attention), every parameter perturbed so that biases
    and norm scales are not trivially 0 and 1 (a swapped or missing one would show)."""
    import transformers

    from idealrt.services.serving.decoder.hf_convert import hf_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config(spec), attn_implementation="eager"
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


HfDir = Callable[[str], tuple[Any, Path]]


@pytest.fixture(scope="session")
def tiny() -> dict[str, ModelSpec]:
    """family -> a tiny spec of that family."""
    return TINY


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> HfDir:
    """family -> (HF model, directory it was saved to as safetensors); made once per session."""
    made: dict[str, tuple[Any, Path]] = {}

    def get(family: str) -> tuple[Any, Path]:
        if family not in made:
            model = make_hf_model(TINY[family])
            path = tmp_path_factory.mktemp(f"hf-{family}")
            model.save_pretrained(path)
            made[family] = (model, path)
        return made[family]

    return get
