"""Roofline bounds computed by hand for a tiny spec, and fractions of the bound."""

from __future__ import annotations

import numpy as np
import pytest

from idealrt.core.catalog import resolve
from idealrt.core.domain import CostModel
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.hardware import accelerator
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional
from idealrt.services.metrics import roofline as roofline_mod
from idealrt.services.metrics.roofline import MeasuredHardware, fraction_of_bound, roofline

# 1 layer, d=4, 1 head, d_ff=8, vocab 10, rotary (no position table), no biases, RMSNorm,
# tied head. Parameters: embedding 40 + attention 4*16 = 64 + MLP 2*4*8 = 64 + norms
# 2*4 + 4 = 12 -> 180. Matmul parameters: 64 + 64 + LM head 40 = 168.
# KV cache per token (fp32): 2 (K, V) * 1 layer * 4 dims * 4 bytes = 32 bytes.
TINY = ModelSpec(
    "tiny-hand",
    layers=1,
    d_model=4,
    heads=1,
    d_ff=8,
    vocab=10,
    max_positions=16,
    norm=Norm.RMSNORM,
    activation=Activation.RELU,
    positional=Positional.ROTARY,
    bias=False,
)


def test_all_is_what_it_claims() -> None:
    for name in roofline_mod.__all__:
        assert hasattr(roofline_mod, name)


def test_tiny_spec_by_hand_memory_bound() -> None:
    assert TINY.param_count() == 180
    hw = MeasuredHardware(mem_bandwidth_bytes_s=100.0, peak_flops_s=1000.0)
    b = roofline(TINY, hw, "fp32", p=3, c=5)
    # prefill of 3 tokens, LM head on the last one only:
    # 2*168*3 - 2*40*2 (head skipped on 2 positions) + 4*1*4*(1+2+3) = 1008 - 160 + 96 = 944
    assert b.prefill_flops == 944
    # bytes: weights 180*4 = 720, plus the KV cache written for 3 positions: 96
    assert b.prefill_bytes == 816
    assert b.prefill_compute_s == pytest.approx(0.944)
    assert b.prefill_memory_s == pytest.approx(8.16)
    assert b.prefill_s_lower == pytest.approx(8.16)
    assert b.prefill_bound_by == "memory"
    # decode at context 5: 2*168 + 4*1*4*5 = 416 FLOPs; 720 + 5*32 = 880 bytes
    assert b.decode_flops == 416
    assert b.decode_bytes == 880
    assert b.decode_s_lower == pytest.approx(8.8)
    assert b.decode_bound_by == "memory"


def test_tiny_spec_by_hand_compute_bound() -> None:
    b = roofline(TINY, MeasuredHardware(100.0, 100.0), "fp32", p=3, c=5)
    assert b.prefill_s_lower == pytest.approx(9.44)
    assert b.prefill_bound_by == "compute"
    assert b.decode_s_lower == pytest.approx(8.8)  # 4.16 s compute < 8.8 s memory


def test_accelerator_peak_for_dtype() -> None:
    spec = resolve("davinci")
    a100 = accelerator("A100-80GB")
    b = roofline(spec, a100, "fp16", p=1024, c=1024)
    # decode: memory bound, ~ weights / bandwidth = 349 GB / 2039 GB/s = 0.171 s
    assert b.decode_bound_by == "memory"
    assert b.decode_s_lower == pytest.approx(spec.decode_bytes(1024, "fp16") / 2039e9)
    assert 0.17 < b.decode_s_lower < 0.18
    # prefill of 1024 tokens: compute bound at 312 TFLOP/s
    assert b.prefill_bound_by == "compute"
    assert b.prefill_s_lower == pytest.approx(
        spec.prefill_flops(1024, last_logits_only=True) / 312e12
    )
    with pytest.raises(InvalidArgument) as ei:
        roofline(spec, accelerator("V100-16GB"), "fp8", 1, 1)
    assert ei.value.reason == "DTYPE_UNSUPPORTED"
    with pytest.raises(InvalidArgument) as ei:
        roofline(spec, MeasuredHardware(0.0, 1.0), "fp16", 1, 1)
    assert ei.value.reason == "HARDWARE_LIMITS_INVALID"


def _cm(beta0: float, beta1: float = 0.0) -> CostModel:
    return CostModel(
        id="cm",
        profile_id="",
        alpha_knots_p=(1, 3),
        alpha_knots_s=(10.0, 16.32),
        beta0_s=beta0,
        beta1_s=beta1,
    )


def test_fraction_of_bound() -> None:
    hw = MeasuredHardware(100.0, 1000.0)
    fr = fraction_of_bound(_cm(10.0, 2.0), TINY, hw, "fp32", [3], [5, 1])
    # prefill(3) bound 8.16 s vs alpha(3) = 16.32 s
    np.testing.assert_allclose(fr.prefill_fraction, [0.5])
    # decode: bound 8.8 s at c=5 vs beta(5) = 20 s; at c=1: 7.52 s vs 12 s
    np.testing.assert_allclose(fr.decode_lower_s, [8.8, 7.52])
    np.testing.assert_allclose(fr.decode_actual_s, [20.0, 12.0])
    np.testing.assert_allclose(fr.decode_fraction, [0.44, 7.52 / 12.0])
    assert not fr.exceeds_bound
    # a stack "faster than physics": the fraction is reported, not clipped
    fast = fraction_of_bound(_cm(4.4), TINY, hw, "fp32", [3], [5])
    np.testing.assert_allclose(fast.decode_fraction, [2.0])
    assert fast.exceeds_bound


def test_fraction_errors() -> None:
    hw = MeasuredHardware(100.0, 1000.0)
    with pytest.raises(FailedPrecondition) as ei:
        fraction_of_bound(_cm(0.0), TINY, hw, "fp32", [3], [5])
    assert ei.value.reason == "COST_MODEL_DEGENERATE"
    with pytest.raises(InvalidArgument) as ei2:
        fraction_of_bound(_cm(1.0), TINY, hw, "fp32", [3, 0], [5])
    assert ei2.value.field == "prompt_sizes[1]"
