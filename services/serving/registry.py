"""The serving domain: which models are loaded, on which backend, and exact-length
generations against them. No gRPC here; `servicer.py` converts and calls in.

Thread safety: one lock guards the tables (held only for dictionary work); loads are
serialised (each checks free memory, which a concurrent load would invalidate); each model
runs one generation at a time (a measurement never shares its device with another) through
its `DeviceQueue` (`device_queue`): at most `limits.max_queued_generations` calls wait per
model, a waiting call prepares (checks, prompt) only between two generations and then
blocks, so the timed region of the running call sees no work from the queue; a call whose
caller is gone or whose deadline passes while it waits never runs.

Backends are created by factories keyed by `Backend`. The built-in table finds each backend
module lazily (`idealrt.services.serving.backends.<name>_backend.create_backend`), so a
missing optional dependency only disables its backend; `register_backend` adds or replaces
a factory (tests, or backends that live elsewhere). The default table is the one module-level
mutable object here, on purpose: it is the registration point the backend modules share.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import importlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from idealrt.core import catalog, paging
from idealrt.core.clock import utcnow
from idealrt.core.config import ServingConfig
from idealrt.core.domain import Backend, ModelRef, StackSpec
from idealrt.core.errors import (
    FailedPrecondition,
    Internal,
    NotFound,
    Unimplemented,
    invalid,
)
from idealrt.core.hf_config import spec_from_hf_config
from idealrt.core.model_spec import ModelSpec, check_max_context, resolve_max_context
from idealrt.core.namespaces import require_operator
from idealrt.core.reasons import NONCONFORMING_GENERATION
from idealrt.core.serving_contract import GenerationResult, LoadedModel
from idealrt.services.serving.backends.base import (
    Backend as BackendProtocol,
)
from idealrt.services.serving.backends.base import BackendFactory
from idealrt.services.serving.checkpoints import checkpoint_files
from idealrt.services.serving.device_queue import Call, DeviceQueue, QueueStats
from idealrt.services.serving.reasons import (
    BACKEND_INVALID,
    BACKEND_NOT_IMPLEMENTED,
    DEPENDENCY_MISSING,
    MODEL_NOT_LOADED,
    MODEL_UNSPECIFIED,
    PROMPT_EMPTY,
    PROMPT_LENGTH_MISMATCH,
    TOKEN_OUT_OF_RANGE,
)
from idealrt.services.serving.validate import (
    MAX_BATCH_SIZE,
    ServingLimits,
    check_generation_request,
    check_model_ref,
    check_spec_size,
    check_stack_options,
    check_stack_sizes,
    shown,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_BATCH_SIZE",
    "MAX_PAGE_SIZE",
    "BackendTable",
    "ModelRegistry",
    "default_backends",
    "register_backend",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_MODULES = {
    Backend.PYTORCH: "pytorch_backend",
    Backend.ONNXRUNTIME: "onnxruntime_backend",
    Backend.TENSORRT: "tensorrt_backend",
    Backend.TRANSFORMERS: "transformers_backend",
}
_EXTRAS = {
    Backend.PYTORCH: "pip install idealrt",
    Backend.ONNXRUNTIME: "pip install idealrt[onnx] (CPU) or idealrt[gpu] (CUDA; never both)",
    Backend.TENSORRT: "pip install idealrt[tensorrt]",
    Backend.TRANSFORMERS: "pip install idealrt[transformers]",
}
_PACKAGE = "idealrt.services.serving.backends"


class BackendTable:
    """Backend -> factory, thread-safe; unregistered built-ins are imported on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._factories: dict[Backend, BackendFactory] = {}

    def register(self, backend: Backend, factory: BackendFactory) -> None:
        with self._lock:
            self._factories[Backend(backend)] = factory

    def factory(self, backend: Backend) -> BackendFactory:
        """The factory for `backend`: Unimplemented(BACKEND_NOT_IMPLEMENTED) when there is
        none; FailedPrecondition(DEPENDENCY_MISSING) when its module cannot be imported."""
        with self._lock:
            found = self._factories.get(backend)
        if found is not None:
            return found
        module_name = _MODULES.get(backend)
        if module_name is None:
            raise Unimplemented(BACKEND_NOT_IMPLEMENTED, f"backend {backend!r} is not implemented")
        qualified = f"{_PACKAGE}.{module_name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as e:
            if e.name == qualified:
                raise Unimplemented(
                    BACKEND_NOT_IMPLEMENTED,
                    f"backend {backend.value} is not available in this build of idealrt",
                ) from None
            raise FailedPrecondition(
                DEPENDENCY_MISSING,
                f"backend {backend.value} needs {e.name!r}: {_EXTRAS[backend]}",
            ) from None
        create = getattr(module, "create_backend", None)
        if create is None:
            raise Unimplemented(BACKEND_NOT_IMPLEMENTED, f"{qualified} defines no create_backend()")
        return create


_DEFAULT = BackendTable()


def default_backends() -> BackendTable:
    return _DEFAULT


def register_backend(backend: Backend, factory: BackendFactory) -> None:
    """Register (or replace) the factory of `backend` in the default table."""
    _DEFAULT.register(backend, factory)


@dataclasses.dataclass
class _Entry:
    model: LoadedModel
    backend: BackendProtocol
    seq: int
    queue: DeviceQueue
    unloaded: bool = False


def resolve_spec(model: ModelRef) -> tuple[str, ModelSpec]:
    """(display name, spec) of a ModelRef: its spec, else its catalog name, else the
    config.json of its weights directory. A weights path must hold a checkpoint
    (`checkpoints.checkpoint_files`: headers probed, nothing loaded)."""
    if model.weights_path:
        checkpoint_files(model.weights_path)
    if model.spec is not None:
        return model.name or model.spec.name, model.spec
    if model.name:
        return model.name, catalog.resolve(model.name)
    if model.weights_path and Path(model.weights_path, "config.json").is_file():
        spec = spec_from_hf_config(model.weights_path)
        return spec.name, spec
    raise invalid(
        "model",
        MODEL_UNSPECIFIED,
        "name a catalog model, give a spec, or a Hugging Face directory as weights_path",
    )


_PAGE_KIND = "models"  # the listing's kind in its page tokens (idealrt.core.paging)


class ModelRegistry:
    """`limits`: what one request may ask for (`validate.ServingLimits`; by default those
    of a default ServingConfig on this process' CPUs)."""

    def __init__(
        self,
        backends: BackendTable | None = None,
        *,
        new_id: Callable[[], str] = lambda: f"m-{uuid.uuid4().hex[:12]}",
        limits: ServingLimits | None = None,
    ) -> None:
        self._backends = backends or _DEFAULT
        self.limits = limits or ServingLimits.from_config(ServingConfig())
        self._new_id = new_id
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._by_request: dict[str, str] = {}
        self._seq = 0

    # ---- load / unload / get ----
    def load(
        self, model: ModelRef, stack: StackSpec, max_context: int = 0, request_id: str = ""
    ) -> LoadedModel:
        """Load `model` on `stack`. Idempotent by request_id while that model is loaded.
        Every size in the request is checked (`validate`) before any backend work. Only
        an operator (core.namespaces.require_operator) loads models."""
        require_operator()
        check_max_context(max_context)  # first, and before any request_id replay
        check_model_ref(model, stack)
        try:
            backend_kind = Backend(stack.backend)
        except ValueError:
            raise invalid(
                "stack.backend",
                BACKEND_INVALID,
                f"stack.backend must be one of {', '.join(b.value for b in Backend)}",
            ) from None
        cores = check_stack_options(stack, self.limits)
        with self._load_lock:
            if request_id:
                with self._lock:
                    prior = self._entries.get(self._by_request.get(request_id, ""))
                if prior is not None:
                    return prior.model
            name, spec = resolve_spec(model)
            check_spec_size(spec, self.limits)
            max_context = resolve_max_context(spec, max_context)
            check_stack_sizes(stack, spec, max_context)
            backend = self._backends.factory(backend_kind)()
            if cores is not None:
                _pin(cores)
            t0 = time.perf_counter_ns()
            try:
                memory = backend.load(spec, stack, model.weights_path, model.seed, max_context)
            except BaseException:
                backend.unload()
                raise
            load_ns = time.perf_counter_ns() - t0
            loaded = LoadedModel(
                model_id=self._new_id(),
                name=name,
                spec=spec,
                stack=dataclasses.replace(
                    stack, options={**stack.options, **memory.resolved_options}
                ),
                memory=memory,
                load_ns=load_ns,
                max_context=max_context,
                create_time=utcnow(),
                seed=model.seed,
                weights_path=model.weights_path,
                request_id=request_id,
            )
            queue = DeviceQueue(
                loaded.model_id,
                self.limits.max_queued_generations,
                closed_error=lambda: NotFound(
                    MODEL_NOT_LOADED,
                    f"model {loaded.model_id!r} was unloaded",
                    field="model_id",
                ),
            )
            with self._lock:
                self._seq += 1
                self._entries[loaded.model_id] = _Entry(loaded, backend, self._seq, queue)
                if request_id:
                    self._by_request[request_id] = loaded.model_id
            return loaded

    def _entry(self, model_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(model_id)
        if entry is None:
            raise NotFound(MODEL_NOT_LOADED, f"no loaded model {shown(model_id)}", field="model_id")
        return entry

    def get(self, model_id: str) -> LoadedModel:
        return self._entry(model_id).model

    def queue_stats(self, model_id: str) -> QueueStats:
        """The generation queue of a loaded model: calls waiting, whether one holds the
        device, counters (admitted, ran, refused, left)."""
        return self._entry(model_id).queue.stats()

    def unload(self, model_id: str) -> LoadedModel:
        """Unload a model (after its running generation, if any, finishes; calls waiting
        for it get NotFound MODEL_NOT_LOADED); only an operator may
        (core.namespaces.require_operator)."""
        require_operator()
        with self._lock:
            entry = self._entries.pop(model_id, None)
            if entry is not None and entry.model.request_id:
                self._by_request.pop(entry.model.request_id, None)
        if entry is None:
            raise NotFound(MODEL_NOT_LOADED, f"no loaded model {shown(model_id)}", field="model_id")
        entry.queue.close()  # waiting calls leave; waits for the running one
        entry.unloaded = True
        entry.backend.unload()
        return entry.model

    def close(self) -> None:
        """Unload every model."""
        with self._lock:
            ids = builtins.list(self._entries)
        for model_id in ids:
            with contextlib.suppress(NotFound):
                self.unload(model_id)

    # ---- generation ----
    def generate(
        self,
        model_id: str,
        *,
        prompt_ids: Sequence[int] | None = None,
        prompt_length: int = 0,
        prompt_seed: int = 0,
        output_tokens: int,
        batch_size: int = 1,
        call: Call | None = None,
    ) -> GenerationResult:
        """One exact-length greedy generation. The prompt is `prompt_ids`, or
        `prompt_length` tokens drawn uniformly from the vocabulary with `prompt_seed`.
        Every size is checked against the limits and max_context before the prompt is
        built (`validate.check_generation_request`). Only an operator may generate (a
        generation takes the shared device).

        Calls on one model run one at a time through its DeviceQueue: ResourceExhausted
        GENERATION_QUEUE_FULL when `limits.max_queued_generations` already wait; the prompt
        is built (and given ids checked) in a gap between two generations, never during
        one. `call` carries the caller's deadline and end (`device_queue.Call`): a call
        that is terminated, or whose deadline passes, while it waits never runs
        (Unavailable GENERATION_CANCELLED / GENERATION_DEADLINE_EXPIRED); with
        `Call(hold=True)` the device stays held after the generation until
        `call.terminated()` (the answer has been sent)."""
        require_operator()
        entry = self._entry(model_id)
        spec, max_context = entry.model.spec, entry.model.max_context
        p = check_generation_request(  # arithmetic: a bad request never queues
            prompt_ids_given=bool(prompt_ids),
            n_ids=len(prompt_ids or ()),
            prompt_length=prompt_length,
            output_tokens=output_tokens,
            batch_size=batch_size,
            max_context=max_context,
            limits=self.limits,
        )

        def prepare() -> builtins.list[int]:  # O(p) work: in a gap between generations
            return self._prompt(spec, prompt_ids, prompt_length, prompt_seed)

        def work(ids: builtins.list[int]) -> GenerationResult:
            if entry.unloaded:
                raise NotFound(
                    MODEL_NOT_LOADED, f"model {model_id!r} was unloaded", field="model_id"
                )
            return entry.backend.generate(ids, output_tokens, batch_size)

        result = entry.queue.run(prepare, work, call)
        got = (result.prompt_tokens, result.output_tokens, result.batch_size)
        if got != (p, output_tokens, batch_size):
            raise Internal(
                NONCONFORMING_GENERATION,
                f"backend {entry.model.stack.backend} returned (p, o, batch) = {got}, "
                f"asked for {(p, output_tokens, batch_size)}",
            )
        return result

    @staticmethod
    def _prompt(
        spec: ModelSpec, prompt_ids: Sequence[int] | None, length: int, seed: int
    ) -> builtins.list[int]:
        if prompt_ids:
            if length and length != len(prompt_ids):
                raise invalid(
                    "prompt.length",
                    PROMPT_LENGTH_MISMATCH,
                    f"prompt.length {length} != {len(prompt_ids)} token ids given",
                )
            ids = [int(t) for t in prompt_ids]
            bad = [t for t in ids if not 0 <= t < spec.vocab]
            if bad:
                raise invalid(
                    "prompt.token_ids",
                    TOKEN_OUT_OF_RANGE,
                    f"token ids must be in [0, {spec.vocab}); got {bad[:5]}",
                )
            return ids
        if length < 1:
            raise invalid(
                "prompt.length", PROMPT_EMPTY, f"prompt.length must be >= 1, got {length}"
            )
        rng = random.Random(seed)
        return [rng.randrange(spec.vocab) for _ in range(length)]

    # ---- listing (last: `list` shadows the builtin inside the class body) ----
    def list(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[builtins.list[LoadedModel], str]:
        """Loaded models in load order: (page, next_page_token or "").
        page_size 0 -> 50, capped at 1000; tokens are `idealrt.core.paging`'s, keyset on the
        load sequence number."""
        size = paging.page_size(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        cursor = paging.decode_token(page_token, _PAGE_KIND, "")
        after = 0
        if cursor is not None:
            if len(cursor) != 1 or isinstance(cursor[0], bool) or not isinstance(cursor[0], int):
                raise paging.invalid_token()
            after = cursor[0]
        with self._lock:
            entries = sorted(
                (e for e in self._entries.values() if e.seq > after), key=lambda e: e.seq
            )
        page = entries[:size]
        more = len(entries) > size
        token = paging.encode_token(_PAGE_KIND, "", [page[-1].seq]) if more else ""
        return [e.model for e in page], token


def _pin(cores: frozenset[int]) -> None:
    """Stack option `cores` ("0-3,6", checked by `validate.check_stack_options`): pin this
    serving process (all threads) to those cores before the backend creates its thread
    pools."""
    from idealrt.core.affinity import pin_to_cores

    pin_to_cores(cores)
