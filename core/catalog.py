"""Well-known decoder architectures, transcribed from their published configs.

Each entry is the shape only (no weights): models are profiled with seeded random weights.
Sources are the models' Hugging Face `config.json` files unless noted; the HELM-profiled
closed models come from their papers and /work/shared/data/README.md, and the fields the
papers do not state are marked APPROX (they move the parameter count by well under 1%).

`resolve` also accepts a few aliases (Hugging Face repo ids, HELM model names), any
capitalisation, and an "org/" prefix in front of a catalog name ("together/opt-66b").
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional
from idealrt.core.reasons import UNKNOWN_MODEL

__all__ = ["ALIASES", "CATALOG", "names", "resolve"]


def _gpt(
    name: str, layers: int, d: int, heads: int, vocab: int = 50257, pos: int = 2048, d_ff: int = 0
) -> ModelSpec:
    """GPT-2/GPT-3 block: pre-LayerNorm, learned positions, GELU, biases, tied head."""
    return ModelSpec(name, layers, d, heads, d_ff or 4 * d, vocab, pos, family="gpt2")


def _llama(
    name: str,
    layers: int,
    d: int,
    heads: int,
    kv: int,
    d_ff: int,
    vocab: int,
    pos: int,
    *,
    rope: float = 10000.0,
    family: str = "llama",
    window: int = 0,
    eps: float = 1e-5,
) -> ModelSpec:
    """Llama block: RMSNorm, SwiGLU, rotary, no biases, untied head."""
    return ModelSpec(
        name,
        layers,
        d,
        heads,
        d_ff,
        vocab,
        pos,
        kv_heads=kv if kv != heads else 0,
        norm=Norm.RMSNORM,
        activation=Activation.SWIGLU,
        positional=Positional.ROTARY,
        tied_embeddings=False,
        rotary_base=rope,
        bias=False,
        norm_eps=eps,
        family=family,
        sliding_window=window,
    )


def _opt(name: str, layers: int, d: int, heads: int) -> ModelSpec:
    """OPT block: pre-LayerNorm, ReLU, learned positions offset by 2, tied head."""
    return ModelSpec(
        name,
        layers,
        d,
        heads,
        4 * d,
        50272,
        2048,
        activation=Activation.RELU,
        positional=Positional.LEARNED_OFFSET,
        family="opt",
    )


_SPECS: tuple[ModelSpec, ...] = (
    # GPT-2 (openai-community/gpt2*): 1024 positions
    _gpt("gpt2", 12, 768, 12, pos=1024),
    _gpt("gpt2-medium", 24, 1024, 16, pos=1024),
    _gpt("gpt2-large", 36, 1280, 20, pos=1024),
    _gpt("gpt2-xl", 48, 1600, 25, pos=1024),
    # EleutherAI/gpt-j-6b: parallel block with one shared LayerNorm, rotary on 64 of 256
    # head dims, no attention biases, untied LM head with a bias.
    ModelSpec(
        "gpt-j-6b",
        28,
        4096,
        16,
        16384,
        50400,
        2048,
        positional=Positional.ROTARY,
        tied_embeddings=False,
        parallel_attention=True,
        rotary_pct=0.25,
        family="gptj",
    ),
    # EleutherAI/gpt-neox-20b: parallel block with two LayerNorms, rotary on 25% of dims.
    ModelSpec(
        "gpt-neox-20b",
        44,
        6144,
        64,
        24576,
        50432,
        2048,
        positional=Positional.ROTARY,
        tied_embeddings=False,
        parallel_attention=True,
        rotary_pct=0.25,
        family="gpt_neox",
    ),
    # facebook/opt-*
    _opt("opt-1.3b", 24, 2048, 32),
    _opt("opt-66b", 64, 9216, 72),
    # meta-llama/Llama-2-*-hf, Meta-Llama-3-8B; mistralai/Mistral-7B-v0.1
    _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 4096),
    _llama("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, rope=500000.0),
    _llama("mistral-7b", 32, 4096, 32, 8, 14336, 32000, 32768, family="mistral", window=4096),
    # bigscience/bloom: ALiBi (no position table), LayerNorm after the embedding, tied head.
    # max_positions is the training sequence length (ALiBi has no hard limit).
    ModelSpec(
        "bloom-176b",
        70,
        14336,
        112,
        57344,
        250880,
        2048,
        positional=Positional.ALIBI,
        family="bloom",
    ),
    # GPT-3 (Brown et al. 2020, table 2.1): davinci 175B and ada 350M, GPT-2 block.
    _gpt("davinci", 96, 12288, 96),
    _gpt("ada", 24, 1024, 16),
    # HELM-profiled closed models: layers/hidden/heads from the papers; the rest APPROX
    # (GPT-style block assumed throughout).
    # Anthropic-52B (Askell et al. 2021): APPROX vocab 2^16, 8192 positions, d_ff 4d.
    _gpt("anthropic-52b", 64, 8192, 64, vocab=65536, pos=8192),
    # Jurassic-1 Jumbo 178B (Lieber et al. 2021): 256k vocabulary; APPROX d_ff 4d.
    _gpt("j1-jumbo", 76, 13824, 96, vocab=256000),
    # YaLM-100B (yandex/YaLM-100B): d_ff 27308 with a gated GeLU MLP, here SwiGLU (same
    # matrices, same count and FLOPs); APPROX vocab 128000, 2048 positions.
    ModelSpec(
        "yalm-100b",
        80,
        10240,
        128,
        27308,
        128000,
        2048,
        activation=Activation.SWIGLU,
        family="gpt2",
    ),
    # Megatron-Turing NLG 530B (Smith et al. 2022): APPROX GPT-2 vocab, d_ff 4d.
    _gpt("tnlg-530b", 105, 20480, 128),
    # Tiny shapes for tests and CI (fast on a CPU).
    _gpt("tiny-gpt2", 2, 64, 4, vocab=512, pos=256, d_ff=256),
    _llama("tiny-llama", 2, 64, 4, 2, 128, 512, 256),
)

CATALOG: Mapping[str, ModelSpec] = MappingProxyType({s.name: s for s in _SPECS})

# Other names for catalog entries (matched case-insensitively).
ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "openai-community/gpt2": "gpt2",
        "EleutherAI/gpt-j-6B": "gpt-j-6b",
        "meta-llama/Llama-2-7b-hf": "llama-2-7b",
        "meta-llama/Llama-2-70b-hf": "llama-2-70b",
        "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
        "mistralai/Mistral-7B-v0.1": "mistral-7b",
        "bigscience/bloom": "bloom-176b",
        "together/bloom": "bloom-176b",
        "anthropic/stanford-online-all-v4-s3": "anthropic-52b",
        "yandex/yalm": "yalm-100b",
        "together/yalm": "yalm-100b",
        "microsoft/TNLGv2_530B": "tnlg-530b",
    }
)
_FOLDED = {k.lower(): v for k, v in {**{n: n for n in CATALOG}, **ALIASES}.items()}


def names() -> list[str]:
    """Catalog names, sorted."""
    return sorted(CATALOG)


def resolve(name: str) -> ModelSpec:
    """The spec of a catalog name or alias, e.g. "gpt2", "together/opt-66b"."""
    key = name.strip().lower()
    hit = _FOLDED.get(key) or _FOLDED.get(key.rsplit("/", 1)[-1])
    if hit is None:
        raise InvalidArgument(
            UNKNOWN_MODEL,
            f"unknown model {name!r}; known models: {', '.join(names())}",
            field="model.name",
        )
    return CATALOG[hit]
