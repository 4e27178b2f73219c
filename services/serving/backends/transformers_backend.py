"""The `transformers` backend: the Hugging Face implementation as its own stack.

The model is the HF class for the spec's family (`decoder.hf_convert`): seeded random init
from the config, or `from_pretrained` on a local directory. Generation is a plain loop over
`model(...)` with the model's own `past_key_values` (no `generate()`, no logits processors):
greedy argmax, EOS ignored, logits only for the last position, timed exactly as the
`pytorch` backend (`timing.StepClock`).

Options: threads ("N"), attn_implementation ("sdpa" or "eager"; default: the class's own
default, which is sdpa where the family supports it, e.g. not GPT-J).
transformers is imported only here (and in hf_convert); missing, it is
FailedPrecondition(DEPENDENCY_MISSING) naming `pip install idealrt[transformers]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from idealrt.core.clock import utcnow
from idealrt.core.domain import StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.model_spec import ModelSpec, resolve_max_context
from idealrt.core.reasons import OPTION_INVALID
from idealrt.core.serving_contract import GenerationResult, MemoryReport
from idealrt.services.serving.backends.base import (
    check_memory,
    clock_result,
    device_memory,
    resolve_device,
)
from idealrt.services.serving.backends.pytorch_backend import (
    TorchOptions,
    check_generation,
    warm_up,
)
from idealrt.services.serving.checkpoints import not_a_checkpoint
from idealrt.services.serving.decoder import torch_dtype
from idealrt.services.serving.decoder.hf_convert import hf_config, import_transformers
from idealrt.services.serving.reasons import ALREADY_LOADED, MODEL_NOT_LOADED, WEIGHTS_NOT_FOUND
from idealrt.services.serving.timing import StepClock, Timer, timer_for

__all__ = ["OPTIONS", "TransformersBackend", "create_backend"]

OPTIONS = ("threads", "attn_implementation")
_ATTN = ("sdpa", "eager")


def _kv_bytes(spec: ModelSpec, dtype: torch.dtype, tokens: int, batch: int) -> int:
    elem = torch.empty((), dtype=dtype, device="meta").element_size()
    return 2 * spec.layers * spec.kv_heads_effective * spec.head_dim * tokens * batch * elem


def _hf_pretrained(cls: Any, weights_path: str, **kw: Any) -> Any:
    """`cls.from_pretrained(weights_path)`; a directory transformers cannot read (a config
    that is not JSON or names an unknown model_type, weights of other shapes, a corrupt
    file) is InvalidArgument WEIGHTS_INVALID, not an internal error. The registry probed
    the files' framing before (`checkpoints`); this is what only transformers can tell."""
    try:
        return cls.from_pretrained(weights_path, **kw)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        # OSError: a missing or unreadable file; ValueError/KeyError: a config transformers
        # does not understand; RuntimeError: state dict shapes that do not fit the config
        why = f"transformers cannot load it ({type(e).__name__}: {str(e)[:300]})"
        raise not_a_checkpoint(weights_path, why) from e


class TransformersBackend:
    name = "transformers"

    def __init__(self) -> None:
        self._model: Any = None
        self._spec: ModelSpec | None = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._threads = 0
        self._max_context = 0
        self._timer: Timer = timer_for("cpu")

    def load(
        self, spec: ModelSpec, stack: StackSpec, weights_path: str, seed: int, max_context: int
    ) -> MemoryReport:
        if self._model is not None:
            raise FailedPrecondition(ALREADY_LOADED, "this backend instance already holds a model")
        tf = import_transformers()
        opts = TorchOptions.parse(stack, OPTIONS)
        attn = stack.options.get("attn_implementation", "")
        if attn and attn not in _ATTN:
            raise InvalidArgument(
                OPTION_INVALID,
                f"option attn_implementation must be one of {_ATTN}, got {attn!r}",
                field="stack.options",
            )
        dtype = torch_dtype(stack.dtype)
        device = resolve_device(stack.device)
        max_context = resolve_max_context(spec, max_context)
        if weights_path and not Path(weights_path, "config.json").is_file():
            raise InvalidArgument(
                WEIGHTS_NOT_FOUND,
                f"the transformers backend loads Hugging Face directories (config.json + "
                f"weights); {weights_path!r} is not one",
                field="model.weights_path",
            )
        config = _hf_pretrained(tf.AutoConfig, weights_path) if weights_path else hf_config(spec)
        with torch.device("meta"):
            meta = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        weights = sum(p.numel() * p.element_size() for p in meta.parameters())
        kv = _kv_bytes(spec, dtype, max_context, 1)
        check_memory(device, weights, kv, f"model {spec.name!r} in {stack.dtype} (transformers)")
        if opts.threads:
            torch.set_num_threads(opts.threads)
        kw = {"attn_implementation": attn} if attn else {}
        if weights_path:
            model = _hf_pretrained(tf.AutoModelForCausalLM, weights_path, dtype=dtype, **kw)
            model = model.to(device)
        else:
            fork = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork), torch.device(device):
                torch.manual_seed(seed)
                model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
        self._model = model.eval().requires_grad_(False)
        self._spec, self._device, self._dtype = spec, device, dtype
        self._threads, self._max_context = opts.threads, max_context
        self._timer = timer_for(device)
        try:
            warm_up(self, max_context)
        except BaseException:
            self.unload()
            raise
        total, free = device_memory(device)
        return MemoryReport(weights, kv, total, free)

    def unload(self) -> None:
        self._model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        model, spec = self._model, self._spec
        if model is None or spec is None:
            raise FailedPrecondition(MODEL_NOT_LOADED, "load a model before generating")
        check_generation(prompt_ids, output_tokens, batch_size, spec.vocab, self._max_context)
        if batch_size > 1:
            check_memory(
                self._device,
                0,
                _kv_bytes(spec, self._dtype, self._max_context, batch_size),
                f"KV cache for batch {batch_size}",
            )
        if self._threads:
            torch.set_num_threads(self._threads)
        p, o = len(prompt_ids), output_tokens
        prompt = torch.tensor(list(prompt_ids), dtype=torch.int64).view(1, p).expand(batch_size, p)
        out = torch.empty(batch_size, o, dtype=torch.int64, device=self._device)
        clock = StepClock(self._timer)
        with torch.inference_mode():
            start_time = utcnow()
            clock.start()
            res = model(input_ids=prompt.to(self._device), use_cache=True, logits_to_keep=1)
            tok = res.logits[:, -1].argmax(-1)
            out[:, 0] = tok
            clock.mark()
            for i in range(1, o):
                res = model(
                    input_ids=tok.view(-1, 1),
                    past_key_values=res.past_key_values,
                    use_cache=True,
                    logits_to_keep=1,
                )
                tok = res.logits[:, -1].argmax(-1)
                out[:, i] = tok
                clock.mark()
            del res
        return clock_result(clock, p, out[0].tolist(), start_time, batch_size)


def create_backend() -> TransformersBackend:
    return TransformersBackend()
