"""Pieces of the reference decoder that hold no math: the parameters of one layer (`Block`)
and the protocol of the native CPU kernels the eager decode step can call (`NativeOps`)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from idealrt.core.model_spec import ModelSpec, Norm

__all__ = ["Block", "NativeOps", "param"]


def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class NativeOps(Protocol):
    """CPU kernels the eager batch-1 decode step can use instead of ATen (see
    `idealrt.services.serving.decoder.native`)."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x [1, in] @ w [in, out] (+ b) -> [1, out]."""
        ...

    def attend_step(
        self,
        qkv: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: int,
        lo: int,
        scale: float,
        *,
        heads: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        interleaved: bool = False,
        alibi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One layer's single-token attention from its qkv row, cache write included:
        [1, 1, heads * head_dim]."""
        ...


class Block(nn.Module):
    """Parameters of one transformer layer (the math lives in Decoder, to keep the
    per-layer Python cost of a decode step to the few calls it needs).

    Matrices are stored [in, out] and applied as x @ W (+ b): on the CPU that is the
    streaming GEMV/GEMM layout (measured ~1.5x the bandwidth of nn.Linear's [out, in] at
    decode on AVX-512/MKL). qkv_w's columns are q (heads*head_dim), then k and v
    (kv_heads*head_dim each); up_w is [d, d_ff] or, for SwiGLU, [d, gate | up].
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        d, hd = spec.d_model, spec.head_dim
        qkv_rows = (spec.heads + 2 * spec.kv_heads_effective) * hd
        layernorm = spec.norm == Norm.LAYERNORM
        opt = {"dtype": dtype}
        self.attn_norm_w = param(d, **opt)
        self.attn_norm_b = param(d, **opt) if layernorm else None
        shared = spec.shared_norm_effective
        self.mlp_norm_w = None if shared else param(d, **opt)
        self.mlp_norm_b = param(d, **opt) if layernorm and not shared else None
        self.qkv_w = param(d, qkv_rows, **opt)
        self.qkv_b = param(qkv_rows, **opt) if spec.attn_bias_effective else None
        self.o_w = param(spec.heads * hd, d, **opt)
        self.o_b = param(d, **opt) if spec.attn_bias_effective else None
        up_rows = 2 * spec.d_ff if spec.ffn_gated else spec.d_ff
        self.up_w = param(d, up_rows, **opt)
        self.up_b = param(up_rows, **opt) if spec.bias else None
        self.down_w = param(spec.d_ff, d, **opt)
        self.down_b = param(d, **opt) if spec.bias else None
