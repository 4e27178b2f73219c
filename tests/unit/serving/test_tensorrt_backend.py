"""The tensorrt backend. On any machine: its pure helpers (optimization profile, shape checks,
engine dtypes, engine cache key), option parsing, and the refusals that come before any
heavy work (no CUDA device asked, TensorRT not importable, CUDA missing), through the
registry. With TensorRT and a GPU (marked, skipped otherwise): generation on the engine
agrees with the pytorch backend, and the engine cache is hit on a second load."""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from idealrt.core import catalog
from idealrt.core.domain import Backend, ModelRef, StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving.backends import _onnx_cache as oc
from idealrt.services.serving.backends import _trt_profiles as prof
from idealrt.services.serving.backends import tensorrt_backend as tb
from idealrt.services.serving.decoder import build_decoder
from idealrt.services.serving.decoder.export import input_names
from idealrt.services.serving.registry import ModelRegistry

TRT_CUDA = StackSpec(Backend.TENSORRT, "cuda")


def test_all_is_what_it_claims() -> None:
    for module in (tb, prof):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)


def test_profile_covers_prefill_and_decode(tiny: dict[str, ModelSpec]) -> None:
    spec = tiny["llama"]  # 2 layers, 2 kv heads, head_dim 8
    p = prof.profile_shapes(spec, max_prompt=20, max_context=48, batch=4)
    assert prof.dynamic_inputs(2) == (
        "input_ids",
        "past_k_0",
        "past_k_1",
        "past_v_0",
        "past_v_1",
    )
    assert set(p) == set(prof.dynamic_inputs(spec.layers))
    assert p["input_ids"] == ((1, 1), (4, 1), (4, 20))
    assert p["past_k_0"] == ((1, 2, 1, 8), (4, 2, 24, 8), (4, 2, 48, 8))
    assert p["past_k_1"] == p["past_v_0"] == p["past_v_1"] == p["past_k_0"]
    for name, (lo, opt, hi) in p.items():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), name
    one = prof.profile_shapes(spec, max_prompt=1, max_context=1, batch=1)
    assert one["past_k_0"][1][2] == 1 and one["input_ids"][2] == (1, 1)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"max_prompt": 49, "max_context": 48, "batch": 1}, "OPTION_INVALID"),
        ({"max_prompt": 0, "max_context": 48, "batch": 1}, "OPTION_INVALID"),
        ({"max_prompt": 4, "max_context": 48, "batch": 0}, "OPTION_INVALID"),
        ({"max_prompt": 4, "max_context": 65, "batch": 1}, "MAX_CONTEXT_INVALID"),
    ],
)
def test_profile_refuses_impossible_ranges(
    kwargs: dict[str, int], reason: str, tiny: dict[str, ModelSpec]
) -> None:
    with pytest.raises(InvalidArgument) as e:
        prof.profile_shapes(tiny["llama"], **kwargs)
    assert e.value.reason == reason


def test_shape_problem_names_the_axis(tiny: dict[str, ModelSpec]) -> None:
    p = prof.profile_shapes(tiny["gpt2"], max_prompt=10, max_context=32, batch=2)
    assert prof.shape_problem(p, "input_ids", (2, 10)) == ""
    assert prof.shape_problem(p, "past_k_0", (1, 4, 32, 8)) == ""
    assert "axis 1" in prof.shape_problem(p, "input_ids", (1, 11))
    assert "axis 2" in prof.shape_problem(p, "past_v_1", (1, 4, 33, 8))
    assert "rank" in prof.shape_problem(p, "input_ids", (1,))


def test_expected_dtypes_follow_the_stack_dtype() -> None:
    assert prof.expected_dtypes("fp16", 2)["past_k_1"] == "HALF"
    assert prof.expected_dtypes("bf16", 2)["logits"] == "BF16"
    fp32 = prof.expected_dtypes("fp32", 2)
    assert fp32["input_ids"] == fp32["position"] == "INT64"
    assert set(fp32) == {*input_names(2), "logits", "new_k", "new_v"}
    assert {fp32[n] for n in fp32 if n not in ("input_ids", "position")} == {"FLOAT"}


def test_engine_key_changes_with_everything_it_depends_on(tiny: dict[str, ModelSpec]) -> None:
    profile = prof.profile_shapes(tiny["gpt2"], max_prompt=8, max_context=32, batch=1)
    base: dict[str, Any] = {
        "trt_version": "10.3.0",
        "device_name": "NVIDIA H100 80GB HBM3",
        "capability": (9, 0),
        "dtype": "fp16",
        "profile": profile,
        "workspace_bytes": 0,
    }
    key = prof.engine_key("onnx", **base)
    assert key == prof.engine_key("onnx", **base) and len(key) == 64
    other = prof.profile_shapes(tiny["gpt2"], max_prompt=9, max_context=32, batch=1)
    variants = [
        prof.engine_key("onnx2", **base),
        *(
            prof.engine_key("onnx", **{**base, field: value})
            for field, value in (
                ("trt_version", "10.4.0"),
                ("device_name", "NVIDIA A100-SXM4-80GB"),
                ("capability", (8, 0)),
                ("dtype", "bf16"),
                ("profile", other),
                ("workspace_bytes", 1 << 30),
            )
        ),
    ]
    assert key not in variants and len(set(variants)) == len(variants)


def test_options_parse_and_refuse() -> None:
    stack = StackSpec(
        Backend.TENSORRT,
        "cuda",
        options={"max_batch": "4", "max_prompt": "100", "workspace_mib": "512", "kv_bucket": "64"},
    )
    assert tb.TrtOptions.parse(stack) == tb.TrtOptions(4, 100, 512, 64)
    assert tb.TrtOptions.parse(TRT_CUDA) == tb.TrtOptions()
    for options, reason in (
        ({"max_batch": "0"}, "OPTION_INVALID"),
        ({"fp8": "1"}, "OPTION_UNKNOWN"),
    ):
        with pytest.raises(InvalidArgument) as e:
            tb.TrtOptions.parse(StackSpec(Backend.TENSORRT, "cuda", options=options))
        assert e.value.reason == reason


# ---- refusals before any heavy work ----
@pytest.fixture
def no_heavy_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Any export or engine build fails the test; the cache root is a fresh directory."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("heavy work before the availability checks")

    monkeypatch.setattr(tb, "export_decoder", forbidden)
    monkeypatch.setattr(tb.TensorRTBackend, "_build", forbidden)
    monkeypatch.setenv(oc.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_missing_tensorrt_is_unavailable_through_the_registry(
    no_heavy_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    reg = ModelRegistry()
    with pytest.raises(Unavailable) as e:
        reg.load(ModelRef(name="tiny-gpt2"), TRT_CUDA)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert e.value.reason == "TENSORRT_UNAVAILABLE" and "idealrt[tensorrt]" in e.value.message
    assert reg.list() == ([], "") and not any(no_heavy_work.iterdir())


def test_old_tensorrt_is_unavailable(no_heavy_work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(Unavailable) as e:
        tb.create_backend().load(catalog.resolve("tiny-gpt2"), TRT_CUDA, "", 0, 32)
    assert e.value.reason == "TENSORRT_UNAVAILABLE" and "8.6.1" in e.value.message


def test_missing_cuda_is_a_failed_precondition(
    no_heavy_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FailedPrecondition) as e:
        ModelRegistry().load(ModelRef(name="tiny-gpt2"), TRT_CUDA)
    assert e.value.reason == "CUDA_UNAVAILABLE"


def test_cpu_device_is_refused(no_heavy_work: Path) -> None:
    with pytest.raises(InvalidArgument) as e:
        tb.create_backend().load(
            catalog.resolve("tiny-gpt2"), StackSpec(Backend.TENSORRT), "", 0, 32
        )
    assert e.value.reason == "DEVICE_UNSUPPORTED" and e.value.field == "stack.device"


# ---- with TensorRT and a GPU ----
def _tensorrt_present() -> bool:
    try:
        tb.import_tensorrt()
    except Unavailable:
        return False
    return torch.cuda.is_available()


def _needs_trt(f: Any) -> Any:
    marks = [
        pytest.mark.gpu,
        pytest.mark.tensorrt,
        pytest.mark.skipif(not _tensorrt_present(), reason="needs TensorRT >= 10 and a CUDA GPU"),
        pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
        pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning"),
    ]
    for mark in marks:
        f = mark(f)
    return f


PROMPT = [7, 3, 99, 250, 11, 42]


@_needs_trt
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_engine_tokens_match_pytorch_on_cuda(name: str, tmp_path: Path) -> None:
    from idealrt.services.serving.backends import pytorch_backend as pt

    spec = catalog.resolve(name)
    stack = StackSpec(Backend.TENSORRT, "cuda", options={"max_batch": "2", "kv_bucket": "4"})
    trt_backend = tb.TensorRTBackend(tmp_path)
    trt_backend.load(spec, stack, "", 5, 64)
    assert not trt_backend.engine_hit
    got = trt_backend.generate(PROMPT, 20, 2)
    assert len(got.output_ids) == 20 and len(got.decode_ns) == 19
    assert got.total_ns == got.prefill_ns + sum(got.decode_ns)
    torch_backend = pt.create_backend()
    torch_backend.load(spec, StackSpec(device="cuda"), "", 5, 64)
    assert got.output_ids == torch_backend.generate(PROMPT, 20).output_ids
    torch_backend.unload()
    trt_backend.unload()
    again = tb.TensorRTBackend(tmp_path)
    again.load(spec, stack, "", 5, 64)
    assert again.engine_hit and again.export is not None and again.export.hit
    assert again.generate(PROMPT, 20).output_ids == got.output_ids
    with pytest.raises(InvalidArgument) as e:
        again.generate(PROMPT, 2, 3)
    assert e.value.reason == "BATCH_SIZE_INVALID"


@_needs_trt
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_engines_generate_exact_counts(dtype: str, tmp_path: Path) -> None:
    backend = tb.TensorRTBackend(tmp_path)
    backend.load(
        catalog.resolve("tiny-llama"), StackSpec(Backend.TENSORRT, "cuda", dtype), "", 0, 64
    )
    r = backend.generate(PROMPT, 9)
    assert len(r.output_ids) == 9 and len(r.decode_ns) == 8


# ---- the backend's own logic against a stand-in TensorRT (CPU) ----
class FakeTrt:
    """The slice of the TensorRT Python API the backend uses. The execution context runs
    the same ONNX file with ONNX Runtime, reading inputs from and writing outputs to the
    raw addresses and shapes it was given, as an engine would."""

    __version__ = "10.9.0"
    NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    DataType = types.SimpleNamespace(INT64="int64", FLOAT="float32", HALF="float16", BF16="bf16")

    def __init__(self, onnx_path: Path = Path(), io_dtype: str = "float32") -> None:
        self.onnx_path, self.io_dtype = onnx_path, io_dtype
        self.calls: list[tuple[Any, ...]] = []
        trt = self

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                pass

        class Profile:
            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                trt.calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                trt.calls.append(("pool", pool, size))

            def add_optimization_profile(self, profile: Profile) -> None:
                trt.calls.append(("add_profile",))

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> str:
                trt.calls.append(("network", flags))
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: str, config: Config) -> bytes:
                return b"engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: str, logger: Logger) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                trt.calls.append(("parse", path))
                trt.onnx_path = Path(path)
                return True

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                pass

            def deserialize_cuda_engine(self, blob: bytes) -> Any:
                return FakeEngine(trt) if blob == b"engine" else None

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = (
            Logger,
            Builder,
            OnnxParser,
            Runtime,
        )


class FakeEngine:
    """IO of the parsed ONNX graph (a 2-layer step when none was parsed)."""

    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt
        if trt.onnx_path.is_file():
            import onnx

            graph = onnx.load(str(trt.onnx_path), load_external_data=False).graph
            self.inputs = [i.name for i in graph.input]
            outputs = [o.name for o in graph.output]
        else:
            self.inputs, outputs = list(input_names(2)), ["logits", "new_k", "new_v"]
        self.names = self.inputs + outputs
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name in self.inputs else "output"

    def get_tensor_dtype(self, name: str) -> str:
        return "int64" if name in ("input_ids", "position") else self.trt.io_dtype

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self.trt.onnx_path)


class FakeContext:
    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            str(onnx_path), providers=["CPUExecutionProvider"]
        )
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name], self.shape_calls = tuple(shape), self.shape_calls + 1
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def _array(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        import ctypes

        import numpy as np

        n = int(np.prod(shape)) if shape else 1
        ctype = ctypes.c_int64 if dtype == np.int64 else ctypes.c_float
        raw = (ctype * n).from_address(self.addresses[name])
        return np.ctypeslib.as_array(raw).reshape(shape)

    def execute_async_v3(self, stream: int) -> bool:
        import numpy as np

        feeds = {"position": self._array("position", (), np.int64).copy()}
        for i in self.session.get_inputs():
            if i.name != "position":
                dtype = np.int64 if i.name == "input_ids" else np.float32
                feeds[i.name] = self._array(i.name, self.shapes[i.name], dtype).copy()
        for name, value in zip(
            ("logits", "new_k", "new_v"), self.session.run(None, feeds), strict=True
        ):
            self._array(name, value.shape, np.float32)[...] = value
        return True


@pytest.fixture
def cpu_engine(tmp_path: Path, tiny: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch) -> Any:
    """family -> a TensorRTBackend wired to FakeTrt on the CPU (seed 4, max_context 40)."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(tb.torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    def make(family: str, **options: str) -> tb.TensorRTBackend:
        spec = tiny[family]
        export = oc.export_decoder(
            spec, "fp32", seed=4, weights_path="", init_device=torch.device("cpu"), root=tmp_path
        )
        backend = tb.TensorRTBackend(tmp_path)
        stack = StackSpec(Backend.TENSORRT, "cuda", options=options)
        backend._trt, backend._spec = FakeTrt(export.path), spec
        backend._opts = tb.TrtOptions.parse(stack)
        backend._profile = prof.profile_shapes(
            spec, max_prompt=20, max_context=40, batch=backend._opts.max_batch
        )
        backend._max_context, backend._stream = 40, types.SimpleNamespace(cuda_stream=7)
        backend._open(backend._build(export.path, 1 << 20), "fp32")
        return backend

    return make


@pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_loop_matches_pytorch_on_a_stand_in_engine(
    family: str, cpu_engine: Any, tiny: dict[str, ModelSpec]
) -> None:
    """Everything but TensorRT itself: the masked one-slot past of the prefill, shapes and
    addresses per step, the growing KV buffers, argmax, timing fields."""
    from idealrt.services.serving.backends import pytorch_backend as pt

    backend = cpu_engine(family, max_batch="2", kv_bucket="2")
    build = [c for c in backend._trt.calls if c[0] != "parse"]
    assert build[0] == ("network", 1 << 1)  # strongly typed
    assert ("pool", "workspace", 1 << 20) in build and ("add_profile",) in build
    dynamic = prof.dynamic_inputs(tiny[family].layers)
    assert {c[1] for c in build if c[0] == "set_shape"} == set(dynamic)
    prompt = [5, 17, 3, 88, 41, 9, 60]
    calls = backend._context.shape_calls
    got = backend.generate(prompt, 12, 2)
    # shapes are set only when they change (prefill, first decode, each KV growth): with
    # 2-slot buckets that is ~half the 11 decode steps, 1 + 2*layers inputs each
    assert backend._context.shape_calls - calls <= len(dynamic) * (2 + 11 // 2)
    assert (got.prompt_tokens, got.output_tokens, got.batch_size, len(got.decode_ns)) == (
        7,
        12,
        2,
        11,
    )
    assert got.total_ns == got.prefill_ns + sum(got.decode_ns)
    reference = pt.create_backend()
    reference.load(tiny[family], StackSpec(), "", 4, 40)
    assert got.output_ids == reference.generate(prompt, 12).output_ids
    # and the logits of every step are the reference decoder's (teacher-forced)
    decoder = build_decoder(tiny[family], max_context=40, seed=4)
    cache = decoder.new_cache(2)
    with torch.inference_mode():
        ref = [decoder(torch.tensor([prompt] * 2), cache, 0, last_only=True)[:, -1]]
        for i, tok in enumerate(got.output_ids[:-1]):
            step = torch.full((2, 1), tok, dtype=torch.int64)
            ref.append(decoder(step, cache, len(prompt) + i, last_only=True)[:, -1])
    for k in range(1, 13):
        assert backend.generate(prompt, k, 2).output_ids == got.output_ids[:k]
        logits = backend._buf["logits"][:, 0]
        err = float((logits - ref[k - 1]).abs().max() / ref[k - 1].abs().max())
        assert err <= 1e-4, (k, err)
    for call, reason in (
        (lambda: backend.generate(prompt, 2, 3), "BATCH_SIZE_INVALID"),
        (lambda: backend.generate(list(range(21)), 2), "PROMPT_TOO_LONG"),
    ):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.reason == reason


def test_an_engine_with_other_dtypes_is_refused(tmp_path: Path) -> None:
    backend = tb.TensorRTBackend(tmp_path)
    backend._trt = FakeTrt(tmp_path / "unused.onnx", io_dtype="float16")
    backend._spec = catalog.resolve("tiny-gpt2")  # 2 layers, as the stand-in engine
    with pytest.raises(FailedPrecondition) as e:
        backend._open(b"engine", "fp32")
    assert e.value.reason == "ENGINE_MISMATCH"
    with pytest.raises(FailedPrecondition) as e:
        backend._open(b"damaged", "fp32")
    assert e.value.reason == "ENGINE_LOAD_FAILED"


@pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning")
def test_load_caches_the_engine_and_rebuilds_a_damaged_one(
    tmp_path: Path, tiny: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """load() end to end with the stand-in TensorRT and torch's CUDA calls faked (buffers on
    the CPU): engine built and cached, hit on the next load, rebuilt when damaged."""
    pytest.importorskip("onnxruntime")
    spec = tiny["gpt2"]
    oc.export_decoder(  # the ONNX export, before torch.cuda is faked
        spec, "fp32", seed=2, weights_path="", init_device=torch.device("cpu"), root=tmp_path
    )
    fake = FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: types.SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(tb, "resolve_device", lambda device: torch.device("cpu"))

    def load() -> tb.TensorRTBackend:
        backend = tb.TensorRTBackend(tmp_path)
        mem = backend.load(spec, TRT_CUDA, "", 2, 32)
        assert mem.kv_cache_bytes == 2 * spec.kv_cache_bytes(32, "fp32")
        assert backend.export is not None and backend.export.hit
        return backend

    first = load()
    assert not first.engine_hit
    engines = list((tmp_path / "tensorrt").glob("*.engine"))
    assert len(engines) == 1 and engines[0].read_bytes() == b"engine"
    tokens = first.generate([1, 2, 3], 5).output_ids
    second = load()
    assert second.engine_hit and second.generate([1, 2, 3], 5).output_ids == tokens
    engines[0].write_bytes(b"damaged")
    third = load()
    assert not third.engine_hit and engines[0].read_bytes() == b"engine"
    assert [c[0] for c in fake.calls].count("parse") == 2  # built twice, loaded three times
