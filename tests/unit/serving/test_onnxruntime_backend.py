"""The onnxruntime backend: exact counts and timing fields, the on-disk export cache (hits,
keys, atomic and concurrent writes), provider fallback detection, dtype/option/memory
refusals before any export, and the KV buffers that feed the step graph."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from idealrt.core.domain import Backend, ModelRef, StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving import decoder as decoder_pkg
from idealrt.services.serving.backends import _kv_buffers as kvb
from idealrt.services.serving.backends import _onnx_cache as oc
from idealrt.services.serving.backends import base
from idealrt.services.serving.backends import onnxruntime_backend as ob
from idealrt.services.serving.decoder import fused_attention as fa
from idealrt.services.serving.decoder.export import past_names
from idealrt.services.serving.registry import BackendTable, ModelRegistry

ort = pytest.importorskip("onnxruntime")

# The dynamo exporter's own noise (torch internals), raised while exporting tiny models.
EXPORT_NOISE = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning"),
]
pytestmark = EXPORT_NOISE

ORT = StackSpec(Backend.ONNXRUNTIME)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idealrt-cache")


def load(spec: ModelSpec, cache: Path, stack: StackSpec = ORT, seed: int = 0) -> Any:
    backend = ob.OnnxRuntimeBackend(cache)
    backend.load(spec, stack, "", seed, 32)
    return backend


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "onnx").glob("*") if p.is_dir())


def test_all_is_what_it_claims() -> None:
    for module in (ob, oc):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)


@pytest.mark.parametrize(
    ("stack", "buffers"),
    [
        (ORT, 1),  # auto: fused attention, one static cache written in place
        (StackSpec(Backend.ONNXRUNTIME, options={"attention": "onnx"}), 2),  # double-buffered
    ],
    ids=["fused", "onnx"],
)
def test_exact_counts_and_timing_fields(
    stack: StackSpec, buffers: int, cache_dir: Path, tiny: dict[str, ModelSpec]
) -> None:
    spec = tiny["gpt2"]
    backend = ob.OnnxRuntimeBackend(cache_dir)
    mem = backend.load(spec, stack, "", 0, 32)
    assert mem.weights_bytes == spec.weight_bytes("fp32")
    assert mem.kv_cache_bytes == buffers * spec.kv_cache_bytes(32, "fp32")
    assert 0 < mem.device_free_bytes <= mem.device_total_bytes
    for p, o, batch in ((5, 7, 1), (1, 1, 1), (30, 2, 1), (4, 6, 3)):
        r = backend.generate(list(range(p)), o, batch)
        assert (r.prompt_tokens, r.output_tokens, r.batch_size) == (p, o, batch)
        assert len(r.output_ids) == o and len(r.decode_ns) == o - 1
        assert r.total_ns == r.prefill_ns + sum(r.decode_ns)
        assert r.prefill_ns > 0 and all(d > 0 for d in r.decode_ns)
        assert r.start_time.tzinfo is not None
        assert all(0 <= t < spec.vocab for t in r.output_ids)
    # every batch row has the same prompt, so batch 3 and batch 1 agree
    assert backend.generate([4, 1, 2], 5, 3).output_ids == backend.generate([4, 1, 2], 5).output_ids
    backend.unload()
    with pytest.raises(FailedPrecondition) as e:
        backend.generate([1], 1)
    assert e.value.reason == "MODEL_NOT_LOADED"


def test_second_load_hits_the_cache(
    cache_dir: Path, tiny: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, seed = tiny["gpt2"], 1234  # a key no other test uses
    first = load(spec, cache_dir, seed=seed)
    assert first.export is not None and not first.export.hit and first.export.export_ns > 0
    path = first.export.path
    mtime = path.stat().st_mtime_ns
    tokens = first.generate([3, 1, 4], 6).output_ids

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(decoder_pkg, "export_onnx", no_export)
    second = load(spec, cache_dir, seed=seed)
    assert second.export is not None and second.export.hit and second.export.export_ns == 0
    assert second.export.path == path and path.stat().st_mtime_ns == mtime
    assert second.generate([3, 1, 4], 6).output_ids == tokens
    with pytest.raises(FailedPrecondition) as e:
        second.load(spec, ORT, "", seed, 32)
    assert e.value.reason == "ALREADY_LOADED"


def test_cache_key_changes_with_spec_dtype_weights(
    tmp_path: Path, tiny: dict[str, ModelSpec]
) -> None:
    spec = tiny["gpt2"]
    seeded = oc.weights_identity("", 0, "cpu")

    def digest(s: ModelSpec = spec, dtype: str = "fp32", weights: str = seeded) -> str:
        return oc.export_key(s, dtype, weights).digest()

    base_key = digest()
    assert digest() == base_key  # deterministic
    assert digest(spec.replace(name="renamed")) == base_key  # the shape, not the name
    others = {
        digest(spec.replace(layers=3)),
        digest(tiny["llama"]),
        digest(dtype="fp16"),
        digest(weights=oc.weights_identity("", 1, "cpu")),
        digest(weights=oc.weights_identity("", 0, "cuda")),
    }
    assert base_key not in others and len(others) == 5
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    before = oc.weights_identity(str(tmp_path), 0, "cpu")
    assert before == oc.weights_identity(str(tmp_path), 7, "cuda")  # files, not seed
    weights.write_bytes(b"xy")
    assert oc.weights_identity(str(tmp_path), 0, "cpu") != before
    key = oc.export_key(spec, "fp32", seeded)
    assert key.torch == torch.__version__ and key.opset.isdigit()


def test_cache_root_follows_the_environment(tmp_path: Path) -> None:
    assert oc.cache_root({oc.CACHE_ENV: str(tmp_path)}) == tmp_path
    assert oc.cache_root({}) == Path.home() / ".cache" / "idealrt"


def _key(n: int = 0) -> oc.ExportKey:
    return oc.ExportKey("spec", "fp32", f"seed:{n}", "t", "e", "20", "c")


def _fake_export(calls: list[int], delay: float = 0.0) -> Any:
    def export(path: Path) -> None:
        calls.append(1)
        path.write_bytes(b"onnx")
        (path.parent / "model.onnx.data").write_bytes(b"weights")
        time.sleep(delay)

    return export


def test_concurrent_exporters_of_one_key_export_once(tmp_path: Path) -> None:
    calls: list[int] = []
    results: list[oc.CachedExport] = []
    export = _fake_export(calls, delay=0.2)
    threads = [
        threading.Thread(target=lambda: results.append(oc.cached_export(tmp_path, _key(), export)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert sorted(r.hit for r in results) == [False, True, True]
    assert len({r.path for r in results}) == 1
    assert (results[0].path.parent / "model.onnx.data").read_bytes() == b"weights"
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.name.endswith(".tmp")]


def test_failed_export_leaves_no_entry(tmp_path: Path) -> None:
    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError):
        oc.cached_export(tmp_path, _key(), broken)
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [f"{_key().digest()}.lock"]
    calls: list[int] = []
    assert not oc.cached_export(tmp_path, _key(), _fake_export(calls)).hit
    assert calls == [1]


def test_losing_a_rename_race_uses_the_winners_entry(tmp_path: Path) -> None:
    """A writer that the lock did not stop (another host on a network filesystem) finished
    first: our rename fails and the finished entry is used; our temporary is removed."""
    entry = tmp_path / "onnx" / _key().digest()

    def export_while_another_wins(path: Path) -> None:
        path.write_bytes(b"mine")
        entry.mkdir()
        (entry / "model.onnx").write_bytes(b"theirs")

    got = oc.cached_export(tmp_path, _key(), export_while_another_wins)
    assert got.hit and got.path.read_bytes() == b"theirs"
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(
        [entry.name, f"{entry.name}.lock"]
    )


def test_cached_file_writes_once(tmp_path: Path) -> None:
    path = tmp_path / "trt" / "x.engine"
    assert oc.cached_file(path, lambda: b"engine") == (b"engine", False)

    def again() -> bytes:
        raise AssertionError("rebuilt")

    assert oc.cached_file(path, again) == (b"engine", True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.engine", "x.engine.lock"]


# ---- refusals: all before any export ----
def _identity_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.filterwarnings(
    "ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names"
)
def test_silent_cpu_fallback_is_provider_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu lists CUDAExecutionProvider yet runs the session on the CPU when the
    CUDA libraries are missing; here the CPU-only build is made to claim CUDA, and the
    session it creates falls back the same way."""
    monkeypatch.setattr(
        ob.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(FailedPrecondition) as e:
        ob.make_session(
            _identity_model(tmp_path / "id.onnx"), torch.device("cuda", 0), ob.OrtOptions()
        )
    assert e.value.reason == "PROVIDER_UNAVAILABLE" and "CUDAExecutionProvider" in e.value.message


def test_cuda_on_cpu_only_onnxruntime_fails_through_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(oc.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(ob, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(ob.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(FailedPrecondition) as e:
        ModelRegistry().load(ModelRef(name="tiny-gpt2"), StackSpec(Backend.ONNXRUNTIME, "cuda"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.reason == "PROVIDER_UNAVAILABLE" and "CUDAExecutionProvider" in e.value.message
    assert not (tmp_path / "onnx").exists()  # refused before exporting anything


@pytest.mark.parametrize(
    ("stack", "reason"),
    [
        (StackSpec(Backend.ONNXRUNTIME, dtype="fp16"), "DTYPE_UNSUPPORTED"),
        (StackSpec(Backend.ONNXRUNTIME, dtype="bf16"), "DTYPE_UNSUPPORTED"),
        (StackSpec(Backend.ONNXRUNTIME, options={"cuda_graphs": "1"}), "OPTION_UNKNOWN"),
        (StackSpec(Backend.ONNXRUNTIME, options={"kv_bucket": "0"}), "OPTION_INVALID"),
        (StackSpec(Backend.ONNXRUNTIME, options={"threads": "two"}), "OPTION_INVALID"),
        (StackSpec(Backend.ONNXRUNTIME, options={"spinning": "yes"}), "OPTION_INVALID"),
        (StackSpec(Backend.ONNXRUNTIME, options={"attention": "flash"}), "OPTION_INVALID"),
        (
            StackSpec(Backend.ONNXRUNTIME, options={"attention": "fused", "kv_bucket": "8"}),
            "OPTION_INVALID",
        ),
    ],
)
def test_invalid_stacks_are_refused_before_export(
    stack: StackSpec, reason: str, tmp_path: Path, tiny: dict[str, ModelSpec]
) -> None:
    with pytest.raises(InvalidArgument) as e:
        ob.OnnxRuntimeBackend(tmp_path).load(tiny["gpt2"], stack, "", 0, 32)
    assert e.value.reason == reason
    assert not (tmp_path / "onnx").exists()


def test_model_too_large_is_refused_before_export(
    tmp_path: Path, tiny: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "device_memory", lambda device: (1 << 30, 1000))
    with pytest.raises(ResourceExhausted) as e:
        ob.OnnxRuntimeBackend(tmp_path).load(tiny["gpt2"], ORT, "", 0, 32)
    assert e.value.reason == "MODEL_TOO_LARGE"
    assert not (tmp_path / "onnx").exists()


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    monkeypatch.delitem(sys.modules, ob.__name__)
    with pytest.raises(FailedPrecondition) as e:
        BackendTable().factory(Backend.ONNXRUNTIME)
    assert e.value.reason == "DEPENDENCY_MISSING" and "idealrt[onnx]" in e.value.message


def test_options_parse() -> None:
    opts = ob.OrtOptions.parse(
        StackSpec(Backend.ONNXRUNTIME, options={"threads": "2", "kv_bucket": "8", "spinning": "1"})
    )
    assert opts == ob.OrtOptions(threads=2, kv_bucket=8, spinning=True, bucket_given=True)
    assert ob.OrtOptions.parse(ORT) == ob.OrtOptions(0, kvb.DEFAULT_BUCKET, False)
    fused = StackSpec(Backend.ONNXRUNTIME, options={"attention": " Fused "})
    assert ob.OrtOptions.parse(fused).attention == "fused"
    assert ob.OrtOptions.parse(ORT).attention == "auto"


@pytest.mark.parametrize(
    ("family", "options", "resolved"),
    [
        ("gpt2", {}, "fused"),
        ("llama", {}, "fused"),
        ("bloom", {}, "onnx"),  # ALiBi: GroupQueryAttention has no such bias
        ("gpt2", {"kv_bucket": "4"}, "onnx"),  # the bucketed past is the onnx flavour's
        ("gpt2", {"attention": "onnx"}, "onnx"),
    ],
)
def test_auto_attention_resolves_and_is_recorded(
    family: str,
    options: dict[str, str],
    resolved: str,
    cache_dir: Path,
    tiny: dict[str, ModelSpec],
) -> None:
    backend = ob.OnnxRuntimeBackend(cache_dir)
    report = backend.load(tiny[family], StackSpec(Backend.ONNXRUNTIME, options=options), "", 0, 32)
    assert report.resolved_options["attention"] == resolved
    assert backend.generate([1, 2, 3], 4).output_tokens == 4
    backend.unload()


def test_fused_attention_where_it_cannot_run(tmp_path: Path, tiny: dict[str, ModelSpec]) -> None:
    """ALiBi (no such bias in GroupQueryAttention) is refused with the reason, before any
    export; so would CUDA and non-fp32 be (the CUDA kernel is fp16/bf16 and unverified)."""
    stack = StackSpec(Backend.ONNXRUNTIME, options={"attention": "fused"})
    with pytest.raises(FailedPrecondition) as e:
        ob.OnnxRuntimeBackend(tmp_path).load(tiny["bloom"], stack, "", 0, 32)
    assert e.value.reason == "FUSED_ATTENTION_UNAVAILABLE" and "ALiBi" in e.value.message
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not (tmp_path / "onnx").exists()
    assert "CPU provider" in (fa.unsupported(tiny["gpt2"], "cuda", "fp16") or "")
    assert "fp32" in (fa.unsupported(tiny["gpt2"], "cpu", "fp16") or "")
    assert fa.unsupported(tiny["mistral"], "cpu", "fp32") is None


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_fused_graph_is_one_attention_node_a_layer_on_a_static_cache(
    family: str, cache_dir: Path, tiny: dict[str, ModelSpec]
) -> None:
    """The fused export (its own cache entry) has one GroupQueryAttention per layer, fed
    each layer's past directly and giving that layer's present; the backend binds past and
    present to one static max_context buffer, so generation never copies or rebinds the
    cache, and the bytes reported are one cache (the bucketed flavour holds two)."""
    onnx = pytest.importorskip("onnx")
    spec = tiny[family]
    fused = oc.export_decoder(
        spec,
        "fp32",
        seed=0,
        weights_path="",
        init_device=torch.device("cpu"),
        root=cache_dir,
        fused=True,
    )
    plain = oc.export_decoder(
        spec, "fp32", seed=0, weights_path="", init_device=torch.device("cpu"), root=cache_dir
    )
    assert fused.path != plain.path
    graph = onnx.load(str(fused.path), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == spec.layers and all(n.domain == "com.microsoft" for n in nodes)
    keys, values = past_names(spec.layers)
    for i, node in enumerate(nodes):
        assert (node.input[3], node.input[4]) == (keys[i], values[i])
        assert list(node.output[1:]) == [f"present_k_{i}", f"present_v_{i}"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["local_window_size"] == (spec.sliding_window or -1)
        assert attrs["kv_num_heads"] == spec.kv_heads_effective
    stack = StackSpec(Backend.ONNXRUNTIME, options={"attention": "fused"})
    backend = load(spec, cache_dir, stack)
    bucketed = load(spec, cache_dir, StackSpec(Backend.ONNXRUNTIME, options={"attention": "onnx"}))
    assert 2 * backend._kv.nbytes == bucketed._kv.nbytes
    k0 = backend._kv.view(0, 32)[0][0]
    before = k0.copy()
    backend.generate([1, 2, 3], 5)
    written = np.flatnonzero(np.any(k0 != before, axis=(0, 1, 3)))
    assert list(written) == list(range(3 + 5 - 1))  # the prompt's slots and 4 decoded ones


def test_loads_and_generates_through_the_registry(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(oc.CACHE_ENV, str(cache_dir))
    reg = ModelRegistry()
    stack = StackSpec(Backend.ONNXRUNTIME, options={"threads": "1", "kv_bucket": "4"})
    m = reg.load(ModelRef(name="tiny-gpt2", seed=3), stack, max_context=40)
    r = reg.generate(m.model_id, prompt_length=9, output_tokens=20)
    assert (r.prompt_tokens, r.output_tokens, len(r.decode_ns)) == (9, 20, 19)
    reg.close()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_session_reads_each_layers_past_in_place(
    family: str, cache_dir: Path, tmp_path: Path, tiny: dict[str, ModelSpec]
) -> None:
    """In the graph the backend's session runs (after ONNX Runtime's optimizations), every
    per-layer past input feeds only matrix products (no Gather/Slice/Concat/Transpose copies
    the cache), and q @ K^T keeps alpha 1 (MLAS's one-row kernel, not a packing GEMM)."""
    onnx = pytest.importorskip("onnx")
    spec = tiny[family]
    export = oc.export_decoder(
        spec, "fp32", seed=0, weights_path="", init_device=torch.device("cpu"), root=cache_dir
    )
    optimized = tmp_path / "optimized.onnx"
    ob.make_session(
        export.path, torch.device("cpu"), ob.OrtOptions(threads=1), optimized_path=optimized
    )
    graph = onnx.load(str(optimized), load_external_data=False).graph
    keys, values = past_names(spec.layers)
    uses: dict[str, list[Any]] = {name: [] for name in (*keys, *values)}
    for node in graph.node:
        for name in node.input:
            if name in uses:
                uses[name].append(node)
    for name, nodes in uses.items():
        products = [n for n in nodes if n.op_type != "Shape"]
        assert len(products) == 1, (name, [n.op_type for n in nodes])
        node = products[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if name in values:
            assert node.op_type == "MatMul" and list(node.input).index(name) == 1
        else:  # q @ K^T: the transpose fused into the product, no scale folded in
            assert node.op_type in ("MatMul", "FusedMatMul"), node.op_type
            assert attrs.get("alpha", 1.0) == 1.0 and attrs.get("transA", 0) == 0, attrs


# ---- KV buffers ----
def _zeros(lib: str) -> Any:
    if lib == "numpy":
        return lambda n: np.zeros(n, np.float32)
    return lambda n: torch.zeros(n)


def _stacked(views: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(v) for v in views])


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("bucket", "max_context", "p"), [(1, 9, 1), (2, 12, 3), (4, 30, 5), (8, 30, 16), (64, 30, 4)]
)
def test_kv_buffers_hold_every_token_and_grow_in_buckets(
    lib: str, bucket: int, max_context: int, p: int
) -> None:
    layers, batch, kv, hd = 3, 2, 3, 4
    bufs = kvb.KVBuffers(layers, batch, kv, hd, max_context, bucket, _zeros(lib), align=16)
    per_layer = batch * kv * max_context * hd
    assert bufs.stride == -(-per_layer // 16) * 16
    assert bufs.nbytes == 4 * layers * bufs.stride * 4
    rng = np.random.default_rng(0)
    ref = np.zeros((2, layers, batch, kv, max_context, hd), np.float32)

    def as_lib(a: np.ndarray) -> Any:
        return a.copy() if lib == "numpy" else torch.from_numpy(a.copy())

    prompt = rng.standard_normal((2, layers, batch, kv, p, hd), dtype=np.float32)
    out_k, out_v = bufs.prefill_outputs(p)
    assert tuple(out_k.shape) == (layers, batch, kv, p, hd)
    out_k[...], out_v[...] = as_lib(prompt[0]), as_lib(prompt[1])
    ref[:, :, :, :, :p] = prompt
    bufs.after_prefill(p)
    caps = []
    for pos in range(p, max_context):
        past_k, past_v = bufs.past()
        assert len(past_k) == len(past_v) == layers
        cap = past_k[0].shape[2]
        assert all(tuple(t.shape) == (batch, kv, cap, hd) for t in (*past_k, *past_v))
        caps.append(cap)
        assert pos <= cap <= max_context
        if bucket < max_context:
            assert cap - pos < 2 * bucket
        else:
            assert cap == max_context  # static window
        np.testing.assert_array_equal(_stacked(past_k)[..., :pos, :], ref[0, ..., :pos, :])
        np.testing.assert_array_equal(_stacked(past_v)[..., :pos, :], ref[1, ..., :pos, :])
        new = rng.standard_normal((2, layers, batch, kv, 1, hd), dtype=np.float32)
        ref[:, :, :, :, pos : pos + 1] = new
        changed = bufs.store(pos, as_lib(new[0]), as_lib(new[1]))
        assert changed == (bufs.past()[0][0].shape[2] != cap)
    assert caps == sorted(caps) and caps[-1] >= max_context - 1
    assert all(c % bucket == 0 or c == max_context for c in caps)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_kv_buffer_layer_views_are_aligned_and_do_not_move(lib: str) -> None:
    """Each layer's view is dense, starts at a multiple of `align` elements from one of four
    allocations (TensorRT wants 256-byte aligned addresses) and keeps its address whatever
    the capacity; the strided all-layer view used by `store` is a view of the same memory."""
    bufs = kvb.KVBuffers(3, 1, 2, 8, 13, 4, _zeros(lib), align=64)

    def address(a: Any) -> int:
        return int(a.ctypes.data) if lib == "numpy" else int(a.data_ptr())

    bases = set()
    for slot in (0, 1):
        ks, vs = bufs.view(slot, 13)
        k0, v0 = ks[0], vs[0]
        bases |= {address(k0), address(v0)}
        for cap in (1, 3, 13):
            for layer, (k, v) in enumerate(zip(*bufs.view(slot, cap), strict=True)):
                for a, first in ((k, k0), (v, v0)):
                    assert a.flags.c_contiguous if lib == "numpy" else a.is_contiguous()
                    assert address(a) - address(first) == layer * bufs.stride * 4
                    assert bufs.stride % 64 == 0
        grid_k, _ = bufs._grid(slot, 5)
        grid_k[2, 1, 4] = 7.0
        assert float(bufs.view(slot, 5)[0][2][0, 1, 4, 0]) == 7.0
    assert len(bases) == 4


class _TorchOnCpuIo(ob.CudaIo):
    """The CUDA path's torch-tensor buffers, placed in host memory so that the CPU build
    of ONNX Runtime can run them."""

    device_type = "cpu"


def test_the_torch_buffer_path_matches_the_numpy_path(
    cache_dir: Path, tiny: dict[str, ModelSpec]
) -> None:
    spec = tiny["llama"]
    stack = StackSpec(Backend.ONNXRUNTIME, options={"kv_bucket": "3"})
    backend = ob.OnnxRuntimeBackend(cache_dir)
    backend.load(spec, stack, "", 0, 32)
    expected = backend.generate([9, 8, 7, 6], 15, 2)
    expected_logits = backend.last_logits()
    backend._io = _TorchOnCpuIo(np.float32, torch.device("cpu"), torch.float32)
    backend._batch = 0  # buffers are made again, as torch tensors
    got = backend.generate([9, 8, 7, 6], 15, 2)
    assert isinstance(backend._step["logits"], torch.Tensor)
    assert got.output_ids == expected.output_ids and len(got.decode_ns) == 14
    np.testing.assert_allclose(backend.last_logits(), expected_logits, rtol=0, atol=1e-6)
