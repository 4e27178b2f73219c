"""The decoder's construction: seeded init, planned bytes, dtypes, weight errors, HF configs,
ONNX export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from idealrt.core import catalog
from idealrt.core.errors import InvalidArgument
from idealrt.core.hf_config import spec_from_hf_config
from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving import decoder as decoder_pkg
from idealrt.services.serving.decoder import (
    TORCH_DTYPES,
    build_decoder,
    planned_bytes,
    torch_dtype,
)
from idealrt.services.serving.decoder.export import input_names, past_names
from idealrt.services.serving.decoder.hf_convert import hf_config, hf_config_dict

FAMILIES = ("gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "bloom")


def test_all_is_what_it_claims() -> None:
    for name in decoder_pkg.__all__:
        assert hasattr(decoder_pkg, name), name


def test_seeded_init_is_deterministic_and_seed_dependent(tiny: dict[str, ModelSpec]) -> None:
    spec = tiny["gpt2"]
    a, b, c = (build_decoder(spec, seed=s) for s in (7, 7, 8))
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if "norm_w" in name:
            assert torch.all(pa == 1.0)
        elif pa.dim() == 1:
            assert torch.all(pa == 0.0)
        else:
            assert not torch.equal(pa, pc), name
    assert abs(float(a.head_w.std()) - 0.02) < 0.002


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mistral"])
def test_planned_bytes_match_spec_formulas(family: str, tiny: dict[str, ModelSpec]) -> None:
    spec = tiny[family]
    for dtype in ("fp32", "bf16"):
        weights, kv = planned_bytes(spec, TORCH_DTYPES[dtype], 48, batch_size=3)
        assert weights == spec.weight_bytes(dtype)
        assert kv == spec.kv_cache_bytes(48, dtype, batch=3)


def test_planned_bytes_of_catalog_gpt2_without_allocating() -> None:
    spec = catalog.resolve("gpt2")
    weights, kv = planned_bytes(spec, torch.float16, 0)
    assert weights == spec.weight_bytes("fp16") == 2 * 124_439_808
    assert kv == spec.kv_cache_bytes(spec.max_positions, "fp16")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_tracks_fp32(dtype: str, tiny: dict[str, ModelSpec]) -> None:
    spec = tiny["llama"]
    ref = build_decoder(spec, seed=3)
    half = build_decoder(spec, seed=3, dtype=torch_dtype(dtype))
    with torch.no_grad():
        half.load_state_dict({k: v.to(half.dtype) for k, v in ref.state_dict().items()})
    ids = torch.arange(9).view(1, 9)
    with torch.inference_mode():
        a = ref(ids, ref.new_cache(1), 0)
        b = half(ids, half.new_cache(1), 0)
    assert b.dtype == TORCH_DTYPES[dtype]
    assert float((a - b.float()).abs().max() / a.abs().max()) < 0.05


def test_unknown_dtype_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as e:
        torch_dtype("int4")
    assert e.value.reason == "DTYPE_UNSUPPORTED" and e.value.field == "stack.dtype"


def test_positions_beyond_max_context_are_refused(tiny: dict[str, ModelSpec]) -> None:
    dec = build_decoder(tiny["gpt2"], max_context=8)
    with torch.inference_mode(), pytest.raises(ValueError):
        dec(torch.zeros(1, 4, dtype=torch.int64), dec.new_cache(1), 6)
    with pytest.raises(ValueError):
        build_decoder(tiny["gpt2"], max_context=tiny["gpt2"].max_positions + 1)


def test_weights_of_another_shape_are_refused(hf_dir: Any, tiny: dict[str, ModelSpec]) -> None:
    _, gpt2_dir = hf_dir("gpt2")
    wider = tiny["gpt2"].replace(d_ff=96)
    with pytest.raises(InvalidArgument) as e:
        build_decoder(wider, weights_path=str(gpt2_dir))
    assert e.value.reason == "WEIGHTS_MISMATCH" and e.value.field == "model.weights_path"
    _, llama_dir = hf_dir("llama")
    with pytest.raises(InvalidArgument) as e:
        build_decoder(tiny["gpt2"], weights_path=str(llama_dir))
    assert e.value.reason == "WEIGHTS_MISMATCH"


def test_missing_weights_are_not_found(tmp_path: Path, tiny: dict[str, ModelSpec]) -> None:
    for path in (tmp_path / "absent", tmp_path):
        with pytest.raises(InvalidArgument) as e:
            build_decoder(tiny["gpt2"], weights_path=str(path))
        assert e.value.reason == "WEIGHTS_NOT_FOUND"


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trips_through_core_hf_config(
    family: str, tiny: dict[str, ModelSpec]
) -> None:
    spec = tiny[family]
    assert hf_config_dict(spec)["model_type"] == family
    back = spec_from_hf_config(hf_config(spec).to_dict(), name=spec.name)
    assert back.spec_hash() == spec.spec_hash(), (back, spec)


def test_spec_without_hf_equivalent_is_refused(tiny: dict[str, ModelSpec]) -> None:
    with pytest.raises(InvalidArgument) as e:
        hf_config_dict(tiny["bloom"].replace(d_ff=100))
    assert e.value.reason == "SPEC_NOT_EXPRESSIBLE"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_onnx_export_runs_in_onnxruntime(
    family: str, tmp_path: Path, tiny: dict[str, ModelSpec]
) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from idealrt.services.serving.decoder import export_onnx

    dec = build_decoder(tiny[family], max_context=16, seed=2)
    export_onnx(dec, tmp_path / "step.onnx")
    sess = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    layers = tiny[family].layers
    assert [i.name for i in sess.get_inputs()] == list(input_names(layers))
    cache = dec.new_cache(2)
    ids = torch.randint(0, tiny[family].vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref_prefill = dec(ids, cache, 0, last_only=True)
        ref_step = dec(ids[:, :1], cache, 5, last_only=True)
    # static buffer of max_context slots, the caller storing the new K/V between calls
    k = torch.zeros_like(cache[:, 0]).numpy()
    v = k.copy()
    keys, values = past_names(layers)
    past = {**dict(zip(keys, k, strict=True)), **dict(zip(values, v, strict=True))}
    feeds = {"input_ids": ids.numpy(), **past, "position": torch.tensor(0).numpy()}
    logits, nk, nv = sess.run(None, feeds)
    assert float(abs(logits - ref_prefill.numpy()).max()) < 1e-4
    k[:, :, :, :5], v[:, :, :, :5] = nk, nv  # the per-layer feeds are views of k and v
    feeds = {"input_ids": ids[:, :1].numpy(), **past, "position": torch.tensor(5).numpy()}
    logits, _, _ = sess.run(None, feeds)
    assert float(abs(logits - ref_step.numpy()).max()) < 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_onnx_step_reads_the_past_in_place(
    family: str, tmp_path: Path, tiny: dict[str, ModelSpec]
) -> None:
    """Each layer's past K/V is its own input, consumed only by the attention products (K
    through a transpose the product absorbs): nothing gathers, slices or concatenates the
    cache (see test_onnxruntime_backend for the graph ONNX Runtime actually runs)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from idealrt.services.serving.decoder import export_onnx

    export_onnx(build_decoder(tiny[family], max_context=16, seed=2), tmp_path / "step.onnx")
    graph = onnx.load(str(tmp_path / "step.onnx"), load_external_data=False).graph
    keys, values = past_names(tiny[family].layers)
    assert [o.name for o in graph.output] == ["logits", "new_k", "new_v"]
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for name in (*keys, *values):
        ops = [op for op in consumers[name] if op != "Shape"]
        assert ops == (["Transpose"] if name in keys else ["MatMul"]), (name, ops)
    transposed = {
        n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in keys
    }
    assert all(consumers[t] == ["MatMul"] for t in transposed)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama", "mistral"])
def test_fused_step_eager_is_the_plain_step(family: str, tiny: dict[str, ModelSpec]) -> None:
    """`gqa_step`'s eager math (what the fused ONNX node stands for) gives the plain step's
    logits and writes the plain step's new K/V into the present at their slots: a prompt of
    7 (longer than mistral's window of 6), then 3 single-token steps, batch 2."""
    from idealrt.services.serving.decoder.export import DecoderStep

    spec = tiny[family]
    dec = build_decoder(spec, max_context=32, seed=4)
    plain, fused = DecoderStep(dec), DecoderStep(dec, fused=True)
    gen = torch.Generator().manual_seed(1)
    shape = (2, dec.kv_heads, 32, dec.head_dim)
    pk = [torch.zeros(shape) for _ in range(spec.layers)]
    pv = [torch.zeros(shape) for _ in range(spec.layers)]
    pos, ids = 0, torch.randint(0, spec.vocab, (2, 7), generator=gen)
    with torch.inference_mode():
        for _ in range(4):
            t = ids.shape[1]
            out = fused(ids, pk, pv, torch.tensor(pos))
            ref, nk, nv = plain(
                ids, [k[:, :, :pos] for k in pk], [v[:, :, :pos] for v in pv], torch.tensor(pos)
            )
            assert float((out[0] - ref).abs().max() / ref.abs().max()) < 1e-5
            pk, pv = list(out[1 : 1 + spec.layers]), list(out[1 + spec.layers :])
            for i in range(spec.layers):
                # (rotary on another memory layout may round differently: 1 ulp-ish)
                torch.testing.assert_close(pk[i][:, :, pos : pos + t], nk[i], rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(pv[i][:, :, pos : pos + t], nv[i], rtol=1e-6, atol=1e-7)
                assert not pk[i][:, :, pos + t :].any()  # nothing written beyond
            pos += t
            ids = torch.randint(0, spec.vocab, (2, 1), generator=gen)
