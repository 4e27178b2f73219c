"""Small tensor functions of the reference decoder: norms, activations, rotary, ALiBi, masks.

Every function here is shape-driven (no data-dependent Python control flow), so the decoder
that calls them traces, compiles, captures into CUDA graphs and exports to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from idealrt.core.model_spec import Activation

__all__ = [
    "activation",
    "alibi_slopes",
    "rms_norm",
    "rotary_tables",
    "rotate_half",
    "rotate_interleaved",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, cast back, then scale (as Hugging Face does)."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return y * weight


def activation(kind: Activation, h: torch.Tensor) -> torch.Tensor:
    """The MLP non-linearity. SWIGLU expects h = [gate | up] along the last dimension."""
    if kind == Activation.GELU:
        return F.gelu(h, approximate="tanh")
    if kind == Activation.GELU_EXACT:
        return F.gelu(h)
    if kind == Activation.RELU:
        return F.relu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_tables(
    positions: int, dim: int, base: float, *, interleaved: bool, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [positions, dim], in fp32, laid out for the rotation style.

    Halves (NeoX/Llama): frequency k sits at k and k + dim/2. Interleaved (GPT-J): at 2k and
    2k+1. The arithmetic (int64 exponents over dim, fp32 outer product) follows Hugging Face
    so the tables are bit-identical to theirs.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    t = torch.arange(positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    if interleaved:
        emb = torch.repeat_interleave(freqs, 2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (NeoX/Llama rotary)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Pairs (x[2k], x[2k+1]) -> (-x[2k+1], x[2k]) (GPT-J's rotate_every_two)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def alibi_slopes(heads: int) -> torch.Tensor:
    """BLOOM's per-head ALiBi slopes, fp32 [heads]: geometric, with the extra heads taken
    from the next power of two when heads is not one (computed in fp32 as HF does)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes
