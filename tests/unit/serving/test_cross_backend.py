"""The same model on different stacks computes the same thing (fp32): pytorch and
onnxruntime from one seed, and pytorch, onnxruntime and transformers from one saved Hugging
Face directory, agree on every greedy token and on the logits of every step to 1e-4
relative (max|a-b| / max|b|). The onnxruntime runs use a 2-slot KV bucket, so its KV
buffers grow (and switch) several times within the 8 steps compared; with attention=fused
(ONNX Runtime's GroupQueryAttention writing one static cache in place) they are checked on
every family it runs: partial rotary, grouped and multi-query heads, a sliding window
shorter than the sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from idealrt.core.domain import Backend, StackSpec
from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving.backends import pytorch_backend as pt
from idealrt.services.serving.decoder import Decoder, build_decoder

pytest.importorskip("onnxruntime")
from idealrt.services.serving.backends import onnxruntime_backend as ob

pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning"),
]

FAMILIES = ("gpt2", "llama")
TOL = 1e-4
PROMPT = [5, 17, 3, 88, 41, 9, 60]
STEPS, BATCH, MAX_CONTEXT = 8, 2, 32
ORT = StackSpec(Backend.ONNXRUNTIME, options={"kv_bucket": "2"})
FUSED = StackSpec(Backend.ONNXRUNTIME, options={"attention": "fused"})
FUSED_FAMILIES = ("gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral")  # all but ALiBi


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idealrt-cache")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def ort_run(
    spec: ModelSpec, cache: Path, weights: str, seed: int, stack: StackSpec = ORT
) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """ONNX Runtime's greedy tokens, and the logits [B, vocab] of each step (step k's from
    a generation of k+1 tokens: the backend keeps the last step's logits)."""
    backend = ob.OnnxRuntimeBackend(cache)
    report = backend.load(spec, stack, weights, seed, MAX_CONTEXT)
    fused = stack.options.get("attention") == "fused"
    assert report.resolved_options["attention"] == ("fused" if fused else "onnx")
    tokens = backend.generate(PROMPT, STEPS, BATCH).output_ids
    logits = []
    for k in range(1, STEPS + 1):
        assert backend.generate(PROMPT, k, BATCH).output_ids == tokens[:k]
        logits.append(backend.last_logits())
    backend.unload()
    return tokens, logits


def stack_tokens(factory: Any, spec: ModelSpec, stack: StackSpec, weights: str, seed: int) -> Any:
    backend = factory()
    backend.load(spec, stack, weights, seed, MAX_CONTEXT)
    tokens = backend.generate(PROMPT, STEPS, BATCH).output_ids
    backend.unload()
    return tokens


def decoder_logits(decoder: Decoder, tokens: tuple[int, ...]) -> list[np.ndarray]:
    """The reference decoder's logits along `tokens` (eager, its own KV cache): the math
    the pytorch backend runs."""
    cache = decoder.new_cache(BATCH)
    ids = torch.tensor(PROMPT).expand(BATCH, -1)
    out = []
    with torch.inference_mode():
        out.append(decoder(ids, cache, 0, last_only=True)[:, -1].numpy())
        for i, tok in enumerate(tokens[:-1]):
            step = torch.full((BATCH, 1), tok, dtype=torch.int64)
            out.append(decoder(step, cache, len(PROMPT) + i, last_only=True)[:, -1].numpy())
    return out


@pytest.mark.parametrize(
    ("family", "stack"),
    [(f, ORT) for f in FAMILIES] + [(f, FUSED) for f in FUSED_FAMILIES],
    ids=[f"{f}-onnx" for f in FAMILIES] + [f"{f}-fused" for f in FUSED_FAMILIES],
)
def test_pytorch_and_onnxruntime_agree_from_one_seed(
    family: str, stack: StackSpec, cache_dir: Path, tiny: dict[str, ModelSpec]
) -> None:
    spec, seed = tiny[family], 11
    tokens, logits = ort_run(spec, cache_dir, "", seed, stack)
    assert stack_tokens(pt.create_backend, spec, StackSpec(), "", seed) == tokens
    ref = decoder_logits(build_decoder(spec, max_context=MAX_CONTEXT, seed=seed), tokens)
    errors = [rel_err(a, b) for a, b in zip(logits, ref, strict=True)]
    assert max(errors) <= TOL, errors
    # the logits are not degenerate: the comparison could fail
    assert min(float(np.abs(r).max()) for r in ref) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_three_stacks_agree_on_shared_hf_weights(
    family: str, cache_dir: Path, hf_dir: Any, tiny: dict[str, ModelSpec]
) -> None:
    pytest.importorskip("transformers")
    from idealrt.services.serving.backends import transformers_backend as tb

    spec = tiny[family]
    model, path = hf_dir(family)
    tokens, logits = ort_run(spec, cache_dir, str(path), 0)
    assert stack_tokens(pt.create_backend, spec, StackSpec(), str(path), 0) == tokens
    hf_stack = StackSpec(Backend.TRANSFORMERS)
    assert stack_tokens(tb.create_backend, spec, hf_stack, str(path), 0) == tokens
    seq = torch.tensor([*PROMPT, *tokens[:-1]]).expand(BATCH, -1)
    with torch.no_grad():
        hf = model(seq).logits
    ref = [hf[:, len(PROMPT) - 1 + k].numpy() for k in range(STEPS)]
    errors = [rel_err(a, b) for a, b in zip(logits, ref, strict=True)]
    assert max(errors) <= TOL, errors
