"""ModelRegistry: resolving models, idempotent loads, lookup, paging, generation checks,
backend factories, one generation at a time per model."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from idealrt.core import catalog, paging
from idealrt.core.domain import Backend, ModelRef, StackSpec
from idealrt.core.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from idealrt.core.model_spec import ModelSpec, check_fits_context, resolve_max_context
from idealrt.core.serving_contract import GenerationResult, MemoryReport
from idealrt.services.serving import registry as registry_mod
from idealrt.services.serving.registry import BackendTable, ModelRegistry, register_backend


class FakeBackend:
    """Records calls; generation sleeps a little so overlaps would show."""

    name = "fake"
    active = 0
    max_active = 0
    lock = threading.Lock()

    def __init__(self, wrong_counts: bool = False) -> None:
        self.wrong_counts = wrong_counts
        self.loaded: tuple[Any, ...] | None = None
        self.unloaded = False

    def load(
        self, spec: ModelSpec, stack: StackSpec, weights_path: str, seed: int, max_context: int
    ) -> MemoryReport:
        self.loaded = (spec, stack, weights_path, seed, max_context)
        return MemoryReport(1, 2, 3, 4)

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.max_active = max(cls.max_active, cls.active)
        time.sleep(0.01)
        with cls.lock:
            cls.active -= 1
        o = output_tokens + (1 if self.wrong_counts else 0)
        return GenerationResult(
            len(prompt_ids),
            o,
            (0,) * o,
            5,
            (1,) * (o - 1),
            5 + o - 1,
            datetime.now(UTC),
            batch_size,
        )

    def unload(self) -> None:
        self.unloaded = True


FAKE = StackSpec(Backend.ONNXRUNTIME)


@pytest.fixture
def fake_registry() -> ModelRegistry:
    table = BackendTable()
    table.register(Backend.ONNXRUNTIME, FakeBackend)
    table.register(Backend.TENSORRT, lambda: FakeBackend(wrong_counts=True))
    return ModelRegistry(table)


def test_all_is_what_it_claims() -> None:
    for name in registry_mod.__all__:
        assert hasattr(registry_mod, name), name


def test_load_by_catalog_name_generate_and_unload() -> None:
    reg = ModelRegistry()
    m = reg.load(ModelRef(name="tiny-gpt2", seed=3), StackSpec(), max_context=64)
    assert m.name == "tiny-gpt2" and m.max_context == 64 and m.load_ns > 0
    assert m.memory.weights_bytes == m.spec.weight_bytes("fp32")
    assert reg.get(m.model_id) == m
    r = reg.generate(m.model_id, prompt_length=10, prompt_seed=1, output_tokens=5)
    assert (r.prompt_tokens, r.output_tokens, len(r.decode_ns)) == (10, 5, 4)
    again = reg.generate(m.model_id, prompt_length=10, prompt_seed=1, output_tokens=5)
    assert again.output_ids == r.output_ids  # the seeded prompt is the same prompt
    assert reg.unload(m.model_id) == m
    with pytest.raises(NotFound) as e:
        reg.get(m.model_id)
    assert (e.value.reason, e.value.field) == ("MODEL_NOT_LOADED", "model_id")
    with pytest.raises(NotFound):
        reg.unload(m.model_id)


def test_max_context_zero_means_the_model_positions() -> None:
    reg = ModelRegistry()
    m = reg.load(ModelRef(name="tiny-llama"), StackSpec())
    assert m.max_context == m.spec.max_positions
    with pytest.raises(InvalidArgument) as e:
        reg.load(ModelRef(name="tiny-llama"), StackSpec(), max_context=m.spec.max_positions + 1)
    assert e.value.field == "max_context"
    with pytest.raises(InvalidArgument):
        reg.load(ModelRef(name="tiny-llama"), StackSpec(), max_context=-1)
    reg.close()
    assert reg.list() == ([], "")


def test_load_from_spec_and_from_hf_directory(hf_dir: Any, tiny: dict[str, ModelSpec]) -> None:
    reg = ModelRegistry()
    by_spec = reg.load(ModelRef(spec=tiny["opt"]), StackSpec(), max_context=32)
    assert by_spec.name == "t-opt" and by_spec.spec == tiny["opt"]
    _, path = hf_dir("llama")
    by_dir = reg.load(ModelRef(weights_path=str(path)), StackSpec(), max_context=32)
    assert by_dir.spec.spec_hash() == tiny["llama"].spec_hash()
    hf = reg.load(ModelRef(weights_path=str(path)), StackSpec(Backend.TRANSFORMERS), max_context=32)
    ids = [1, 2, 3, 4]
    assert (
        reg.generate(by_dir.model_id, prompt_ids=ids, output_tokens=6).output_ids
        == reg.generate(hf.model_id, prompt_ids=ids, output_tokens=6).output_ids
    )
    reg.close()


def test_unresolvable_models_are_invalid(tmp_path: Path) -> None:
    reg = ModelRegistry()
    cases = [
        (ModelRef(), "model", "MODEL_UNSPECIFIED"),
        (ModelRef(name="no-such-model"), "model.name", "UNKNOWN_MODEL"),
        (ModelRef(name="gpt2", weights_path=str(tmp_path / "x")), "model.weights_path", None),
    ]
    for ref, field, reason in cases:
        with pytest.raises(InvalidArgument) as e:
            reg.load(ref, StackSpec())
        assert e.value.field == field
        assert reason is None or e.value.reason == reason


def test_request_id_makes_load_idempotent(fake_registry: ModelRegistry) -> None:
    ref = ModelRef(name="tiny-gpt2")
    a = fake_registry.load(ref, FAKE, request_id="r1")
    assert fake_registry.load(ref, FAKE, request_id="r1") == a
    b = fake_registry.load(ref, FAKE, request_id="r2")
    assert b.model_id != a.model_id
    fake_registry.unload(a.model_id)
    c = fake_registry.load(ref, FAKE, request_id="r1")  # unloaded: a fresh load
    assert c.model_id not in (a.model_id, b.model_id)


def test_list_pages_in_load_order(fake_registry: ModelRegistry) -> None:
    ids = [fake_registry.load(ModelRef(name="tiny-gpt2"), FAKE).model_id for _ in range(5)]
    page, token = fake_registry.list(page_size=2)
    seen = [m.model_id for m in page]
    while token:
        page, token = fake_registry.list(page_size=2, page_token=token)
        seen += [m.model_id for m in page]
    assert seen == ids
    everything, token = fake_registry.list()
    assert len(everything) == 5 and token == ""
    with pytest.raises(InvalidArgument) as e:
        fake_registry.list(page_token="garbage!")
    assert (e.value.reason, e.value.field) == ("PAGE_TOKEN_INVALID", "page_token")
    with pytest.raises(InvalidArgument) as e:
        fake_registry.list(page_size=-1)
    assert e.value.field == "page_size"


def test_page_tokens_are_the_shared_format(fake_registry: ModelRegistry) -> None:
    """idealrt.core.paging's tokens, kind "models": a store token or a bad cursor is refused."""
    for _ in range(3):
        fake_registry.load(ModelRef(name="tiny-gpt2"), FAKE)
    _, token = fake_registry.list(page_size=1)
    assert paging.decode_token(token, "models", "") == [1]
    for bad in (
        paging.encode_token("profiles", "", [1]),
        paging.encode_token("models", "", ["1"]),
        paging.encode_token("models", "", [1, 2]),
    ):
        with pytest.raises(InvalidArgument) as e:
            fake_registry.list(page_token=bad)
        assert (e.value.reason, e.value.field) == ("PAGE_TOKEN_INVALID", "page_token")


def test_max_context_checks_name_field_and_range() -> None:
    spec = catalog.resolve("tiny-llama")
    assert resolve_max_context(spec, 0) == spec.max_positions
    assert resolve_max_context(spec, 7) == 7
    for bad in (-1, spec.max_positions + 1):
        with pytest.raises(InvalidArgument) as e:
            resolve_max_context(spec, bad, field="max_context")
        assert (e.value.reason, e.value.field) == ("MAX_CONTEXT_INVALID", "max_context")
        assert "max_context" in e.value.message
    check_fits_context(3, 5, 8)
    with pytest.raises(InvalidArgument) as e:
        check_fits_context(3, 6, 8)
    assert (e.value.reason, e.value.field) == ("CONTEXT_EXCEEDED", "output_tokens")


def test_page_size_is_capped(fake_registry: ModelRegistry) -> None:
    for _ in range(3):
        fake_registry.load(ModelRef(name="tiny-gpt2"), FAKE)
    page, token = fake_registry.list(page_size=10**6)
    assert len(page) == 3 and token == ""


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"prompt_length": 0, "output_tokens": 3}, "prompt.length", "PROMPT_EMPTY"),
        ({"prompt_length": 4, "output_tokens": 0}, "output_tokens", "OUTPUT_TOKENS_INVALID"),
        ({"prompt_length": 60, "output_tokens": 5}, "output_tokens", "CONTEXT_EXCEEDED"),
        ({"prompt_ids": [1, 512], "output_tokens": 3}, "prompt.token_ids", "TOKEN_OUT_OF_RANGE"),
        ({"prompt_ids": [1, -1], "output_tokens": 3}, "prompt.token_ids", "TOKEN_OUT_OF_RANGE"),
        (
            {"prompt_ids": [1, 2], "prompt_length": 3, "output_tokens": 3},
            "prompt.length",
            "PROMPT_LENGTH_MISMATCH",
        ),
        ({"prompt_length": 4, "output_tokens": 3, "batch_size": 0}, "batch_size", None),
        ({"prompt_length": 4, "output_tokens": 3, "batch_size": 65}, "batch_size", None),
    ],
)
def test_generation_requests_are_validated(
    fake_registry: ModelRegistry, kwargs: dict[str, Any], field: str, reason: str | None
) -> None:
    m = fake_registry.load(ModelRef(name="tiny-gpt2"), FAKE, max_context=64)
    with pytest.raises(InvalidArgument) as e:
        fake_registry.generate(m.model_id, **kwargs)
    assert e.value.field == field
    assert reason is None or e.value.reason == reason
    if reason == "CONTEXT_EXCEEDED":
        assert "64" in e.value.message


def test_generate_on_unknown_model_is_not_found(fake_registry: ModelRegistry) -> None:
    with pytest.raises(NotFound) as e:
        fake_registry.generate("m-nope", prompt_length=1, output_tokens=1)
    assert e.value.field == "model_id"


def test_random_prompts_follow_the_seed(fake_registry: ModelRegistry) -> None:
    m = fake_registry.load(ModelRef(name="tiny-gpt2"), FAKE)
    a = fake_registry._prompt(m.spec, None, 50, 1)
    assert (
        a
        == fake_registry._prompt(m.spec, None, 50, 1)
        != fake_registry._prompt(m.spec, None, 50, 2)
    )
    assert all(0 <= t < m.spec.vocab for t in a)


def test_one_generation_at_a_time_per_model(fake_registry: ModelRegistry) -> None:
    m = fake_registry.load(ModelRef(name="tiny-gpt2"), FAKE)
    FakeBackend.max_active = 0
    threads = [
        threading.Thread(
            target=fake_registry.generate,
            args=(m.model_id,),
            kwargs={"prompt_length": 2, "output_tokens": 2},
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert FakeBackend.max_active == 1


def test_nonconforming_backend_result_is_an_error(fake_registry: ModelRegistry) -> None:
    m = fake_registry.load(ModelRef(name="tiny-gpt2"), StackSpec(Backend.TENSORRT))
    with pytest.raises(Internal) as e:
        fake_registry.generate(m.model_id, prompt_length=3, output_tokens=4)
    assert e.value.reason == "NONCONFORMING_GENERATION"


def test_backend_without_module_is_unimplemented(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry_mod._MODULES, Backend.TENSORRT, "no_such_backend")
    with pytest.raises(Unimplemented) as e:
        BackendTable().factory(Backend.TENSORRT)
    assert e.value.reason == "BACKEND_NOT_IMPLEMENTED"


def test_backend_with_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    def fail(name: str) -> None:
        raise ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(FailedPrecondition) as e:
        BackendTable().factory(Backend.TENSORRT)
    assert e.value.reason == "DEPENDENCY_MISSING" and "idealrt[tensorrt]" in e.value.message


def test_invalid_backend_value_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as e:
        ModelRegistry().load(ModelRef(name="tiny-gpt2"), StackSpec(backend="vllm"))
    assert e.value.field == "stack.backend"


def test_register_backend_updates_the_default_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_DEFAULT", BackendTable())
    register_backend(Backend.TENSORRT, FakeBackend)
    m = ModelRegistry().load(ModelRef(name="tiny-gpt2"), StackSpec(Backend.TENSORRT))
    assert m.memory == MemoryReport(1, 2, 3, 4)


def test_failed_load_leaves_nothing_behind() -> None:
    reg = ModelRegistry()
    with pytest.raises(ResourceExhausted):
        reg.load(ModelRef(name="davinci"), StackSpec())
    assert reg.list() == ([], "")
