"""ONNX Runtime sessions for the `onnxruntime` backend: its stack options and the session
that runs the exported step on the CPU or CUDA execution provider.

Options (StackSpec.options):
- threads: "N" -> intra_op_num_threads (default: ONNX Runtime's, one per physical core).
- kv_bucket (attention=onnx): KV buffer growth in slots (default 32; see
  `_kv_buffers.KVBuffers`); a value >= max_context attends the whole max_context window at
  every step (flat cost).
- hugepages: "auto" (default) | "1" | "0" -> transparent huge pages for the memory the
  session and the KV buffers add to the process (ONNX Runtime's allocator does not ask for
  them; `idealrt.services.serving.hugepages` merges the new anonymous mappings): measured
  5-8% faster decode at GPT-2 small on the CPU. As the pytorch backend's option.
- attention: "auto" (default) | "fused" | "onnx". fused: each layer's attention, cache
  write included, is ONNX Runtime's GroupQueryAttention kernel (`decoder/fused_attention.py`,
  a separately cached export whose residual stream is rows [B*T, d], so its GEMMs need no
  reshapes: 169 nodes a GPT-2 step instead of 457) over one static max_context cache bound
  as both past and present and written in place (no KV copies, half the KV memory, no
  rebinding). CPU, fp32, no ALiBi only (FAILED_PRECONDITION FUSED_ATTENTION_UNAVAILABLE
  otherwise). onnx: the exported graph's own attention (MatMul, Softmax, MatMul over the
  bucketed dense past; what TensorRT builds from). auto: fused where it can run and no
  kv_bucket is given, else onnx. Measured on the reference EPYC, GPT-2 small, CPU fp32,
  each flavour in its own process, 7 interleaved rounds: fused 13.17 / 14.05 ms at
  context 128 / 512 against 14.26 / 15.35 ms (1 thread), 10.35 / 10.94 against 10.64 /
  11.48 ms (2 threads); in full `make bench` runs since, fused was 1% slower (14.17 /
  15.30 against 14.00 / 15.18 ms) and 5-6% faster (13.86 / 14.76 against 14.65 / 15.73
  ms): on a par at worst, with half the KV memory. The stack records
  `attention: fused|onnx`.
- spinning: "1" lets the intra-op threads spin between runs (ONNX Runtime's default). Off by
  default: spinning threads compete with everything else on the machine (the harness
  included), and on the 2-core reference CPU it did not make decode reliably faster.
Session: graph optimizations ORT_ENABLE_ALL, sequential execution, memory patterns on. On
the CPU, ONNX Runtime's MatMulScaleFusion is disabled (`DISABLED_OPTIMIZERS`): it folds the
attention scale (q * 1/sqrt(hd)) into the q @ K^T product as alpha, and MLAS runs a
one-row product with alpha != 1 as a general GEMM that packs K first, instead of its
one-row kernel: measured 12.7 vs 21.6 GB/s over the past keys (GPT-2-small shapes, one
thread), ~0.65 ms of a decode step at context 512.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from idealrt.core.domain import StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.core.reasons import OPTION_INVALID
from idealrt.services.serving.backends._kv_buffers import DEFAULT_BUCKET
from idealrt.services.serving.backends._onnx_cache import int_option
from idealrt.services.serving.backends.base import check_options, choice_option
from idealrt.services.serving.decoder.fused_attention import unsupported
from idealrt.services.serving.hugepages import HugePages
from idealrt.services.serving.reasons import FUSED_ATTENTION_UNAVAILABLE, PROVIDER_UNAVAILABLE

__all__ = [
    "ATTENTION",
    "DISABLED_OPTIMIZERS",
    "DTYPES",
    "OPTIONS",
    "PROVIDERS",
    "OrtOptions",
    "make_session",
    "unavailable",
]

OPTIONS = ("threads", "kv_bucket", "spinning", "hugepages", "attention")
ATTENTION = ("auto", "fused", "onnx")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DTYPES = {"cpu": ("fp32",), "cuda": ("fp32", "fp16")}
# ONNX Runtime graph transformers turned off, per device type (see the module doc).
DISABLED_OPTIMIZERS: dict[str, tuple[str, ...]] = {"cpu": ("MatMulScaleFusion",)}


@dataclasses.dataclass(frozen=True)
class OrtOptions:
    threads: int = 0
    kv_bucket: int = DEFAULT_BUCKET
    spinning: bool = False
    hugepages: HugePages = dataclasses.field(default_factory=HugePages)
    attention: str = "auto"
    bucket_given: bool = False  # kv_bucket set explicitly: auto keeps the bucketed past

    @classmethod
    def parse(cls, stack: StackSpec) -> OrtOptions:
        check_options(stack, OPTIONS)
        spin = stack.options.get("spinning", "0").strip().lower()
        if spin not in ("", "0", "1", "true", "false", "on", "off"):
            raise InvalidArgument(
                OPTION_INVALID,
                f"option spinning must be 0 or 1, got {spin!r}",
                field="stack.options",
            )
        attention = choice_option(stack, "attention", ATTENTION)
        bucket_given = bool(stack.options.get("kv_bucket", "").strip())
        if attention == "fused" and bucket_given:
            raise InvalidArgument(
                OPTION_INVALID,
                "option kv_bucket applies to attention=onnx only (fused attention reads one "
                "static max_context buffer in place)",
                field="stack.options",
            )
        return cls(
            int_option(stack, "threads", 0, 1),
            int_option(stack, "kv_bucket", DEFAULT_BUCKET, 1),
            spin in ("1", "true", "on"),
            HugePages.parse(stack),
            attention,
            bucket_given,
        )

    def fused(self, spec: ModelSpec, device: torch.device, dtype: str) -> bool:
        """Whether the step graph uses fused attention: `fused` (FailedPrecondition
        FUSED_ATTENTION_UNAVAILABLE where it cannot run), or `auto` where it can and no
        kv_bucket was given (that option belongs to the bucketed past of `onnx`)."""
        if self.attention == "onnx":
            return False
        why = unsupported(spec, device.type, dtype)
        if self.attention == "fused" and why is not None:
            raise FailedPrecondition(
                FUSED_ATTENTION_UNAVAILABLE,
                f"attention=fused: {why}; use attention=onnx",
                field="stack.options",
            )
        return why is None and not self.bucket_given


def unavailable(provider: str, detail: str) -> FailedPrecondition:
    return FailedPrecondition(
        PROVIDER_UNAVAILABLE,
        f"onnxruntime {ort.__version__}: {provider} {detail}. For CUDA install onnxruntime-gpu "
        "(in place of onnxruntime) with CUDA and cuDNN libraries it can load",
    )


def make_session(
    path: Path,
    device: torch.device,
    opts: OrtOptions,
    stream: int = 0,
    *,
    optimized_path: Path | None = None,
) -> ort.InferenceSession:
    """A session on the provider of `device`; FailedPrecondition PROVIDER_UNAVAILABLE unless
    the session really runs on it. `optimized_path`: also write the graph as optimized for
    this session there (to inspect what ONNX Runtime runs)."""
    provider = PROVIDERS[device.type]
    if provider not in ort.get_available_providers():
        raise unavailable(provider, f"is not available (have {ort.get_available_providers()})")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_pattern = True
    so.log_severity_level = 3  # errors only
    if opts.threads:
        so.intra_op_num_threads = opts.threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.spinning else "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name",
            optimized_path.name + ".data",
        )
    providers: list[Any] = [provider]
    if device.type == "cuda":
        cuda: dict[str, str] = {"device_id": str(device.index or 0)}
        if stream:  # ONNX Runtime ignores a null handle (torch's legacy default stream)
            cuda["user_compute_stream"] = str(stream)
        providers = [(provider, cuda), "CPUExecutionProvider"]
    session = ort.InferenceSession(
        str(path),
        so,
        providers=providers,
        disabled_optimizers=list(DISABLED_OPTIMIZERS.get(device.type, ())),
    )
    if provider not in session.get_providers():
        runs = session.get_providers()
        raise unavailable(provider, f"was requested but the session runs on {runs}")
    return session
