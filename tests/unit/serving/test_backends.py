"""The pytorch and transformers backends: exact counts, timing fields, options, devices,
memory refusal, and agreement with each other on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from idealrt.core import catalog
from idealrt.core.domain import Backend, StackSpec
from idealrt.core.errors import (
    FailedPrecondition,
    IdealrtError,
    InvalidArgument,
    ResourceExhausted,
)
from idealrt.core.model_spec import ModelSpec
from idealrt.services.serving import backends as backends_pkg
from idealrt.services.serving.backends import base
from idealrt.services.serving.backends import pytorch_backend as pt
from idealrt.services.serving.backends import transformers_backend as tb

CPU_TORCH = StackSpec(Backend.PYTORCH)
CPU_HF = StackSpec(Backend.TRANSFORMERS)


def loaded(factory: Any, spec: ModelSpec, stack: StackSpec, path: str = "", seed: int = 0) -> Any:
    backend = factory()
    backend.load(spec, stack, path, seed, 32)
    return backend


def test_all_is_what_it_claims() -> None:
    for name in backends_pkg.__all__:
        assert hasattr(backends_pkg, name), name


@pytest.mark.parametrize(
    "factory", [pt.create_backend, tb.create_backend], ids=["pytorch", "transformers"]
)
def test_exact_counts_and_timing_fields(factory: Any) -> None:
    spec = catalog.resolve("tiny-gpt2")
    backend = factory()
    mem = backend.load(spec, StackSpec(), "", 1, 32)
    assert mem.weights_bytes == spec.weight_bytes("fp32")
    assert mem.kv_cache_bytes == spec.kv_cache_bytes(32, "fp32")
    assert 0 < mem.device_free_bytes <= mem.device_total_bytes
    for p, o in ((5, 7), (1, 1), (30, 2)):
        r = backend.generate(list(range(p)), o)
        assert (r.prompt_tokens, r.output_tokens, r.batch_size) == (p, o, 1)
        assert len(r.output_ids) == o and len(r.decode_ns) == o - 1
        assert r.total_ns == r.prefill_ns + sum(r.decode_ns)
        assert r.prefill_ns > 0 and all(d > 0 for d in r.decode_ns)
        assert r.start_time.tzinfo is not None
        assert all(0 <= t < spec.vocab for t in r.output_ids)
    backend.unload()
    with pytest.raises(FailedPrecondition) as e:
        backend.generate([1], 1)
    assert e.value.reason == "MODEL_NOT_LOADED"


@pytest.mark.parametrize(
    "factory", [pt.create_backend, tb.create_backend], ids=["pytorch", "transformers"]
)
def test_batches_repeat_the_prompt_and_seeds_fix_the_weights(factory: Any) -> None:
    spec = catalog.resolve("tiny-llama")
    a = loaded(factory, spec, StackSpec(), seed=4)
    one = a.generate([3, 1, 4, 1, 5], 6)
    three = a.generate([3, 1, 4, 1, 5], 6, batch_size=3)
    assert three.batch_size == 3 and three.output_ids == one.output_ids
    assert a.generate([3, 1, 4, 1, 5], 6).output_ids == one.output_ids  # cache reset per batch
    same = loaded(factory, spec, StackSpec(), seed=4).generate([3, 1, 4, 1, 5], 6)
    assert same.output_ids == one.output_ids


FAMILIES = ("gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "bloom")


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_and_pytorch_agree_on_the_same_weights(
    family: str, hf_dir: Any, tiny: dict[str, ModelSpec]
) -> None:
    _, path = hf_dir(family)
    spec = tiny[family]
    ours = loaded(pt.create_backend, spec, CPU_TORCH, str(path))
    theirs = loaded(tb.create_backend, spec, CPU_HF, str(path))
    prompt = [5, 17, 2, 88, 41, 9]
    a, b = ours.generate(prompt, 12, batch_size=2), theirs.generate(prompt, 12, batch_size=2)
    assert a.output_ids == b.output_ids


def test_eos_is_ignored(tmp_path: Path, hf_dir: Any, tiny: dict[str, ModelSpec]) -> None:
    """GPT-J's LM head has a bias: make the EOS id win every step; still o tokens come."""
    model, _ = hf_dir("gptj")
    eos = int(model.config.eos_token_id)
    original = model.lm_head.bias.detach().clone()
    with torch.no_grad():
        model.lm_head.bias[eos] += 1e4
    try:
        model.save_pretrained(tmp_path)
    finally:
        with torch.no_grad():
            model.lm_head.bias.copy_(original)  # the session's model, restored exactly
    for factory, stack in ((pt.create_backend, CPU_TORCH), (tb.create_backend, CPU_HF)):
        r = loaded(factory, tiny["gptj"], stack, str(tmp_path)).generate([1, 2, 3], 9)
        assert r.output_ids == (eos,) * 9 and r.output_tokens == 9


@pytest.mark.parametrize(
    "factory", [pt.create_backend, tb.create_backend], ids=["pytorch", "transformers"]
)
def test_requests_beyond_the_model_are_refused(factory: Any) -> None:
    backend = loaded(factory, catalog.resolve("tiny-gpt2"), StackSpec())
    cases = [
        (([1] * 20, 13, 1), "output_tokens", "CONTEXT_EXCEEDED"),
        (([1, 600], 2, 1), "prompt.token_ids", "TOKEN_OUT_OF_RANGE"),
        (([], 2, 1), "prompt.length", "PROMPT_EMPTY"),
        (([1], 0, 1), "output_tokens", "OUTPUT_TOKENS_INVALID"),
        (([1], 2, 0), "batch_size", "BATCH_SIZE_INVALID"),
    ]
    for (ids, o, batch), field, reason in cases:
        with pytest.raises(InvalidArgument) as e:
            backend.generate(ids, o, batch)
        assert (e.value.field, e.value.reason) == (field, reason)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"cuda_graphs": "1"}, "OPTION_INVALID"),  # CPU
        ({"threads": "two"}, "OPTION_INVALID"),
        ({"threads": "0"}, "OPTION_INVALID"),
        ({"torch_compile": "maybe"}, "OPTION_INVALID"),
        ({"fast": "1"}, "OPTION_UNKNOWN"),
    ],
)
def test_bad_options_are_refused(options: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        pt.create_backend().load(catalog.resolve("tiny-gpt2"), StackSpec(options=options), "", 0, 0)
    assert (e.value.reason, e.value.field) == (reason, "stack.options")


def test_threads_option_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        b = loaded(
            pt.create_backend, catalog.resolve("tiny-gpt2"), StackSpec(options={"threads": "1"})
        )
        b.generate([1, 2], 3)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_transformers_attn_implementation_option() -> None:
    spec = catalog.resolve("tiny-llama")
    sdpa = loaded(tb.create_backend, spec, CPU_HF, seed=2).generate([4, 5, 6], 5)
    eager = StackSpec(Backend.TRANSFORMERS, options={"attn_implementation": "eager"})
    assert loaded(tb.create_backend, spec, eager, seed=2).generate([4, 5, 6], 5).output_ids == (
        sdpa.output_ids
    )
    with pytest.raises(InvalidArgument):
        loaded(tb.create_backend, spec, StackSpec(options={"attn_implementation": "flash"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "factory", [pt.create_backend, tb.create_backend], ids=["pytorch", "transformers"]
)
def test_cuda_without_cuda_is_a_failed_precondition(factory: Any) -> None:
    with pytest.raises(FailedPrecondition) as e:
        factory().load(catalog.resolve("tiny-gpt2"), StackSpec(device="cuda"), "", 0, 0)
    assert e.value.reason == "DEVICE_UNAVAILABLE"


def test_unknown_dtype_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as e:
        pt.create_backend().load(catalog.resolve("tiny-gpt2"), StackSpec(dtype="int8"), "", 0, 0)
    assert e.value.field == "stack.dtype"


def test_davinci_on_cpu_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("allocated before the memory check")

    monkeypatch.setattr(pt, "build_decoder", must_not_build)
    with pytest.raises(ResourceExhausted) as e:
        pt.create_backend().load(catalog.resolve("davinci"), StackSpec(), "", 0, 0)
    assert e.value.reason == "MODEL_TOO_LARGE"
    assert "698417037312" in e.value.message  # the numbers are in the message


def test_transformers_backend_checks_memory_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "device_memory", lambda device: (10**6, 1000))
    with pytest.raises(ResourceExhausted) as e:
        tb.create_backend().load(catalog.resolve("tiny-llama"), CPU_HF, "", 0, 0)
    assert e.value.reason == "MODEL_TOO_LARGE"


def test_batch_cache_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    b = loaded(pt.create_backend, catalog.resolve("tiny-gpt2"), CPU_TORCH)
    monkeypatch.setattr(base, "device_memory", lambda device: (10**9, 100_000))
    with pytest.raises(ResourceExhausted):
        b.generate([1, 2], 2, batch_size=64)
    monkeypatch.undo()
    assert b.generate([1, 2], 2).output_tokens == 2  # recovers at the next request


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_transformers(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(IdealrtError) as e:
        tb.create_backend().load(catalog.resolve("tiny-gpt2"), CPU_HF, "", 0, 0)
    assert e.value.reason == "DEPENDENCY_MISSING"
    assert "idealrt[transformers]" in e.value.message


def test_static_decode_path_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_compile=1 decodes through Decoder.forward_static (the step CUDA graphs capture);
    with compilation stubbed out, that path must give the eager path's tokens."""
    spec = catalog.resolve("tiny-llama")
    eager = loaded(pt.create_backend, spec, CPU_TORCH, seed=9)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    static = loaded(pt.create_backend, spec, StackSpec(options={"torch_compile": "1"}), seed=9)
    for batch in (1, 2):
        a = eager.generate([9, 8, 7, 6], 12, batch_size=batch)
        b = static.generate([9, 8, 7, 6], 12, batch_size=batch)
        assert a.output_ids == b.output_ids and len(b.decode_ns) == 11
