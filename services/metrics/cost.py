"""Cost-aware variants of a runtime: accelerators needed, accelerator-seconds, dollars, energy.

The paper's cost-aware idealized runtime multiplies the runtime by the number of
accelerators the model needs: enough devices to hold the weights and the KV cache at the
maximum context, rounded up to a power of two (tensor parallelism over 1, 2, 4, 8, ... GPUs).

Energy is always labelled with where it came from:
- "measured": an `EnergyModel` fitted by least squares to the energy metered around each
  sample (`Sample.contention.energy_j`, NVML or RAPL): E = j_per_request + j_per_prompt_token
  * p + j_per_output_token * o, all coefficients >= 0 (scipy nnls). Scaled by
  n_accelerators / the number of devices the meter covered.
- "tdp": board power limit x runtime x n_accelerators, an upper bound.
CO2 is energy x grid intensity (g CO2e per kWh) when the caller gives one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.optimize

from idealrt.core import hardware
from idealrt.core.domain import Sample, SampleFlag
from idealrt.core.errors import InvalidArgument, ResourceExhausted
from idealrt.core.hardware import Accelerator
from idealrt.core.model_spec import ModelSpec, check_max_context
from idealrt.services.metrics.reasons import (
    ACCELERATORS_INVALID,
    GRID_INTENSITY_INVALID,
    MODEL_EXCEEDS_HOST_MEMORY,
    PRICE_INVALID,
    RESERVE_FRAC_INVALID,
    RUNTIME_INVALID,
)

__all__ = [
    "CPU_ACCELERATOR",
    "MAX_ACCELERATORS",
    "CostBreakdown",
    "EnergyModel",
    "accelerators_needed",
    "cost_of",
    "fit_energy_model",
    "memory_needed_bytes",
]

CPU_ACCELERATOR = "cpu"  # the hardware table's name for host CPUs: memory is host RAM
MAX_ACCELERATORS = 2**31 - 1  # the contract carries the count as int32
_J_PER_KWH = 3.6e6


def _resolve(acc: Accelerator | str) -> Accelerator:
    return acc if isinstance(acc, Accelerator) else hardware.accelerator(acc)


def memory_needed_bytes(spec: ModelSpec, dtype: str, max_context: int, batch: int = 1) -> int:
    """Weights plus the KV cache of `batch` sequences at `max_context` positions."""
    check_max_context(max_context)
    return spec.weight_bytes(dtype) + spec.kv_cache_bytes(max_context, dtype, batch)


def accelerators_needed(
    spec: ModelSpec,
    dtype: str,
    accelerator: Accelerator | str,
    max_context: int,
    batch: int = 1,
    reserve_frac: float = 0.1,
    power_of_two: bool = True,
) -> int:
    """Devices needed to hold the model: ceil(need / (memory * (1 - reserve_frac))), where
    need = weights + KV cache at max_context for `batch` sequences and the reserve covers
    activations, workspace and fragmentation; rounded up to a power of two (the paper's
    tensor-parallel degrees) unless power_of_two=False.

    On the host CPU ("cpu") the model runs in one process: 1 when it fits in RAM, else
    ResourceExhausted (MODEL_EXCEEDS_HOST_MEMORY). More than MAX_ACCELERATORS devices is
    InvalidArgument (ACCELERATORS_INVALID, field max_context)."""
    acc = _resolve(accelerator)
    if not 0.0 <= reserve_frac < 1.0:
        raise InvalidArgument(
            RESERVE_FRAC_INVALID,
            f"reserve_frac must be in [0, 1), got {reserve_frac}",
            field="reserve_frac",
        )
    need = memory_needed_bytes(spec, dtype, max_context, batch)
    usable = acc.memory_bytes * (1.0 - reserve_frac)
    n = max(1, math.ceil(need / usable))
    if acc.name == CPU_ACCELERATOR:
        if n > 1:
            raise ResourceExhausted(
                MODEL_EXCEEDS_HOST_MEMORY,
                f"{spec.name} needs {need / 2**30:.1f} GiB ({dtype}, context {max_context}, "
                f"batch {batch}) but the host has {usable / 2**30:.1f} GiB usable",
                field="accelerator",
            )
        return 1
    if power_of_two:
        n = 1 << (n - 1).bit_length()
    if n > MAX_ACCELERATORS:
        raise InvalidArgument(
            ACCELERATORS_INVALID,
            f"{spec.name} at context {max_context} needs {n} x {acc.name}, more than the "
            f"{MAX_ACCELERATORS} a cost can be given for; lower max_context or check the spec",
            field="max_context",
        )
    return n


@dataclasses.dataclass(frozen=True)
class EnergyModel:
    """Energy of one request: j_per_request + j_per_prompt_token*p + j_per_output_token*o,
    metered over `devices` devices (the profiled stack) by `meter` ("nvml" | "rapl")."""

    j_per_request: float
    j_per_prompt_token: float
    j_per_output_token: float
    samples: int
    meter: str = ""
    devices: int = 1

    def predict(self, prompt_tokens: float, output_tokens: float, requests: float = 1) -> float:
        """Energy in joules of `requests` requests totalling the given token counts."""
        return (
            self.j_per_request * requests
            + self.j_per_prompt_token * prompt_tokens
            + self.j_per_output_token * output_tokens
        )


def fit_energy_model(samples: Sequence[Sample], *, devices: int = 1) -> EnergyModel | None:
    """Non-negative least squares of each sample's metered energy on [1, p, o]; None when
    fewer than 3 usable samples carry an energy reading (then use TDP)."""
    used = [
        s
        for s in samples
        if s.contention.energy_j > 0 and s.flag not in (SampleFlag.WARMUP, SampleFlag.NONCONFORMING)
    ]
    if len(used) < 3:
        return None
    x = np.array([[1.0, s.prompt_tokens, s.output_tokens] for s in used])
    y = np.array([s.contention.energy_j for s in used])
    scale = x.max(axis=0)
    coef, _ = scipy.optimize.nnls(x / scale, y)
    coef = coef / scale
    meters = sorted({s.contention.energy_source for s in used if s.contention.energy_source})
    return EnergyModel(
        j_per_request=float(coef[0]),
        j_per_prompt_token=float(coef[1]),
        j_per_output_token=float(coef[2]),
        samples=len(used),
        meter="+".join(meters),
        devices=devices,
    )


@dataclasses.dataclass(frozen=True)
class CostBreakdown:
    accelerator: str
    n_accelerators: int
    accelerator_seconds: float
    price_per_hour_usd: float
    dollars: float
    energy_j: float
    energy_source: str  # "measured" | "tdp"
    co2_g: float | None = None


def _price(acc: Accelerator, overrides: Mapping[str, float] | None) -> float:
    if overrides:
        folded = {k.strip().lower(): v for k, v in overrides.items()}
        if acc.name.lower() in folded:
            price = float(folded[acc.name.lower()])
            if not price >= 0.0:
                raise InvalidArgument(
                    PRICE_INVALID,
                    f"price per hour must be >= 0 USD, got {price} for {acc.name}",
                    field=f"price_overrides[{acc.name}]",
                )
            return price
    return acc.price_per_hour_usd


def cost_of(
    runtime_s: float,
    n_accel: int,
    accelerator: Accelerator | str,
    price_overrides: Mapping[str, float] | None = None,
    *,
    energy_model: EnergyModel | None = None,
    prompt_tokens: float = 0.0,
    output_tokens: float = 0.0,
    requests: float = 1.0,
    grid_g_co2_per_kwh: float | None = None,
) -> CostBreakdown:
    """Cost of `runtime_s` seconds on `n_accel` devices. Price per device-hour from the
    hardware table unless `price_overrides` names the device. Energy is "measured" when an
    energy model is given together with the workload's token counts (and request count),
    else "tdp"."""
    acc = _resolve(accelerator)
    if not runtime_s >= 0.0:
        raise InvalidArgument(
            RUNTIME_INVALID, f"runtime must be >= 0 s, got {runtime_s}", field="runtime_s"
        )
    if n_accel < 1:
        raise InvalidArgument(
            ACCELERATORS_INVALID, f"n_accel must be >= 1, got {n_accel}", field="n_accel"
        )
    price = _price(acc, price_overrides)
    acc_s = runtime_s * n_accel
    if energy_model is not None and (prompt_tokens > 0 or output_tokens > 0):
        energy = energy_model.predict(prompt_tokens, output_tokens, requests)
        energy *= n_accel / energy_model.devices
        source = "measured"
    else:
        energy = acc.tdp_w * acc_s
        source = "tdp"
    co2 = None
    if grid_g_co2_per_kwh is not None:
        if not grid_g_co2_per_kwh >= 0.0:
            raise InvalidArgument(
                GRID_INTENSITY_INVALID,
                f"grid intensity must be >= 0 g CO2e/kWh, got {grid_g_co2_per_kwh}",
                field="grid_g_co2_per_kwh",
            )
        co2 = energy / _J_PER_KWH * grid_g_co2_per_kwh
    return CostBreakdown(
        accelerator=acc.name,
        n_accelerators=n_accel,
        accelerator_seconds=acc_s,
        price_per_hour_usd=price,
        dollars=acc_s / 3600.0 * price,
        energy_j=energy,
        energy_source=source,
        co2_g=co2,
    )
