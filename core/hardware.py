"""Accelerators: the physical limits that roofline bounds and cost-aware runtimes use.

Figures are the vendors' datasheet numbers for *dense* math (half of the "with sparsity"
figures NVIDIA headlines), per device:
- `peak_flops[dtype]`: FLOP/s (a multiply-add is 2 FLOPs). "fp32" is the CUDA-core rate;
  "tf32" is fp32 matmul on tensor cores; "fp16"/"bf16"/"fp8"/"int8" are tensor-core rates
  (int8 in OP/s). A dtype the device has no fast path for is absent.
- `memory_bytes`: the marketed capacity (NVIDIA's "GB" are GiB here: 80 GB = 80 * 2**30;
  the H200's 141 GB likewise); the usable amount is a little lower.
- `mem_bandwidth_bytes_s`: peak DRAM/HBM bandwidth, decimal (3.35 TB/s = 3.35e12).
- `tdp_w`: board power limit; an upper bound for energy when no meter is read.
- `price_per_hour_usd`: indicative on-demand price of one device-hour (AWS us-east-1 2024
  instance price / GPUs per instance unless noted); callers pass their own price.

"cpu" describes the 2-vCPU machines this project runs CI on (see design.md); it is a
default for estimates, and benches should measure the machine at hand instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from idealrt.core.errors import InvalidArgument
from idealrt.core.reasons import DTYPE_UNSUPPORTED, UNKNOWN_ACCELERATOR

__all__ = ["ACCELERATORS", "Accelerator", "accelerator", "match_device_name"]

GiB = 2**30
T = 1e12


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    peak_flops: Mapping[str, float] = dataclasses.field(hash=False)
    mem_bandwidth_bytes_s: float
    tdp_w: float
    price_per_hour_usd: float
    source: str = ""

    def peak_flops_for(self, dtype: str) -> float:
        """Dense peak FLOP/s for matmuls in `dtype`."""
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise InvalidArgument(
                DTYPE_UNSUPPORTED,
                f"{self.name} has no peak for dtype {dtype!r}; known: {sorted(self.peak_flops)}",
                field="stack.dtype",
            ) from None

    def ridge_point(self, dtype: str) -> float:
        """Arithmetic intensity (FLOPs per byte) above which a kernel is compute-bound."""
        return self.peak_flops_for(dtype) / self.mem_bandwidth_bytes_s


def _flops(fp32: float, tf32: float = 0.0, half: float = 0.0, bf16: bool = True,
           fp8: float = 0.0, int8: float = 0.0) -> Mapping[str, float]:  # fmt: skip
    table = {"fp32": fp32, "tf32": tf32, "fp16": half, "bf16": half if bf16 else 0.0,
             "fp8": fp8, "int8": int8}  # fmt: skip
    return MappingProxyType({k: v for k, v in table.items() if v})


_A100 = _flops(19.5 * T, 156 * T, 312 * T, int8=624 * T)
_H100 = _flops(67 * T, 494.7 * T, 989.4 * T, fp8=1978.9 * T, int8=1978.9 * T)
_L4 = _flops(30.3 * T, 60 * T, 121 * T, fp8=242.5 * T, int8=242.5 * T)
_V100 = _flops(15.7 * T, half=125 * T, bf16=False)

_LIST: tuple[Accelerator, ...] = (
    Accelerator("A100-40GB", 40 * GiB, _A100, 1555e9, 400, 4.10,
                "NVIDIA A100 datasheet (SXM4); p4d.24xlarge / 8"),
    Accelerator("A100-80GB", 80 * GiB, _A100, 2039e9, 400, 5.12,
                "NVIDIA A100 datasheet (SXM4); p4de.24xlarge / 8"),
    Accelerator("H100-80GB", 80 * GiB, _H100, 3.35e12, 700, 12.29,
                "NVIDIA H100 datasheet (SXM5); p5.48xlarge / 8"),
    Accelerator("H200", 141 * GiB, _H100, 4.8e12, 700, 14.00,
                "NVIDIA H200 datasheet (SXM); price APPROX"),
    Accelerator("L4", 24 * GiB, _L4, 300e9, 72, 0.80, "NVIDIA L4 datasheet; g6.xlarge"),
    Accelerator("V100-16GB", 16 * GiB, _V100, 900e9, 300, 3.06,
                "NVIDIA V100 datasheet (SXM2); p3.2xlarge"),
    Accelerator("V100-32GB", 32 * GiB, _V100, 900e9, 300, 3.90,
                "NVIDIA V100 datasheet (SXM2); p3dn.24xlarge / 8"),
    # 2 vCPU (AVX-512) measured as in design.md: ~27 GB/s read, ~330 GFLOP/s fp32 matmul.
    # APPROX: 24 GiB RAM, ~10 W share of the socket, price of a 2-vCPU on-demand VM.
    Accelerator("cpu", 24 * GiB, _flops(330e9), 27e9, 10, 0.08,
                "design.md measurements of the CI machine class; benches should measure"),
)  # fmt: skip

ACCELERATORS: Mapping[str, Accelerator] = MappingProxyType({a.name: a for a in _LIST})
_FOLDED = {name.lower(): a for name, a in ACCELERATORS.items()}


def accelerator(name: str) -> Accelerator:
    """Look up an accelerator by name (any capitalisation), e.g. "H100-80GB", "cpu"."""
    found = _FOLDED.get(name.strip().lower())
    if found is None:
        raise InvalidArgument(
            UNKNOWN_ACCELERATOR,
            f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}",
            field="accelerator",
        )
    return found


def match_device_name(device_name: str) -> Accelerator | None:
    """The table entry for a driver-reported name such as torch.cuda.get_device_name()'s
    "NVIDIA H100 80GB HBM3" or "NVIDIA A100-SXM4-40GB"; None if there is none."""
    n = device_name.upper().replace("-", " ")
    words = n.split()
    if "H200" in n:
        return ACCELERATORS["H200"]
    if "H100" in n:
        return ACCELERATORS["H100-80GB"]
    if "A100" in n:
        return ACCELERATORS["A100-80GB" if "80GB" in n else "A100-40GB"]
    if "V100" in n:
        return ACCELERATORS["V100-32GB" if "32GB" in n else "V100-16GB"]
    if "L4" in words:
        return ACCELERATORS["L4"]
    return None
