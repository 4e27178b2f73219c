"""Materialising a Decoder: dtype names, planned bytes (before allocating), seeded init,
weights from disk.

The decoder is first built on the "meta" device (no memory), which gives the exact bytes
that loading will allocate; only then is it materialised on the target device.
"""

from __future__ import annotations

import torch

from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.core.reasons import DTYPE_UNSUPPORTED
from idealrt.services.serving.decoder.model import Decoder

__all__ = [
    "INIT_STD",
    "TORCH_DTYPES",
    "build_decoder",
    "init_random_",
    "meta_decoder",
    "planned_bytes",
    "torch_dtype",
]

INIT_STD = 0.02
TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stack dtype name (fp32 | fp16 | bf16)."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise InvalidArgument(
            DTYPE_UNSUPPORTED,
            f"stack.dtype must be one of {', '.join(TORCH_DTYPES)} for this backend, got {name!r}",
            field="stack.dtype",
        ) from None


def meta_decoder(spec: ModelSpec, dtype: torch.dtype, max_context: int = 0) -> Decoder:
    """The decoder's structure with no storage behind it."""
    with torch.device("meta"):
        return Decoder(spec, dtype=dtype, max_context=max_context)


def planned_bytes(
    spec: ModelSpec, dtype: torch.dtype, max_context: int = 0, batch_size: int = 1
) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) that `build_decoder` + `new_cache(batch_size)` will
    allocate, counted on the meta device (tied weights once)."""
    meta = meta_decoder(spec, dtype, max_context)
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    return weights, cache_bytes(meta, batch_size)


def cache_bytes(decoder: Decoder, batch_size: int) -> int:
    elem = torch.empty((), dtype=decoder.dtype, device="meta").element_size()
    per_seq = 2 * decoder.spec.layers * decoder.kv_heads * decoder.max_context * decoder.head_dim
    return batch_size * per_seq * elem


def _is_norm_weight(name: str) -> bool:
    return "norm_w" in name


@torch.no_grad()
def init_random_(decoder: Decoder, seed: int) -> None:
    """Seeded init in place: matrices and embeddings ~ N(0, 0.02), biases 0, norm scales 1.

    Values come from a generator on the parameters' device seeded with `seed`, so the same
    seed gives the same weights on the same device type, without touching the global RNG.
    """
    device = decoder.head_w.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, p in decoder.named_parameters():
        if _is_norm_weight(name):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            p.normal_(0.0, INIT_STD, generator=gen)


def build_decoder(
    spec: ModelSpec,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_context: int = 0,
    seed: int = 0,
    weights_path: str = "",
) -> Decoder:
    """A ready Decoder on `device`: weights from `weights_path` (a safetensors file or a
    Hugging Face directory) when given, else seeded random init. Eval mode, no grads."""
    from idealrt.services.serving.weights import load_weights_

    decoder = meta_decoder(spec, dtype, max_context).to_empty(device=device)
    decoder.reset_buffers()
    if weights_path:
        load_weights_(decoder, weights_path)
    else:
        init_random_(decoder, seed)
    return decoder.eval().requires_grad_(False)
