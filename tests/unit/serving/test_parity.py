"""The reference decoder computes what Hugging Face computes (fp32, max relative error
max|a-b|/max|b| <= 1e-4), for the prefill and 8 greedy decode steps, through each of its
three entry points, with weights read from a saved HF checkpoint."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving.decoder import Decoder, build_decoder

FAMILIES = ("gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "bloom")
TOL = 1e-4
PROMPT, STEPS, BATCH = 7, 8, 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_greedy(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """HF logits of the prefill and of STEPS greedy steps (its own KV cache), and all ids."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits = [out.logits]
        seq = ids
        for _ in range(STEPS):
            tok = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, tok], dim=1)
            out = model(tok, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return logits, seq


def ours(decoder: Decoder, seq: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Our logits along the same token sequence (teacher-forced on HF's greedy tokens)."""
    cache = decoder.new_cache(BATCH)
    chunks = [seq[:, :PROMPT]] + [seq[:, PROMPT + i : PROMPT + i + 1] for i in range(STEPS)]
    out, past = [], 0
    with torch.inference_mode():
        for ids in chunks:
            if mode == "eager":
                logits = decoder(ids, cache, past)
            elif mode == "static":
                logits = decoder.forward_static(ids, cache, torch.tensor(past))
            else:  # functional: the caller stores the new K/V
                logits, nk, nv = decoder.forward_with_cache(
                    ids, cache[:, 0], cache[:, 1], torch.tensor(past)
                )
                cache[:, 0, :, :, past : past + ids.shape[1]] = nk
                cache[:, 1, :, :, past : past + ids.shape[1]] = nv
            out.append(logits)
            past += ids.shape[1]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family: str, hf_dir: Any, tiny: dict[str, ModelSpec]) -> None:
    model, path = hf_dir(family)
    decoder = build_decoder(tiny[family], weights_path=str(path), max_context=32)
    ids = torch.randint(
        0, tiny[family].vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1)
    )
    ref, seq = hf_greedy(model, ids)
    for mode in ("eager", "static", "functional"):
        got = ours(decoder, seq, mode)
        errors = [rel_err(a, b) for a, b in zip(got, ref, strict=True)]
        assert max(errors) <= TOL, (mode, errors)
        # and the greedy choices agree at every step
        assert all(
            torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))
            for a, b in zip(got, ref, strict=True)
        )


def test_last_only_is_the_last_row(hf_dir: Any, tiny: dict[str, ModelSpec]) -> None:
    _, path = hf_dir("llama")
    dec = build_decoder(tiny["llama"], weights_path=str(path), max_context=16)
    ids = torch.arange(6).view(1, 6)
    with torch.inference_mode():
        full = dec(ids, dec.new_cache(1), 0)
        last = dec(ids, dec.new_cache(1), 0, last_only=True)
    assert last.shape == (1, 1, tiny["llama"].vocab)
    assert torch.allclose(full[:, -1:], last, rtol=1e-5, atol=1e-6)


def test_single_safetensors_file_with_hf_names(hf_dir: Any, tiny: dict[str, ModelSpec]) -> None:
    model, path = hf_dir("gpt2")
    dec = build_decoder(tiny["gpt2"], weights_path=str(path / "model.safetensors"))
    ids = torch.arange(5).view(1, 5)
    with torch.no_grad():
        ref = model(ids).logits
    with torch.inference_mode():
        assert rel_err(dec(ids, dec.new_cache(1), 0), ref) <= TOL


def test_native_state_dict_round_trip(tmp_path: Any, tiny: dict[str, ModelSpec]) -> None:
    from safetensors.torch import save_file

    spec = tiny["bloom"]
    a = build_decoder(spec, seed=5)
    save_file(
        {k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    b = build_decoder(spec, weights_path=str(tmp_path / "w.safetensors"))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_pytorch_bin_checkpoint(tmp_path: Any, hf_dir: Any, tiny: dict[str, ModelSpec]) -> None:
    model, _ = hf_dir("opt")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    dec = build_decoder(tiny["opt"], weights_path=str(tmp_path))
    ids = torch.arange(5).view(1, 5)
    with torch.no_grad():
        ref = model(ids).logits
    with torch.inference_mode():
        assert rel_err(dec(ids, dec.new_cache(1), 0), ref) <= TOL


def test_sharded_safetensors_checkpoint(
    tmp_path: Any, hf_dir: Any, tiny: dict[str, ModelSpec]
) -> None:
    model, _ = hf_dir("gpt_neox")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    dec = build_decoder(tiny["gpt_neox"], weights_path=str(tmp_path))
    ids = torch.arange(5).view(1, 5)
    with torch.no_grad():
        ref = model(ids).logits
    with torch.inference_mode():
        assert rel_err(dec(ids, dec.new_cache(1), 0), ref) <= TOL
