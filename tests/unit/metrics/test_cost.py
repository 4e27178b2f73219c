"""Accelerators needed, prices, energy (measured vs TDP) and CO2, with hand-checked numbers."""

from __future__ import annotations

import pytest

from idealrt.core.catalog import resolve
from idealrt.core.domain import ContentionObservation, Sample, SampleFlag
from idealrt.core.errors import InvalidArgument, ResourceExhausted
from idealrt.core.hardware import accelerator
from idealrt.services.metrics import cost as cost_mod
from idealrt.services.metrics.cost import (
    EnergyModel,
    accelerators_needed,
    cost_of,
    fit_energy_model,
    memory_needed_bytes,
)


def test_all_is_what_it_claims() -> None:
    for name in cost_mod.__all__:
        assert hasattr(cost_mod, name)


def test_davinci_fp16_on_a100_80gb_is_eight_as_in_the_paper() -> None:
    spec = resolve("davinci")
    # 174.6e9 params x 2 bytes = 349.2 GB; KV at 2048 = 2*96*12288*2048*2 = 9.66 GB
    assert memory_needed_bytes(spec, "fp16", 2048) == 174_604_259_328 * 2 + 9_663_676_416
    # 358.9 GB / (80 GiB * 0.9 = 77.3 GB) = 4.64 -> 5 devices -> power of two: 8
    assert accelerators_needed(spec, "fp16", "A100-80GB", 2048) == 8
    assert accelerators_needed(spec, "fp16", "A100-80GB", 2048, power_of_two=False) == 5
    # H200 (141 GiB): 358.9 / 136.3 = 2.6 -> 3 -> 4
    assert accelerators_needed(spec, "fp16", accelerator("H200"), 2048) == 4


@pytest.mark.parametrize(
    ("name", "acc", "expected"),
    [
        ("gpt-j-6b", "A100-80GB", 1),  # 12 GB
        ("gpt-j-6b", "L4", 1),  # 12.1 GB + 0.9 GB KV < 21.6 GiB
        ("tnlg-530b", "A100-80GB", 16),  # 1.06 TB / 77.3 GB = 13.7 -> 14 -> 16
        ("gpt2", "cpu", 1),
    ],
)
def test_known_cases(name: str, acc: str, expected: int) -> None:
    assert accelerators_needed(resolve(name), "fp16", acc, 2048) == expected


def test_batch_and_reserve_change_the_count() -> None:
    spec = resolve("gpt-j-6b")  # KV cache: 2*28*4096*2 bytes = 458752 bytes per token, fp16
    # 64 sequences at 2048 tokens: 60.1 GB of KV + 12.1 GB weights = 72.2 GB fits in
    # 80 GiB * 0.9 = 77.3 GB; 72 sequences (67.6 GB of KV, 79.8 GB in all) do not.
    assert accelerators_needed(spec, "fp16", "A100-80GB", 2048, batch=64) == 1
    assert accelerators_needed(spec, "fp16", "A100-80GB", 2048, batch=72) == 2
    assert accelerators_needed(spec, "fp16", "A100-80GB", 2048, batch=72, reserve_frac=0.0) == 1
    # exactly the weights with no reserve: just fits one device of that size
    weights = spec.weight_bytes("fp16")
    assert memory_needed_bytes(spec, "fp16", 0) == weights
    assert accelerators_needed(spec, "fp16", "A100-80GB", 0, reserve_frac=0.0) == 1


def test_cpu_that_does_not_fit_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted) as ei:
        accelerators_needed(resolve("davinci"), "fp32", "cpu", 2048)
    assert ei.value.reason == "MODEL_EXCEEDS_HOST_MEMORY"


def test_bad_arguments() -> None:
    spec = resolve("gpt2")
    with pytest.raises(InvalidArgument) as ei:
        accelerators_needed(spec, "fp16", "A100-80GB", 2048, reserve_frac=1.0)
    assert ei.value.reason == "RESERVE_FRAC_INVALID"
    with pytest.raises(InvalidArgument) as ei:
        accelerators_needed(spec, "fp16", "A100-80GB", -1)
    assert ei.value.reason == "MAX_CONTEXT_INVALID"
    with pytest.raises(InvalidArgument) as ei:
        accelerators_needed(spec, "fp16", "TPU-v9", 2048)
    assert ei.value.reason == "UNKNOWN_ACCELERATOR"
    with pytest.raises(InvalidArgument):
        cost_of(-1.0, 1, "A100-80GB")
    with pytest.raises(InvalidArgument):
        cost_of(1.0, 0, "A100-80GB")
    with pytest.raises(InvalidArgument) as ei:
        cost_of(1.0, 1, "A100-80GB", {"A100-80GB": -3.0})
    assert ei.value.reason == "PRICE_INVALID"
    with pytest.raises(InvalidArgument) as ei:
        cost_of(1.0, 1, "A100-80GB", grid_g_co2_per_kwh=-1.0)
    assert ei.value.reason == "GRID_INTENSITY_INVALID"


def test_cost_with_tdp_energy_and_co2() -> None:
    c = cost_of(3600.0, 8, "A100-80GB", grid_g_co2_per_kwh=400.0)
    assert c.accelerator == "A100-80GB"
    assert c.accelerator_seconds == 8 * 3600.0
    assert c.price_per_hour_usd == 5.12
    assert c.dollars == pytest.approx(8 * 5.12)
    assert c.energy_source == "tdp"
    assert c.energy_j == pytest.approx(400.0 * 3600 * 8)
    assert c.co2_g == pytest.approx(3.2 * 400.0)  # 3.2 kWh
    assert cost_of(1.0, 1, "A100-80GB").co2_g is None


def test_price_override_is_case_insensitive_and_only_for_named_device() -> None:
    over = {"a100-80gb": 2.0, "H100-80GB": 1.0}
    assert cost_of(1800.0, 2, "A100-80GB", over).dollars == pytest.approx(2.0)
    assert cost_of(1800.0, 2, "L4", over).dollars == pytest.approx(0.8)


def _energy_sample(p: int, o: int, j: float, **kw: object) -> Sample:
    return Sample(
        prompt_tokens=p,
        output_tokens=o,
        prefill_ns=1,
        decode_ns=(),
        total_ns=10,
        contention=ContentionObservation(energy_j=j, energy_source="nvml"),
        **kw,
    )


def test_measured_energy_model_recovers_coefficients() -> None:
    samples = [
        _energy_sample(p, o, 5.0 + 0.01 * p + 0.5 * o)
        for p in (1, 128, 512, 1024)
        for o in (1, 8, 32)
    ]
    samples.append(_energy_sample(1, 1, 1e6, flag=SampleFlag.WARMUP))  # ignored
    samples.append(_energy_sample(1, 1, 0.0))  # no reading: ignored
    em = fit_energy_model(samples, devices=2)
    assert em is not None
    assert em.samples == 12
    assert em.meter == "nvml"
    assert em.j_per_request == pytest.approx(5.0, rel=1e-6)
    assert em.j_per_prompt_token == pytest.approx(0.01, rel=1e-6)
    assert em.j_per_output_token == pytest.approx(0.5, rel=1e-6)
    # workload: 10 requests, 1000 prompt tokens, 200 output tokens; measured on 2 devices,
    # the model needs 4 -> twice the metered energy
    c = cost_of(
        60.0, 4, "A100-80GB", energy_model=em, prompt_tokens=1000, output_tokens=200, requests=10
    )
    assert c.energy_source == "measured"
    assert c.energy_j == pytest.approx(2 * (50.0 + 10.0 + 100.0))
    # no token counts -> falls back to TDP, labelled so
    assert cost_of(60.0, 4, "A100-80GB", energy_model=em).energy_source == "tdp"


def test_no_energy_readings_means_no_model() -> None:
    assert fit_energy_model([_energy_sample(1, 1, 0.0)] * 5) is None
    em = EnergyModel(1.0, 0.0, 2.0, samples=3)
    assert em.predict(10, 5, requests=2) == pytest.approx(12.0)
