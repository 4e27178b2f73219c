"""The `pytorch` backend: the reference decoder in eager PyTorch (CPU or CUDA; fp32/fp16/bf16).

Options (StackSpec.options; recorded with every measurement):
- threads: "N" -> torch.set_num_threads(N) (process-wide; set again before each generation).
- cuda_graphs: "1" -> the decode step is captured in a CUDA graph (CUDA only; on the CPU
  InvalidArgument OPTION_INVALID). The captured step is `Decoder.forward_static`, which
  attends over the whole max_context window (masked), so its cost does not grow with the
  context: load with a max_context near the longest p + o you will measure.
- torch_compile: "1" -> the decode step (`forward_static`) goes through torch.compile
  (static shapes; compiled while loading and at the first use of each batch size, outside
  any timed region). Needs a C++ compiler on the CPU.
- kernels: "auto" (default) | "native" | "aten" -> what runs the eager CPU fp32 decode step
  at batch 1: `native` is idealrt's streaming GEMV and single-token attention
  (`idealrt.services.serving.decoder.native`, compiled at first use), `aten` is torch.mm
  (MKL) and scaled_dot_product_attention. auto takes native when it builds and passes its
  check on this machine, else aten; the choice is recorded in the loaded model's stack
  options. native on another device or dtype is OPTION_INVALID; native that cannot be
  built is FAILED_PRECONDITION (NATIVE_KERNELS_UNAVAILABLE).
- hugepages: "auto" (default) | "1" | "0" -> transparent huge pages for the weights and the
  KV cache on the CPU (`idealrt.services.serving.hugepages`: a decode step streams both, and
  2 MiB pages cut its TLB misses; measured 2.4-5.2% faster at GPT-2 small). auto: where Linux
  allows it; "1" fails with FAILED_PRECONDITION HUGEPAGES_UNAVAILABLE elsewhere. Recorded
  as "on" or "off" in the loaded model's stack options.
The prefill is always eager `Decoder.forward` on ATen, at every prompt size: a 1-token
prompt through the native kernels would cost a decode step while 2 tokens cost an ATen
GEMM, a step in alpha(p) that no interpolation between profiled sizes could follow.

Without options the decode step is eager `Decoder.forward` over the cache prefix: one
prefix-length attention, K/V written in place into the preallocated cache, logits only for
the last position, no per-step host/device copies except the token itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from idealrt.core.clock import utcnow
from idealrt.core.domain import StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.logging import get_logger
from idealrt.core.model_spec import ModelSpec, check_fits_context, resolve_max_context
from idealrt.core.reasons import OPTION_INVALID, OUTPUT_TOKENS_INVALID
from idealrt.core.serving_contract import GenerationResult, MemoryReport
from idealrt.services.serving.backends._onnx_cache import cache_root
from idealrt.services.serving.backends.base import (
    check_memory,
    check_options,
    choice_option,
    clock_result,
    device_memory,
    resolve_device,
)
from idealrt.services.serving.decoder import Decoder, build_decoder, planned_bytes, torch_dtype
from idealrt.services.serving.decoder.build import cache_bytes
from idealrt.services.serving.decoder.native import (
    NativeKernels,
    NativeUnavailable,
    load_kernels,
)
from idealrt.services.serving.hugepages import MIN_BYTES, HugePages, collapse, tensor_range
from idealrt.services.serving.reasons import (
    ALREADY_LOADED,
    BATCH_SIZE_INVALID,
    MODEL_NOT_LOADED,
    NATIVE_KERNELS_UNAVAILABLE,
    PROMPT_EMPTY,
    TOKEN_OUT_OF_RANGE,
    TORCH_COMPILE_FAILED,
)
from idealrt.services.serving.timing import StepClock, Timer, timer_for

__all__ = [
    "OPTIONS",
    "PytorchBackend",
    "TorchOptions",
    "check_generation",
    "create_backend",
    "warm_up",
]

OPTIONS = ("threads", "cuda_graphs", "torch_compile", "kernels", "hugepages")
KERNEL_CHOICES = ("auto", "native", "aten")
Step = Callable[[torch.Tensor, int], torch.Tensor]
_log = get_logger(__name__)


def _flag(options: dict[str, str], key: str) -> bool:
    value = options.get(key, "0").strip().lower()
    if value in ("", "0", "false", "off"):
        return False
    if value in ("1", "true", "on"):
        return True
    raise InvalidArgument(
        OPTION_INVALID, f"option {key} must be 0 or 1, got {value!r}", field="stack.options"
    )


@dataclasses.dataclass(frozen=True)
class TorchOptions:
    threads: int = 0
    cuda_graphs: bool = False
    torch_compile: bool = False
    kernels: str = "auto"
    hugepages: HugePages = dataclasses.field(default_factory=HugePages)

    @classmethod
    def parse(cls, stack: StackSpec, known: Sequence[str] = OPTIONS) -> TorchOptions:
        check_options(stack, known)
        raw = stack.options.get("threads", "").strip()
        try:
            threads = int(raw) if raw else 0
        except ValueError:
            threads = -1
        if threads < 0 or (raw and threads == 0):
            raise InvalidArgument(
                OPTION_INVALID,
                f"option threads must be an integer >= 1, got {raw!r}",
                field="stack.options",
            )
        kernels = choice_option(stack, "kernels", KERNEL_CHOICES)
        return cls(
            threads,
            _flag(stack.options, "cuda_graphs"),
            _flag(stack.options, "torch_compile"),
            kernels,
            HugePages.parse(stack),
        )


def check_generation(
    prompt_ids: Sequence[int], output_tokens: int, batch_size: int, vocab: int, max_context: int
) -> None:
    """The request checks every backend repeats (the registry checks first, with fields)."""
    p = len(prompt_ids)
    if p < 1:
        raise InvalidArgument(
            PROMPT_EMPTY, "the prompt needs at least 1 token", field="prompt.length"
        )
    if output_tokens < 1:
        raise InvalidArgument(
            OUTPUT_TOKENS_INVALID,
            f"output_tokens must be >= 1, got {output_tokens}",
            field="output_tokens",
        )
    if batch_size < 1:
        raise InvalidArgument(
            BATCH_SIZE_INVALID, f"batch_size must be >= 1, got {batch_size}", field="batch_size"
        )
    check_fits_context(p, output_tokens, max_context)
    lo, hi = min(prompt_ids), max(prompt_ids)
    if lo < 0 or hi >= vocab:
        raise InvalidArgument(
            TOKEN_OUT_OF_RANGE,
            f"token ids must be in [0, {vocab}), got [{lo}, {hi}]",
            field="prompt.token_ids",
        )


def warm_up(backend: Any, max_context: int) -> None:
    """One tiny untimed generation right after loading, so that first-call costs (lazy
    kernel initialisation, allocator growth) never land in a measured sample."""
    if max_context >= 3:
        backend.generate([0] * min(2, max_context - 2), 2)


class PytorchBackend:
    name = "pytorch"

    def __init__(self) -> None:
        self._decoder: Decoder | None = None
        self._cache: torch.Tensor | None = None
        self._batch = 0
        self._device: torch.device = torch.device("cpu")
        self._opts = TorchOptions()
        self._timer: Timer = timer_for("cpu")
        self._max_context = 0
        self._step: Step | None = None
        self._static_step: Callable[..., torch.Tensor] | None = None
        self._graph: Any = None
        self._native: NativeKernels | None = None
        self._huge = False

    # ---- load / unload ----
    def load(
        self, spec: ModelSpec, stack: StackSpec, weights_path: str, seed: int, max_context: int
    ) -> MemoryReport:
        if self._decoder is not None:
            raise FailedPrecondition(ALREADY_LOADED, "this backend instance already holds a model")
        opts = TorchOptions.parse(stack)
        dtype = torch_dtype(stack.dtype)
        device = resolve_device(stack.device)
        if opts.cuda_graphs and device.type != "cuda":
            raise InvalidArgument(
                OPTION_INVALID, "option cuda_graphs=1 needs a CUDA device", field="stack.options"
            )
        native_ok = device.type == "cpu" and dtype == torch.float32 and not opts.torch_compile
        if opts.kernels == "native" and not native_ok:
            raise InvalidArgument(
                OPTION_INVALID,
                "option kernels=native needs device cpu, dtype fp32 and no torch_compile",
                field="stack.options",
            )
        max_context = resolve_max_context(spec, max_context)
        weights, kv = planned_bytes(spec, dtype, max_context, 1)
        check_memory(device, weights, kv, f"model {spec.name!r} in {stack.dtype}")
        huge = opts.hugepages.wanted(device)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self._device, self._opts, self._max_context = device, opts, max_context
        self._huge = huge
        self._timer = timer_for(device)
        self._decoder = build_decoder(
            spec,
            dtype=dtype,
            device=device,
            max_context=max_context,
            seed=seed,
            weights_path=weights_path,
        )
        resolved: dict[str, str] = {}
        try:
            if native_ok and opts.kernels != "aten":
                resolved["kernels"] = self._use_native(opts.kernels)
            advised = self._advise_huge_pages() if huge else None
            resolved["hugepages"] = HugePages.resolved(advised)
            self._prepare_batch(1)
            warm_up(self, max_context)
        except BaseException:
            self.unload()
            raise
        total, free = device_memory(device)
        return MemoryReport(weights, kv, total, free, resolved)

    def _use_native(self, choice: str) -> str:
        """Attach the native kernel to the decoder; "native" or, for auto when it cannot be
        built here, "aten" (logged with the reason)."""
        assert self._decoder is not None
        try:
            kernel = load_kernels(cache_root())
        except NativeUnavailable as e:
            if choice == "native":
                raise FailedPrecondition(NATIVE_KERNELS_UNAVAILABLE, str(e)) from e
            _log.warning("native_kernels_unavailable", reason=str(e), using="aten")
            return "aten"
        self._native = kernel
        return "native"

    def _advise_huge_pages(self) -> int:
        """Huge pages for the weights (the KV cache gets them in `_prepare_batch`)."""
        assert self._decoder is not None
        ranges = [tensor_range(p) for p in self._decoder.parameters() if p.nbytes >= MIN_BYTES]
        advised = collapse(ranges)
        _log.info("hugepages_advised", what="weights", mib=advised >> 20)
        return advised

    def unload(self) -> None:
        self._decoder = self._cache = self._graph = self._native = None
        self._step = self._static_step = None
        self._batch = 0
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- batch-dependent state: cache, compiled step, CUDA graph ----
    def _prepare_batch(self, batch: int) -> None:
        dec = self._decoder
        assert dec is not None
        if batch == self._batch:
            return
        self._cache = self._graph = self._step = None
        self._batch = 0
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        check_memory(self._device, 0, cache_bytes(dec, batch), f"KV cache for batch {batch}")
        self._cache = dec.new_cache(batch)
        if self._huge:
            collapse([tensor_range(self._cache)])
        if self._opts.torch_compile and self._static_step is None:
            self._static_step = torch.compile(dec.forward_static, dynamic=False)
        static = self._static_step or dec.forward_static
        with torch.inference_mode():
            if self._opts.cuda_graphs:
                self._step = self._capture(static, batch)
            elif self._opts.torch_compile:
                self._step = self._compiled_step(static, batch)
            else:
                self._step = self._eager_step
        self._batch = batch

    def _eager_step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        assert self._decoder is not None and self._cache is not None
        logits = self._decoder(tok.view(-1, 1), self._cache, pos, last_only=True)
        return logits[:, -1].argmax(-1)

    def _compiled_step(self, static: Callable[..., torch.Tensor], batch: int) -> Step:
        cache = self._cache
        pos_t = torch.zeros((), dtype=torch.int64, device=self._device)

        def step(tok: torch.Tensor, pos: int) -> torch.Tensor:
            pos_t.fill_(pos)
            return static(tok.view(-1, 1), cache, pos_t, last_only=True)[:, -1].argmax(-1)

        try:  # compile now (slot 0 is rewritten by every prefill)
            step(torch.zeros(batch, dtype=torch.int64, device=self._device), 0)
            self._timer.now_ns()
        except Exception as e:
            raise FailedPrecondition(
                TORCH_COMPILE_FAILED, f"torch.compile of the decode step failed: {e}"
            ) from e
        return step

    def _capture(self, static: Callable[..., torch.Tensor], batch: int) -> Step:
        cache = self._cache
        tok_in = torch.zeros(batch, 1, dtype=torch.int64, device=self._device)
        pos_t = torch.zeros((), dtype=torch.int64, device=self._device)
        tok_out = torch.zeros(batch, dtype=torch.int64, device=self._device)

        def body() -> None:
            tok_out.copy_(static(tok_in, cache, pos_t, last_only=True)[:, -1].argmax(-1))

        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (and compile) outside the graph
                body()
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        self._graph = graph

        def step(tok: torch.Tensor, pos: int) -> torch.Tensor:
            tok_in.copy_(tok.view(-1, 1))
            pos_t.fill_(pos)
            graph.replay()
            return tok_out

        return step

    # ---- generation ----
    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        dec = self._decoder
        if dec is None:
            raise FailedPrecondition(MODEL_NOT_LOADED, "load a model before generating")
        check_generation(prompt_ids, output_tokens, batch_size, dec.spec.vocab, self._max_context)
        self._prepare_batch(batch_size)
        if self._opts.threads:
            torch.set_num_threads(self._opts.threads)
        step, cache = self._step, self._cache
        assert step is not None and cache is not None
        p, o = len(prompt_ids), output_tokens
        prompt = torch.tensor(list(prompt_ids), dtype=torch.int64).view(1, p).expand(batch_size, p)
        out = torch.empty(batch_size, o, dtype=torch.int64, device=self._device)
        clock = StepClock(self._timer)
        with torch.inference_mode():
            start_time = utcnow()
            clock.start()
            dec.use_native(None)  # the prefill is ATen at every p, p = 1 included
            logits = dec(prompt.to(self._device), cache, 0, last_only=True)
            dec.use_native(self._native)
            tok = logits[:, -1].argmax(-1)
            out[:, 0] = tok
            clock.mark()
            for i in range(1, o):
                tok = step(tok, p + i - 1)
                out[:, i] = tok
                clock.mark()
        return clock_result(clock, p, out[0].tolist(), start_time, batch_size)


def create_backend() -> PytorchBackend:
    return PytorchBackend()
