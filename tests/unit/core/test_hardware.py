"""Hardware table: lookups, units and sanity of the datasheet figures."""

from __future__ import annotations

from typing import Any

import pytest

from idealrt.core import hardware
from idealrt.core.errors import InvalidArgument
from idealrt.core.hardware import ACCELERATORS, accelerator, match_device_name

REQUIRED = {"A100-40GB", "A100-80GB", "H100-80GB", "H200", "L4", "V100-16GB", "V100-32GB", "cpu"}


def test_required_entries() -> None:
    assert set(ACCELERATORS) == REQUIRED
    for name, acc in ACCELERATORS.items():
        assert acc.name == name
        assert acc.memory_bytes > 0 and acc.mem_bandwidth_bytes_s > 0
        assert acc.tdp_w > 0 and acc.price_per_hour_usd > 0 and acc.source
        assert acc.peak_flops_for("fp32") > 0


def test_datasheet_figures() -> None:
    h100 = accelerator("H100-80GB")
    assert h100.memory_bytes == 80 * 2**30
    assert h100.peak_flops_for("bf16") == pytest.approx(989.4e12)  # dense, not sparse
    assert h100.mem_bandwidth_bytes_s == pytest.approx(3.35e12)
    a100 = accelerator("A100-40GB")
    assert a100.peak_flops_for("fp16") == pytest.approx(312e12)
    assert accelerator("A100-80GB").mem_bandwidth_bytes_s > a100.mem_bandwidth_bytes_s
    assert accelerator("H200").memory_bytes > h100.memory_bytes
    cpu = accelerator("cpu")
    assert cpu.mem_bandwidth_bytes_s == pytest.approx(27e9)
    assert cpu.peak_flops_for("fp32") == pytest.approx(330e9)


def test_ridge_point() -> None:
    a = accelerator("A100-40GB")
    assert a.ridge_point("fp16") == pytest.approx(312e12 / 1555e9)


def test_lookup_is_case_insensitive() -> None:
    assert accelerator("h100-80gb") is ACCELERATORS["H100-80GB"]
    assert accelerator("CPU") is ACCELERATORS["cpu"]


def test_unknown_accelerator() -> None:
    with pytest.raises(InvalidArgument) as ei:
        accelerator("TPUv5")
    assert ei.value.reason == "UNKNOWN_ACCELERATOR"
    assert "H100-80GB" in ei.value.message


def test_unsupported_dtype() -> None:
    with pytest.raises(InvalidArgument) as ei:
        accelerator("V100-16GB").peak_flops_for("bf16")  # Volta has no bf16 tensor cores
    assert ei.value.reason == "DTYPE_UNSUPPORTED"


@pytest.mark.parametrize(
    ("reported", "name"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA L4", "L4"),
        ("Tesla V100-SXM2-32GB", "V100-32GB"),
        ("Tesla V100-SXM2-16GB", "V100-16GB"),
    ],
)
def test_match_device_name(reported: str, name: str) -> None:
    assert match_device_name(reported) is ACCELERATORS[name]


def test_match_device_name_unknown() -> None:
    assert match_device_name("NVIDIA GeForce RTX 4090") is None
    assert match_device_name("NVIDIA L40S") is None


def test_frozen_and_hashable() -> None:
    a: Any = accelerator("L4")
    assert hash(a) == hash(accelerator("L4"))
    with pytest.raises(AttributeError):
        a.tdp_w = 1.0


def test_all_exported() -> None:
    for n in hardware.__all__:
        assert hasattr(hardware, n)
