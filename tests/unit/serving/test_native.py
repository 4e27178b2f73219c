"""The native CPU kernels of the pytorch backend's decode step (decoder/kernels.c), built with
this machine's C compiler: they agree with ATen and with Hugging Face, are cached per
machine, and the backend's `kernels` option resolves, falls back and refuses as documented.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from idealrt.core import catalog
from idealrt.core.domain import Backend, ModelRef, StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving.backends import pytorch_backend as pt
from idealrt.services.serving.backends._onnx_cache import CACHE_ENV
from idealrt.services.serving.decoder import build_decoder
from idealrt.services.serving.decoder import native as native_mod
from idealrt.services.serving.decoder.native import NativeUnavailable, load_kernels
from idealrt.services.serving.hugepages import available as hugepages_available
from idealrt.services.serving.registry import ModelRegistry

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None,
    reason="no C compiler here: the native kernels cannot be built (the backend falls back "
    "to ATen, which every other serving test exercises)",
)

FAMILIES = ("gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "bloom")
TOL = 1e-4
HUGE = "on" if hugepages_available()[0] else "off"  # the backend's default, hugepages=auto


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> native_mod.NativeKernels:
    return load_kernels(tmp_path_factory.mktemp("native"))


def test_build_lands_in_the_cache_and_is_reused(tmp_path: Path) -> None:
    first = load_kernels(tmp_path)
    assert first.path.parent == tmp_path / "kernels" and first.path.exists()
    mtime = first.path.stat().st_mtime_ns
    assert load_kernels(tmp_path) is first
    native_mod._loaded.clear()  # a new process: loads the file, does not rebuild it
    again = load_kernels(tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.path.name]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("k", "n"), [(768, 2304), (3072, 768), (768, 50257), (5, 3), (33, 17)])
def test_gemv_matches_aten(kernels: native_mod.NativeKernels, k: int, n: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(k * n)
    x, w, b = torch.randn(1, k, generator=gen), torch.randn(k, n, generator=gen), torch.randn(n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert rel_err(kernels(x, w, None), x @ w) <= 1e-5
        assert rel_err(kernels(x, w, b), torch.addmm(b, x, w)) <= 1e-5
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "lo", "pos", "rot", "interleaved", "alibi"),
    [
        (12, 12, 64, 0, 511, 0, False, False),  # GPT-2 small at context 512
        (32, 8, 128, 0, 299, 128, False, False),  # Llama-style GQA, full rotary
        (8, 1, 64, 100, 228, 32, True, False),  # MQA, sliding window, partial GPT-J rotary
        (6, 3, 80, 0, 0, 0, False, True),  # first token, ALiBi, odd head size
        (5, 5, 64, 0, 40, 0, False, True),  # ALiBi
        (4, 2, 24, 3, 50, 0, False, False),  # head size not a multiple of 16 (padded chunk)
        (16, 16, 256, 0, 64, 64, True, False),  # GPT-J's head size, whole score blocks only
    ],
)
def test_attend_step_matches_aten(
    kernels: native_mod.NativeKernels,
    heads: int,
    kv_heads: int,
    d: int,
    lo: int,
    pos: int,
    rot: int,
    interleaved: bool,
    alibi: bool,
) -> None:
    from idealrt.services.serving.decoder import _ops

    gen = torch.Generator().manual_seed(heads + pos)
    cache = torch.randn(2, 1, kv_heads, 600, d, generator=gen) * 3  # peaky softmax too
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * d, generator=gen)
    q, k, v = qkv.view(1, heads + 2 * kv_heads, 1, d).split((heads, kv_heads, kv_heads), dim=1)
    rope = None
    if rot:
        cos, sin = _ops.rotary_tables(pos + 1, rot, 10000.0, interleaved=interleaved, device=None)
        rope = (cos[pos], sin[pos])
        turn = _ops.rotate_interleaved if interleaved else _ops.rotate_half

        def rotate(x: torch.Tensor) -> torch.Tensor:
            r, rest = x[..., :rot], x[..., rot:]
            return torch.cat((r * rope[0] + turn(r) * rope[1], rest), dim=-1)

        q, k = rotate(q), rotate(k)
    want_cache = cache.clone()
    want_cache[0, :, :, pos : pos + 1], want_cache[1, :, :, pos : pos + 1] = k, v
    bias = None
    slopes = _ops.alibi_slopes(heads).view(heads, 1, 1) if alibi else None
    if slopes is not None:
        bias = (slopes * torch.arange(lo, pos + 1).float()).view(1, kv_heads, -1, pos + 1 - lo)
        bias = bias.reshape(1, kv_heads, heads // kv_heads, pos + 1 - lo)
    qg = q.reshape(1, kv_heads, heads // kv_heads, d)
    want = F.scaled_dot_product_attention(
        qg,
        want_cache[0, :, :, lo : pos + 1],
        want_cache[1, :, :, lo : pos + 1],
        attn_mask=bias,
        scale=d**-0.5,
    ).reshape(1, 1, heads * d)
    got = kernels.attend_step(
        qkv,
        cache[0],
        cache[1],
        pos,
        lo,
        d**-0.5,
        heads=heads,
        rope=rope,
        interleaved=interleaved,
        alibi=slopes,
    )
    assert rel_err(got, want) <= 1e-5
    assert torch.allclose(cache, want_cache, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_decode_matches_transformers(
    family: str, hf_dir: Any, tiny: dict[str, ModelSpec], kernels: native_mod.NativeKernels
) -> None:
    """Batch 1, prefill then 8 greedy steps through the eager path with the native kernels
    (every family: rotary halves and interleaved, GQA, sliding window, ALiBi)."""
    model, path = hf_dir(family)
    dec = build_decoder(tiny[family], weights_path=str(path), max_context=32)
    dec.use_native(kernels)
    ids = torch.randint(0, tiny[family].vocab, (1, 7), generator=torch.Generator().manual_seed(2))
    cache, past = dec.new_cache(1), 0
    with torch.no_grad():
        ref = model(ids, use_cache=True)
    with torch.inference_mode():
        got = dec(ids, cache, past)
    assert rel_err(got, ref.logits) <= TOL
    seq, past = ids, 7
    for _ in range(8):
        tok = ref.logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, tok], dim=1)
        with torch.no_grad():
            ref = model(tok, past_key_values=ref.past_key_values, use_cache=True)
        with torch.inference_mode():
            got = dec(tok, cache, past)
        past += 1
        assert rel_err(got, ref.logits) <= TOL
        assert torch.equal(got[:, -1].argmax(-1), ref.logits[:, -1].argmax(-1))


def test_native_is_not_used_while_compiling_or_for_batches(
    tiny: dict[str, ModelSpec], kernels: native_mod.NativeKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    class Spy:
        def __call__(self, x: torch.Tensor, w: torch.Tensor, b: Any) -> torch.Tensor:
            calls.append("gemv")
            return kernels(x, w, b)

        def attend_step(self, *args: Any, **kw: Any) -> torch.Tensor:
            calls.append("attend")
            return kernels.attend_step(*args, **kw)

    dec = build_decoder(tiny["gpt2"], max_context=16)
    dec.use_native(Spy())
    with torch.inference_mode():
        dec(torch.tensor([[1, 2]]), dec.new_cache(1), 0)  # prefill: 2 rows
        assert calls == []
        dec(torch.tensor([[3], [4]]), dec.new_cache(2), 2)  # batch 2
        assert calls == []
        dec(torch.tensor([[3]]), dec.new_cache(1), 2)
    assert "gemv" in calls and "attend" in calls
    calls.clear()
    # Under torch.compile / torch.export the guard reads torch.compiler.is_compiling(); a
    # real compile of the decoder takes minutes here, so the flag is set directly.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.inference_mode():
        dec(torch.tensor([[3]]), dec.new_cache(1), 2)
    assert calls == []


def test_backend_resolves_auto_to_native_and_records_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    registry = ModelRegistry()
    loaded = registry.load(ModelRef(name="tiny-gpt2"), StackSpec(Backend.PYTORCH), 32)
    assert loaded.stack.options == {"kernels": "native", "hugepages": HUGE}
    assert loaded.memory.resolved_options == {"kernels": "native", "hugepages": HUGE}
    r = registry.generate(loaded.model_id, prompt_ids=list(range(5)), output_tokens=4)
    assert r.output_tokens == 4
    registry.unload(loaded.model_id)
    aten = pt.create_backend()
    mem = aten.load(
        catalog.resolve("tiny-gpt2"),
        StackSpec(Backend.PYTORCH, options={"kernels": "aten"}),
        "",
        0,
        32,
    )
    assert mem.resolved_options == {"hugepages": HUGE}
    aten.unload()


def test_backend_prefill_is_aten_and_decode_is_native(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A 1-token prompt is prefilled on ATen like any other (alpha(p) has no step between
    p = 1 and 2); only the decode steps call the kernels."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    backend = pt.create_backend()
    backend.load(catalog.resolve("tiny-gpt2"), StackSpec(Backend.PYTORCH), "", 0, 32)
    kernels = backend._native
    assert kernels is not None
    calls: list[int] = []

    class Counting:
        def __call__(self, x: torch.Tensor, w: torch.Tensor, b: Any) -> torch.Tensor:
            calls.append(1)
            return kernels(x, w, b)

        def attend_step(self, *args: Any, **kw: Any) -> torch.Tensor:
            return kernels.attend_step(*args, **kw)

    backend._native = Counting()
    for p in (1, 2):
        backend.generate(list(range(p)), 1)
        assert calls == [], p
    backend.generate([1], 3)
    layers = catalog.resolve("tiny-gpt2").layers
    assert len(calls) == 2 * (4 * layers + 1)  # 2 steps x (qkv, out, up, down per layer + head)
    backend.unload()


def test_backend_without_a_compiler_falls_back_or_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    spec = catalog.resolve("tiny-gpt2")
    backend = pt.create_backend()
    mem = backend.load(spec, StackSpec(Backend.PYTORCH), "", 0, 32)
    assert mem.resolved_options == {"kernels": "aten", "hugepages": HUGE}
    assert backend.generate([1, 2, 3], 3).output_tokens == 3
    backend.unload()
    with pytest.raises(FailedPrecondition) as err:
        pt.create_backend().load(
            spec, StackSpec(Backend.PYTORCH, options={"kernels": "native"}), "", 0, 32
        )
    assert err.value.reason == "NATIVE_KERNELS_UNAVAILABLE"
    assert "no-such-cc" in err.value.message


def test_a_failing_compile_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", "false")
    with pytest.raises(NativeUnavailable, match="failed"):
        load_kernels(tmp_path)
    assert not list((tmp_path / "kernels").glob("*.so"))


@pytest.mark.parametrize(
    ("options", "dtype"),
    [({"kernels": "fast"}, "fp32"), ({"kernels": "native"}, "bf16")],
)
def test_bad_kernel_options_name_the_field(options: dict[str, str], dtype: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        pt.create_backend().load(
            catalog.resolve("tiny-gpt2"),
            StackSpec(Backend.PYTORCH, dtype=dtype, options=options),
            "",
            0,
            32,
        )
    assert err.value.reason == "OPTION_INVALID" and err.value.field == "stack.options"
    assert "kernels" in err.value.message
