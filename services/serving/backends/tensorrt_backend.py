"""The `tensorrt` backend: a TensorRT (>= 10) engine built from the same ONNX step graph as
the onnxruntime backend (`_onnx_cache`), run with device buffers from torch on this
backend's own CUDA stream.

Load order (the cheap checks first, so a machine without TensorRT or CUDA answers at once):
options and dtype -> a CUDA device was asked for (InvalidArgument DEVICE_UNSUPPORTED) ->
`import tensorrt` (Unavailable TENSORRT_UNAVAILABLE) -> CUDA present (FailedPrecondition
CUDA_UNAVAILABLE) -> memory (ResourceExhausted) -> ONNX export (cached) -> engine (cached
under <cache root>/tensorrt, keyed by `_trt_profiles.engine_key`: the ONNX key, TensorRT
version, GPU name and compute capability, dtype, profile, workspace) -> execution context
-> one untimed warm-up generation.

Precision: the network is created STRONGLY_TYPED from the graph exported in the stack's
dtype (fp32, fp16, bf16), so every layer runs in the type the reference decoder uses
(attention scores and softmax in fp32, as in PyTorch). Builder precision flags
(BuilderFlag.FP16/BF16) are not set: TensorRT rejects them for strongly typed networks, and
TensorRT 11 drops weak typing.

Options (StackSpec.options):
- max_batch: largest batch the engine accepts (default 1).
- max_prompt: longest prompt (default max_context - 1).
- workspace_mib: builder workspace pool limit (default: TensorRT's, the device memory).
- kv_bucket: KV buffer growth in slots, as in the onnxruntime backend (default 32).

Per step: `set_input_shape` for input_ids and each layer's past_k_i/past_v_i when they
change, `set_tensor_address` for the IO tensors whose address changed (each layer's past is
bound in place in the KV buffers: no copy of the cache, in the step or in the graph),
`execute_async_v3` on the stream; the argmax and KV writes are torch ops on the same
stream; each timing mark synchronizes the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from idealrt.core.clock import utcnow
from idealrt.core.domain import StackSpec
from idealrt.core.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
)
from idealrt.core.model_spec import ModelSpec, resolve_max_context
from idealrt.core.serving_contract import GenerationResult, MemoryReport
from idealrt.services.serving.backends import _trt_profiles as prof
from idealrt.services.serving.backends._kv_buffers import DEFAULT_BUCKET, KVBuffers
from idealrt.services.serving.backends._onnx_cache import (
    CachedExport,
    cache_root,
    cached_file,
    export_decoder,
    int_option,
)
from idealrt.services.serving.backends.base import (
    check_memory,
    check_options,
    clock_result,
    device_memory,
    resolve_device,
)
from idealrt.services.serving.backends.pytorch_backend import check_generation, warm_up
from idealrt.services.serving.decoder import planned_bytes, torch_dtype
from idealrt.services.serving.decoder.export import input_names, past_names
from idealrt.services.serving.reasons import (
    ALREADY_LOADED,
    BATCH_SIZE_INVALID,
    CUDA_UNAVAILABLE,
    DEVICE_UNSUPPORTED,
    ENGINE_BUILD_FAILED,
    ENGINE_EXECUTION_FAILED,
    ENGINE_LOAD_FAILED,
    ENGINE_MISMATCH,
    MODEL_NOT_LOADED,
    PROMPT_TOO_LONG,
    SHAPE_OUT_OF_PROFILE,
    TENSORRT_UNAVAILABLE,
)
from idealrt.services.serving.timing import StepClock, timer_for

__all__ = ["OPTIONS", "TensorRTBackend", "TrtOptions", "create_backend", "import_tensorrt"]

OPTIONS = ("max_batch", "max_prompt", "workspace_mib", "kv_bucket")


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    max_batch: int = 1
    max_prompt: int = 0  # 0: max_context - 1
    workspace_mib: int = 0  # 0: TensorRT's default
    kv_bucket: int = DEFAULT_BUCKET

    @classmethod
    def parse(cls, stack: StackSpec) -> TrtOptions:
        check_options(stack, OPTIONS)
        return cls(
            int_option(stack, "max_batch", 1, 1),
            int_option(stack, "max_prompt", 0, 1),
            int_option(stack, "workspace_mib", 0, 1),
            int_option(stack, "kv_bucket", DEFAULT_BUCKET, 1),
        )


def import_tensorrt() -> Any:
    """The tensorrt module, or Unavailable(TENSORRT_UNAVAILABLE) saying why not."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there, libnvinfer is not
        raise Unavailable(
            TENSORRT_UNAVAILABLE,
            f"the tensorrt backend needs TensorRT >= 10 ({e}): pip install idealrt[tensorrt]",
        ) from None
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise Unavailable(
            TENSORRT_UNAVAILABLE,
            f"the tensorrt backend needs TensorRT >= 10, found {trt.__version__}",
        )
    return trt


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir
        self._trt: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._spec: ModelSpec | None = None
        self._opts = TrtOptions()
        self._profile: prof.Profile = {}
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._stream: Any = None
        self._max_context = 0
        self._batch = 0
        self._kv: KVBuffers | None = None
        self._buf: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self.export: CachedExport | None = None
        self.engine_hit = False

    # ---- load / unload ----
    def load(
        self, spec: ModelSpec, stack: StackSpec, weights_path: str, seed: int, max_context: int
    ) -> MemoryReport:
        if self._engine is not None:
            raise FailedPrecondition(ALREADY_LOADED, "this backend instance already holds a model")
        opts = TrtOptions.parse(stack)
        dtype = torch_dtype(stack.dtype)
        max_context = resolve_max_context(spec, max_context)
        profile = prof.profile_shapes(
            spec,
            max_prompt=opts.max_prompt or max(1, max_context - 1),
            max_context=max_context,
            batch=opts.max_batch,
        )
        if not (stack.device or "cpu").startswith("cuda"):
            raise InvalidArgument(
                DEVICE_UNSUPPORTED,
                f"the tensorrt backend runs on CUDA devices; stack.device is {stack.device!r}",
                field="stack.device",
            )
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise FailedPrecondition(
                CUDA_UNAVAILABLE, "the tensorrt backend needs CUDA, which torch cannot use here"
            )
        device = resolve_device(stack.device)
        weights, kv = planned_bytes(spec, dtype, max_context, opts.max_batch)
        workspace = opts.workspace_mib << 20
        check_memory(device, weights + workspace, 2 * kv, f"model {spec.name!r} in {stack.dtype}")
        self._trt, self._spec, self._opts, self._profile = trt, spec, opts, profile
        self._device, self._dtype, self._max_context = device, dtype, max_context
        try:
            root = self._cache_dir or cache_root()
            self.export = export_decoder(
                spec,
                stack.dtype,
                seed=seed,
                weights_path=weights_path,
                init_device=device,
                root=root,
            )
            key = prof.engine_key(
                self.export.key.digest(),
                trt_version=trt.__version__,
                device_name=torch.cuda.get_device_name(device),
                capability=torch.cuda.get_device_capability(device),
                dtype=stack.dtype,
                profile=profile,
                workspace_bytes=workspace,
            )
            onnx_path = self.export.path
            engine_path = root / "tensorrt" / f"{key}.engine"
            blob, self.engine_hit = cached_file(
                engine_path, lambda: self._build(onnx_path, workspace)
            )
            try:
                self._open(blob, stack.dtype)
            except FailedPrecondition:
                if not self.engine_hit:
                    raise
                engine_path.unlink(missing_ok=True)  # a damaged cache entry: build it again
                blob, self.engine_hit = cached_file(
                    engine_path, lambda: self._build(onnx_path, workspace)
                )
                self._open(blob, stack.dtype)
            self._stream = torch.cuda.Stream(device)
            warm_up(self, max_context)
        except BaseException:
            self.unload()
            raise
        total, free = device_memory(device)
        return MemoryReport(weights, 2 * kv, total, free)

    def _build(self, onnx_path: Path, workspace: int) -> bytes:
        trt = self._trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise FailedPrecondition(
                ENGINE_BUILD_FAILED, f"TensorRT could not parse {onnx_path}: {errors}"
            )
        config = builder.create_builder_config()
        if workspace:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in self._profile.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise FailedPrecondition(
                ENGINE_BUILD_FAILED, "TensorRT could not build an engine (see its log)"
            )
        return bytes(serialized)

    def _open(self, blob: bytes, dtype_name: str) -> None:
        trt = self._trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise FailedPrecondition(
                ENGINE_LOAD_FAILED, "TensorRT could not deserialize the cached engine"
            )
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        assert self._spec is not None
        want = prof.expected_dtypes(dtype_name, self._spec.layers)
        wrong = sorted(
            n
            for n in names
            if engine.get_tensor_dtype(n) != getattr(trt.DataType, want.get(n, ""), None)
        )
        if inputs != set(input_names(self._spec.layers)) or names != set(want) or wrong:
            raise FailedPrecondition(
                ENGINE_MISMATCH,
                f"engine IO {sorted(names)} (inputs {sorted(inputs)}, wrong dtypes {wrong}) "
                "is not the decoder step's",
            )
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        self._shapes, self._addresses = {}, {}

    def unload(self) -> None:
        self._context = self._engine = self._runtime = self._kv = None
        self._buf, self._shapes, self._addresses, self._batch = {}, {}, {}, 0
        self._stream = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _prepare_batch(self, batch: int) -> None:
        spec = self._spec
        assert spec is not None
        if batch == self._batch:
            return
        self._kv, self._buf, self._batch = None, {}, 0
        torch.cuda.empty_cache()
        _, kv_bytes = planned_bytes(spec, self._dtype, self._max_context, batch)
        check_memory(self._device, 0, 2 * kv_bytes, f"KV cache for batch {batch}")
        layers, kvh, hd = spec.layers, spec.kv_heads_effective, spec.head_dim
        dev, dt = self._device, self._dtype

        def zeros(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self._kv = KVBuffers(layers, batch, kvh, hd, self._max_context, self._opts.kv_bucket, zeros)
        self._buf = {
            "ids": zeros(batch, 1, dtype=torch.int64),
            "position": zeros(dtype=torch.int64),
            "logits": zeros(batch, 1, spec.vocab),
            "new_k": zeros(layers, batch, kvh, 1, hd),
            "new_v": zeros(layers, batch, kvh, 1, hd),
        }
        self._batch = batch

    # ---- generation ----
    def _run(self, tensors: dict[str, torch.Tensor]) -> None:
        ctx = self._context
        for name in self._profile:
            shape = tuple(tensors[name].shape)
            if self._shapes.get(name) != shape:
                problem = prof.shape_problem(self._profile, name, shape)
                if problem or not ctx.set_input_shape(name, shape):
                    raise InvalidArgument(SHAPE_OUT_OF_PROFILE, problem or f"{name} {shape}")
                self._shapes[name] = shape
        for name, t in tensors.items():
            address = t.data_ptr()
            if self._addresses.get(name) != address:
                ctx.set_tensor_address(name, address)
                self._addresses[name] = address
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise Internal(ENGINE_EXECUTION_FAILED, "TensorRT execute_async_v3 failed")

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        spec = self._spec
        if self._context is None or spec is None:
            raise FailedPrecondition(MODEL_NOT_LOADED, "load a model before generating")
        check_generation(prompt_ids, output_tokens, batch_size, spec.vocab, self._max_context)
        if batch_size > self._opts.max_batch:
            raise InvalidArgument(
                BATCH_SIZE_INVALID,
                f"batch_size {batch_size} > the engine's max_batch {self._opts.max_batch} "
                "(load with the option max_batch)",
                field="batch_size",
            )
        max_prompt = self._profile["input_ids"][2][1]
        if len(prompt_ids) > max_prompt:
            raise InvalidArgument(
                PROMPT_TOO_LONG,
                f"prompt of {len(prompt_ids)} tokens > the engine's max_prompt {max_prompt}",
                field="prompt.length",
            )
        self._prepare_batch(batch_size)
        with torch.cuda.stream(self._stream):
            return self._generate(prompt_ids, output_tokens, batch_size)

    def _past(
        self, views: tuple[list[torch.Tensor], list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """name -> tensor of each layer's past K and V (views of the KV buffers)."""
        assert self._spec is not None
        out: dict[str, torch.Tensor] = {}
        for names, tensors in zip(past_names(self._spec.layers), views, strict=True):
            out.update(zip(names, tensors, strict=True))
        return out

    def _generate(self, prompt_ids: Sequence[int], o: int, batch: int) -> GenerationResult:
        kv, buf = self._kv, self._buf
        assert kv is not None
        p = len(prompt_ids)
        prompt = torch.tensor(list(prompt_ids), dtype=torch.int64).view(1, p).expand(batch, p)
        out = torch.zeros(batch, o, dtype=torch.int64, device=self._device)
        clock = StepClock(timer_for(self._device))
        start_time = utcnow()
        clock.start()
        # prefill: one masked past slot (position 0 masks it), K/V into the KV buffers
        new_k, new_v = kv.prefill_outputs(p)
        buf["position"].fill_(0)
        ids = prompt.to(self._device).contiguous()
        io = {"input_ids": ids, **self._past(kv.view(0, 1)), "position": buf["position"]}
        self._run({**io, "logits": buf["logits"], "new_k": new_k, "new_v": new_v})
        buf["ids"].copy_(buf["logits"][:, 0].argmax(-1, keepdim=True))
        out[:, 0] = buf["ids"][:, 0]
        kv.after_prefill(p)
        clock.mark()
        past = self._past(kv.past())
        for i in range(1, o):
            pos = p + i - 1
            buf["position"].fill_(pos)
            self._run(
                {
                    "input_ids": buf["ids"],
                    **past,
                    "position": buf["position"],
                    "logits": buf["logits"],
                    "new_k": buf["new_k"],
                    "new_v": buf["new_v"],
                }
            )
            buf["ids"].copy_(buf["logits"][:, 0].argmax(-1, keepdim=True))
            out[:, i] = buf["ids"][:, 0]
            if kv.store(pos, buf["new_k"], buf["new_v"]):
                past = self._past(kv.past())
            clock.mark()
        return clock_result(clock, p, [int(t) for t in out[0].tolist()], start_time, batch)


def create_backend() -> TensorRTBackend:
    return TensorRTBackend()
