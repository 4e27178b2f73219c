"""Roofline lower bounds on prefill and decode time, and how close a stack gets to them.

A phase can finish no faster than its arithmetic at peak FLOP/s, nor than its memory traffic
at peak bandwidth: lower bound = max(FLOPs / peak, bytes / bandwidth). FLOPs and bytes come
from `ModelSpec` (one definition for the whole project, see idealrt.core.model_spec):
- prefill of p tokens (batch 1): prefill_flops(p, last_logits_only=True) -- generation only
  needs the last position's logits, so this is the minimum a stack must do -- and bytes =
  the weights one forward pass reads (decode_bytes(1) minus one position of KV cache) plus
  writing the KV cache of p positions;
- one decode step at context c: decode_flops(c) and decode_bytes(c, dtype) (weights plus
  the KV cache of c positions).
Peak FLOP/s is the hardware table's figure for `dtype` (Accelerator.peak_flops_for), or a
measured pair (`MeasuredHardware`) -- benches should measure the machine at hand, and a stack
that runs fp32 matmuls on TF32 tensor cores should pass the TF32 peak this way.

`fraction_of_bound` = bound / actual, where actual is the cost model's alpha(p) for prefill
and beta(c) for decode. It is <= 1 when the inputs are right; a value above 1 means the
stated peak is lower than what the machine delivers, and is reported as is, never clipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from idealrt.core.costmodel.predict import alpha_at
from idealrt.core.domain import CostModel
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.hardware import Accelerator
from idealrt.core.model_spec import ModelSpec
from idealrt.services.metrics.reasons import (
    COST_MODEL_DEGENERATE,
    HARDWARE_LIMITS_INVALID,
    TOKENS_INVALID,
)

__all__ = [
    "BoundFractions",
    "MeasuredHardware",
    "RooflineBounds",
    "fraction_of_bound",
    "prefill_bytes",
    "roofline",
]

FloatArray = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class MeasuredHardware:
    """Measured limits of the machine at hand (e.g. a STREAM-like read and a matmul)."""

    mem_bandwidth_bytes_s: float
    peak_flops_s: float
    name: str = "measured"


Hardware: TypeAlias = Accelerator | MeasuredHardware


def _limits(hw: Hardware, dtype: str) -> tuple[float, float]:
    if isinstance(hw, MeasuredHardware):
        flops, bw = hw.peak_flops_s, hw.mem_bandwidth_bytes_s
    else:
        flops, bw = hw.peak_flops_for(dtype), hw.mem_bandwidth_bytes_s
    if not (flops > 0.0 and bw > 0.0):
        raise InvalidArgument(
            HARDWARE_LIMITS_INVALID,
            f"peak FLOP/s and bandwidth must be > 0, got {flops} and {bw}",
            field="hardware",
        )
    return flops, bw


@dataclasses.dataclass(frozen=True)
class RooflineBounds:
    """Lower bounds in seconds for prefill of p tokens and one decode step at context c."""

    prompt_tokens: int
    context: int
    prefill_flops: float
    prefill_bytes: float
    prefill_compute_s: float
    prefill_memory_s: float
    prefill_s_lower: float
    decode_flops: float
    decode_bytes: float
    decode_compute_s: float
    decode_memory_s: float
    decode_s_lower: float

    @property
    def prefill_bound_by(self) -> str:
        return "compute" if self.prefill_compute_s >= self.prefill_memory_s else "memory"

    @property
    def decode_bound_by(self) -> str:
        return "compute" if self.decode_compute_s >= self.decode_memory_s else "memory"


def prefill_bytes(spec: ModelSpec, p: int, dtype: str) -> float:
    """Bytes a prefill of p tokens must move: the weights once plus the KV cache written."""
    weights = spec.decode_bytes(1, dtype) - spec.kv_cache_bytes(1, dtype)
    return float(weights + spec.kv_cache_bytes(p, dtype))


def roofline(spec: ModelSpec, hw: Hardware, dtype: str, p: int, c: int) -> RooflineBounds:
    """Roofline lower bounds for a p-token prefill and a decode step at context c."""
    flops_s, bw = _limits(hw, dtype)
    pf = spec.prefill_flops(p, last_logits_only=True)
    pb = prefill_bytes(spec, p, dtype)
    df = spec.decode_flops(c)
    db = spec.decode_bytes(c, dtype)
    return RooflineBounds(
        prompt_tokens=p,
        context=c,
        prefill_flops=pf,
        prefill_bytes=pb,
        prefill_compute_s=pf / flops_s,
        prefill_memory_s=pb / bw,
        prefill_s_lower=max(pf / flops_s, pb / bw),
        decode_flops=df,
        decode_bytes=db,
        decode_compute_s=df / flops_s,
        decode_memory_s=db / bw,
        decode_s_lower=max(df / flops_s, db / bw),
    )


@dataclasses.dataclass(frozen=True)
class BoundFractions:
    """bound / actual per prompt size (prefill vs alpha) and per context (decode vs beta)."""

    prompt_tokens: tuple[int, ...]
    prefill_lower_s: FloatArray
    prefill_actual_s: FloatArray
    prefill_fraction: FloatArray
    contexts: tuple[int, ...]
    decode_lower_s: FloatArray
    decode_actual_s: FloatArray
    decode_fraction: FloatArray

    @property
    def exceeds_bound(self) -> bool:
        """True when some measurement beat its bound: the hardware figures are too low."""
        return bool(np.any(self.prefill_fraction > 1.0) or np.any(self.decode_fraction > 1.0))


def _positive_ints(values: Sequence[int], field: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    for i, v in enumerate(out):
        if v < 1:
            raise InvalidArgument(
                TOKENS_INVALID, f"{field}[{i}] must be >= 1, got {v}", field=f"{field}[{i}]"
            )
    return out


def fraction_of_bound(
    cm: CostModel,
    spec: ModelSpec,
    hw: Hardware,
    dtype: str,
    prompt_sizes: Sequence[int],
    contexts: Sequence[int],
) -> BoundFractions:
    """How close the fitted stack gets to the roofline: bound / alpha(p) for each prompt size
    and bound / beta(c) for each decode context (1 = at the physical limit)."""
    ps = _positive_ints(prompt_sizes, "prompt_sizes")
    cs = _positive_ints(contexts, "contexts")
    pre_lo = np.array([roofline(spec, hw, dtype, p, 1).prefill_s_lower for p in ps])
    dec_lo = np.array([roofline(spec, hw, dtype, 1, c).decode_s_lower for c in cs])
    pre_act = np.asarray(alpha_at(cm, np.array(ps, dtype=np.float64)), dtype=np.float64)
    dec_act = cm.beta0_s + cm.beta1_s * np.array(cs, dtype=np.float64)
    if np.any(pre_act <= 0.0) or np.any(dec_act <= 0.0):
        raise FailedPrecondition(
            COST_MODEL_DEGENERATE,
            "the cost model predicts a non-positive prefill or decode time at some of the "
            "requested sizes; it cannot be compared with a bound",
            field="cost_model",
        )
    return BoundFractions(
        prompt_tokens=ps,
        prefill_lower_s=pre_lo,
        prefill_actual_s=pre_act,
        prefill_fraction=pre_lo / pre_act,
        contexts=cs,
        decode_lower_s=dec_lo,
        decode_actual_s=dec_act,
        decode_fraction=dec_lo / dec_act,
    )
