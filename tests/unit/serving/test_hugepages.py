"""Transparent huge pages for weights and KV caches (idealrt.services.serving.hugepages):
real madvise calls on this process's memory, checked in /proc/self/smaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from idealrt.core.domain import Backend, ModelRef, StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.serving import hugepages as hp
from idealrt.services.serving.registry import ModelRegistry

AVAILABLE, WHY = hp.available()
needs_thp = pytest.mark.skipif(not AVAILABLE, reason=f"no transparent huge pages: {WHY}")


@needs_thp
def test_collapse_gives_a_tensor_huge_pages() -> None:
    t = torch.ones(16 << 20 >> 2)  # 16 MiB, already faulted in with small pages
    start, end = hp.tensor_range(t)
    advised = hp.collapse([(start, end)])
    assert 12 << 20 <= advised <= 16 << 20  # the 2 MiB-aligned interior
    if hp.huge_bytes(start, end) == 0:
        pytest.skip("the kernel took the advice but merged nothing now (no MADV_COLLAPSE)")
    assert hp.huge_bytes(start, end) >= 8 << 20
    assert float(t.sum()) == t.numel()  # contents unchanged


def test_small_ranges_are_skipped() -> None:
    t = torch.ones(1 << 20 >> 2)  # 1 MiB: no aligned 4 MiB inside
    assert hp.collapse([hp.tensor_range(t)]) == 0


def test_anonymous_regions_sees_what_a_block_allocates() -> None:
    with hp.AnonymousRegions() as regions:
        a = np.ones(64 << 20 >> 3)  # 64 MiB, its own mapping
    start, end = a.ctypes.data, a.ctypes.data + a.nbytes
    assert (
        sum(min(hi, end) - max(lo, start) for lo, hi in regions.added if lo < end and hi > start)
        >= 60 << 20
    )
    with hp.AnonymousRegions() as none:
        pass
    assert all(hi - lo >= hp.MIN_BYTES for lo, hi in none.added)


@pytest.mark.parametrize("raw", ["2", "yes", "always"])
def test_bad_option_names_the_field(raw: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        hp.HugePages.parse(StackSpec(Backend.PYTORCH, options={"hugepages": raw}))
    assert e.value.reason == "OPTION_INVALID" and e.value.field == "stack.options"
    assert "auto, 1, 0" in e.value.message


def test_option_values_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing, devices, and a kernel with THP disabled: that kernel cannot be arranged on
    this machine, so `available` is replaced by a stub for the last part (the one mock)."""
    parse = hp.HugePages.parse
    assert parse(StackSpec(Backend.PYTORCH)).choice == "auto"
    assert parse(StackSpec(Backend.PYTORCH, options={"hugepages": "on"})).choice == "1"
    assert parse(StackSpec(Backend.PYTORCH, options={"hugepages": "off"})).choice == "0"
    cuda = torch.device("cuda")
    assert not hp.HugePages("0").wanted(torch.device("cpu"))
    assert not hp.HugePages("auto").wanted(cuda)
    with pytest.raises(FailedPrecondition) as e:
        hp.HugePages("1").wanted(cuda)
    assert e.value.reason == "HUGEPAGES_UNAVAILABLE"
    monkeypatch.setattr(hp, "available", lambda: (False, "disabled (never)"))
    assert not hp.HugePages("auto").wanted(torch.device("cpu"))
    with pytest.raises(FailedPrecondition) as e:
        hp.HugePages("1").wanted(torch.device("cpu"))
    assert "disabled (never)" in e.value.message


@pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning")
@pytest.mark.parametrize("backend", [Backend.PYTORCH, Backend.ONNXRUNTIME])
def test_backends_record_the_choice(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ONNX Runtime exports the tiny model once (export warnings are torch's, ignored as in
    test_onnxruntime_backend)."""
    monkeypatch.setenv("IDEALRT_CACHE_DIR", str(tmp_path))
    reg = ModelRegistry()
    try:
        for choice, want in (("0", "off"), ("auto", "on" if AVAILABLE else "off")):
            stack = StackSpec(backend, options={"threads": "1", "hugepages": choice})
            m = reg.load(ModelRef(name="tiny-gpt2"), stack, max_context=32)
            assert m.stack.options["hugepages"] == want
            assert reg.generate(m.model_id, prompt_length=4, output_tokens=3).output_tokens == 3
            reg.unload(m.model_id)
    finally:
        reg.close()
