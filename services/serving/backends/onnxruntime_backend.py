"""The `onnxruntime` backend: the reference decoder's step exported once to ONNX
(`decoder/export.py`: one graph for the prefill, with an empty past, and for decode) and run
by ONNX Runtime on the CPU or CUDA execution provider.

Weights: the graph is exported from the decoder `build_decoder` makes from the same seed (on
the same device type) or weights path, so its outputs are the pytorch backend's. Exports
are cached on disk (`_onnx_cache`; $IDEALRT_CACHE_DIR or ~/.cache/idealrt): a second load
of the same model, dtype and weights only creates a session.

Options (threads, kv_bucket, hugepages, attention, spinning) and the session's settings are
described in `_ort_session`, which parses them and makes the session.

Devices and dtypes: the CPU runs fp32 only (fp16 is refused: ONNX Runtime's CPU provider
runs most fp16 nodes through casts it inserts, so the number would measure the casts, not
an fp16 stack; bf16 has no CPU kernels). CUDA runs fp32 and fp16 (bf16 refused: partial
kernel coverage would put nodes on the CPU). A CUDA load fails with FailedPrecondition
PROVIDER_UNAVAILABLE unless the session really runs on CUDAExecutionProvider:
onnxruntime-gpu falls back to the CPU silently when the CUDA libraries are missing, and a
CPU number must never be labelled GPU. CUDA also needs a CUDA build of torch: the device
buffers are torch tensors.

Step I/O goes through IO binding with preallocated buffers: numpy arrays on the CPU, torch
tensors on CUDA (ONNX Runtime runs on this backend's own torch stream via
`user_compute_stream`, so the token argmax and KV writes are ordered with it). The past is
one input per layer and tensor (`past_k_0`.., `past_v_0`..), each bound to that layer's
region of the KV buffers, so neither the step nor the graph copies the cache (a single
stacked past input cost a per-layer gather, i.e. a full cache copy, every step). Inputs
are rebound only when a shape changes.

Timing is the pytorch backend's: prefill_ns from request start to the first token's argmax,
one mark per decode step; on CUDA each mark follows `io_binding.synchronize_outputs()` and a
device synchronize.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from idealrt.core.clock import utcnow
from idealrt.core.domain import StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.logging import get_logger
from idealrt.core.model_spec import ModelSpec, resolve_max_context
from idealrt.core.reasons import DTYPE_UNSUPPORTED
from idealrt.core.serving_contract import GenerationResult, MemoryReport
from idealrt.services.serving.backends._kv_buffers import KVBuffers
from idealrt.services.serving.backends._onnx_cache import (
    CachedExport,
    cache_root,
    export_decoder,
)
from idealrt.services.serving.backends._ort_io import CpuIo, CudaIo
from idealrt.services.serving.backends._ort_session import (
    DISABLED_OPTIMIZERS,
    DTYPES,
    OPTIONS,
    PROVIDERS,
    OrtOptions,
    make_session,
    unavailable,
)
from idealrt.services.serving.backends.base import (
    check_memory,
    clock_result,
    device_memory,
    resolve_device,
)
from idealrt.services.serving.backends.pytorch_backend import check_generation, warm_up
from idealrt.services.serving.decoder import planned_bytes, torch_dtype
from idealrt.services.serving.decoder.export import output_names, past_names
from idealrt.services.serving.hugepages import AnonymousRegions, HugePages, collapse
from idealrt.services.serving.reasons import ALREADY_LOADED, MODEL_NOT_LOADED
from idealrt.services.serving.timing import StepClock, Timer, timer_for

__all__ = [
    "DISABLED_OPTIMIZERS",
    "DTYPES",
    "OPTIONS",
    "PROVIDERS",
    "OnnxRuntimeBackend",
    "OrtOptions",
    "create_backend",
    "make_session",
]

_log = get_logger(__name__)
_NP = {"fp32": np.float32, "fp16": np.float16}


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir
        self._session: ort.InferenceSession | None = None
        self._spec: ModelSpec | None = None
        self._io: CpuIo = CpuIo(np.float32)
        self._opts = OrtOptions()
        self._device = torch.device("cpu")
        self._timer: Timer = timer_for("cpu")
        self._stream: Any = None
        self._max_context = 0
        self._dtype = "fp32"
        self._batch = 0
        self._fused = False
        self._kv: KVBuffers | None = None
        self._step: dict[str, Any] = {}
        self._past_names: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self.export: CachedExport | None = None  # the last load's export (hit or not)

    # ---- load / unload ----
    def load(
        self, spec: ModelSpec, stack: StackSpec, weights_path: str, seed: int, max_context: int
    ) -> MemoryReport:
        if self._session is not None:
            raise FailedPrecondition(ALREADY_LOADED, "this backend instance already holds a model")
        opts = OrtOptions.parse(stack)
        device = resolve_device(stack.device)
        allowed = DTYPES[device.type]
        if stack.dtype not in allowed:
            why = (
                "ONNX Runtime's CPU provider runs fp16 graphs through inserted fp32 casts"
                if device.type == "cpu" and stack.dtype == "fp16"
                else "not every node of the graph has a kernel in that dtype"
            )
            raise InvalidArgument(
                DTYPE_UNSUPPORTED,
                f"the onnxruntime backend runs {', '.join(allowed)} on {device.type}, "
                f"not {stack.dtype!r} ({why})",
                field="stack.dtype",
            )
        max_context = resolve_max_context(spec, max_context)
        provider = PROVIDERS[device.type]
        if provider not in ort.get_available_providers():  # before any heavy work
            raise unavailable(provider, f"is not available (have {ort.get_available_providers()})")
        fused = opts.fused(spec, device, stack.dtype)
        weights, kv = planned_bytes(spec, torch_dtype(stack.dtype), max_context, 1)
        kv *= 1 if fused else 2  # the bucketed past is double-buffered (`KVBuffers`)
        check_memory(device, weights, kv, f"model {spec.name!r} in {stack.dtype}")
        huge = opts.hugepages.wanted(device)
        self._opts, self._device, self._spec, self._max_context = opts, device, spec, max_context
        self._past_names = past_names(spec.layers)
        self._fused = fused
        self._dtype = stack.dtype
        self._timer = timer_for(device)
        try:
            self.export = export_decoder(
                spec,
                stack.dtype,
                seed=seed,
                weights_path=weights_path,
                init_device=device,
                root=self._cache_dir or cache_root(),
                fused=fused,
            )
            if device.type == "cuda":
                self._stream = torch.cuda.Stream(device)
                self._io = CudaIo(_NP[stack.dtype], device, torch_dtype(stack.dtype))
            else:
                self._io = CpuIo(_NP[stack.dtype])
            stream = int(self._stream.cuda_stream) if self._stream is not None else 0
            # the session's weights (prepacked at creation), its arena, the KV buffers
            with AnonymousRegions() as regions:
                self._session = make_session(self.export.path, device, opts, stream)
                self._prepare_batch(1)
                warm_up(self, max_context)
            advised = collapse(regions.added) if huge else None
            if advised is not None:
                _log.info("hugepages_advised", what="session and KV buffers", mib=advised >> 20)
        except BaseException:
            self.unload()
            raise
        total, free = device_memory(device)
        resolved = {
            "hugepages": HugePages.resolved(advised),
            "attention": "fused" if fused else "onnx",
        }
        return MemoryReport(weights, kv, total, free, resolved)

    def unload(self) -> None:
        self._session = self._kv = None
        self._step = {}
        self._batch = 0
        self._stream = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _prepare_batch(self, batch: int) -> None:
        spec = self._spec
        assert spec is not None
        if batch == self._batch:
            return
        self._kv, self._step, self._batch = None, {}, 0
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        layers, kvh, hd = spec.layers, spec.kv_heads_effective, spec.head_dim
        _, kv_bytes = planned_bytes(spec, torch_dtype(self._dtype), self._max_context, batch)
        slots = 1 if self._fused else 2
        check_memory(self._device, 0, slots * kv_bytes, f"KV cache for batch {batch}")
        io = self._io
        bucket = self._max_context if self._fused else self._opts.kv_bucket
        self._kv = KVBuffers(
            layers, batch, kvh, hd, self._max_context, bucket, io.zeros, slots=slots
        )
        self._step = {
            "ids": io.zeros((batch, 1), np.int64),
            "position": io.zeros((), np.int64),
            "logits": io.zeros((batch, 1, spec.vocab)),
        }
        if not self._fused:  # the step's new K/V, stored into the bucketed past by the loop
            self._step["new_k"] = io.zeros((layers, batch, kvh, 1, hd))
            self._step["new_v"] = io.zeros((layers, batch, kvh, 1, hd))
        self._batch = batch

    def last_logits(self) -> np.ndarray:
        """A host copy of the logits [batch, vocab] of the last step run (for parity checks;
        never read inside a timed region)."""
        logits = self._step.get("logits")
        if logits is None:
            raise FailedPrecondition(MODEL_NOT_LOADED, "load a model before generating")
        host = logits if isinstance(logits, np.ndarray) else logits.float().cpu().numpy()
        return np.array(host[:, 0], dtype=np.float32)

    # ---- generation ----
    def _bind(self, binding: Any, name: str, a: Any, output: bool = False) -> None:
        io = self._io
        dtype = np.int64 if name in ("input_ids", "position") else io.dtype
        bind = binding.bind_output if output else binding.bind_input
        bind(name, io.device_type, io.device_id, dtype, list(a.shape), io.ptr(a))

    def _bind_past(self, binding: Any, past: tuple[list[Any], list[Any]]) -> None:
        """Each layer's past K and V: views of the KV buffers, bound in place."""
        for names, views in zip(self._past_names, past, strict=True):
            for name, a in zip(names, views, strict=True):
                self._bind(binding, name, a)

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        session, spec = self._session, self._spec
        if session is None or spec is None:
            raise FailedPrecondition(MODEL_NOT_LOADED, "load a model before generating")
        check_generation(prompt_ids, output_tokens, batch_size, spec.vocab, self._max_context)
        self._prepare_batch(batch_size)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                return self._generate(session, prompt_ids, output_tokens, batch_size)
        return self._generate(session, prompt_ids, output_tokens, batch_size)

    def _generate(
        self, session: ort.InferenceSession, prompt_ids: Sequence[int], o: int, batch: int
    ) -> GenerationResult:
        io, kv, buf, fused = self._io, self._kv, self._step, self._fused
        assert kv is not None
        p = len(prompt_ids)
        prompt = io.prompt(prompt_ids, batch)
        out = io.zeros((batch, o), np.int64)
        binding = session.io_binding()
        clock = StepClock(self._timer)
        start_time = utcnow()
        clock.start()
        ids = io.upload(prompt)  # kept referenced: the binding holds only its address
        self._bind(binding, "input_ids", ids)
        io.set_position(buf["position"], 0)
        self._bind(binding, "position", buf["position"])
        self._bind(binding, "logits", buf["logits"], output=True)
        if fused:  # one static buffer a layer, past and present: written in place, bound once
            past = kv.view(0, self._max_context)
            self._bind_past(binding, past)
            present = output_names(len(past[0]), fused=True)[1:]
            for name, a in zip(present, (*past[0], *past[1]), strict=True):
                self._bind(binding, name, a, output=True)
        else:  # prefill: the prompt with an empty past; its K/V land in the KV buffers
            self._bind_past(binding, kv.view(0, 0))
            new_k, new_v = kv.prefill_outputs(p)
            self._bind(binding, "new_k", new_k, output=True)
            self._bind(binding, "new_v", new_v, output=True)
        session.run_with_iobinding(binding)
        io.argmax(buf["logits"], buf["ids"])
        out[:, 0] = buf["ids"][:, 0]
        if not fused:
            kv.after_prefill(p)
        binding.synchronize_outputs()
        clock.mark()
        # decode: one token per step against the dense past
        self._bind(binding, "input_ids", buf["ids"])
        if not fused:
            self._bind(binding, "new_k", buf["new_k"], output=True)
            self._bind(binding, "new_v", buf["new_v"], output=True)
            self._bind_past(binding, kv.past())
        for i in range(1, o):
            pos = p + i - 1
            io.set_position(buf["position"], pos)
            session.run_with_iobinding(binding)
            io.argmax(buf["logits"], buf["ids"])
            out[:, i] = buf["ids"][:, 0]
            if not fused and kv.store(pos, buf["new_k"], buf["new_v"]):
                self._bind_past(binding, kv.past())
            binding.synchronize_outputs()
            clock.mark()
        return clock_result(clock, p, io.tolist(out[0]), start_time, batch)


def create_backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()
