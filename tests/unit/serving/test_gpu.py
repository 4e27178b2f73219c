"""CUDA paths of the pytorch backend (skipped without a GPU): the same tokens as the CPU,
CUDA-graph decode equal to eager decode, half precision, memory numbers from the device."""

from __future__ import annotations

import pytest
import torch

from idealrt.core import catalog
from idealrt.core.domain import StackSpec
from idealrt.services.serving.backends import pytorch_backend as pt
from idealrt.services.serving.timing import CudaTimer, timer_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPT = [7, 3, 99, 250, 11, 42]


def run(stack: StackSpec, name: str = "tiny-llama", o: int = 10, batch: int = 1) -> tuple[int, ...]:
    backend = pt.create_backend()
    backend.load(catalog.resolve(name), stack, "", 5, 64)
    try:
        r = backend.generate(PROMPT, o, batch)
        assert len(r.decode_ns) == o - 1 and r.total_ns == r.prefill_ns + sum(r.decode_ns)
        return r.output_ids
    finally:
        backend.unload()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_cuda_graph_decode_matches_eager_cuda(name: str) -> None:
    eager = run(StackSpec(device="cuda"), name)
    graphs = run(StackSpec(device="cuda", options={"cuda_graphs": "1"}), name)
    assert graphs == eager
    assert run(StackSpec(device="cuda", options={"cuda_graphs": "1"}), name, batch=3) == eager


def test_cuda_timer_synchronizes() -> None:
    assert isinstance(timer_for(torch.device("cuda")), CudaTimer)
    assert timer_for("cuda").now_ns() > 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_generates_exact_counts(dtype: str) -> None:
    ids = run(StackSpec(device="cuda", dtype=dtype), o=7)
    assert len(ids) == 7


def test_memory_report_reads_the_device() -> None:
    backend = pt.create_backend()
    mem = backend.load(catalog.resolve("tiny-gpt2"), StackSpec(device="cuda"), "", 0, 0)
    backend.unload()
    _free, total = torch.cuda.mem_get_info()
    assert mem.device_total_bytes == total and 0 < mem.device_free_bytes <= total
