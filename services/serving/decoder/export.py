"""The ONNX-export-friendly step of the reference decoder (for the onnxruntime/TensorRT
backends).

    DecoderStep(decoder)(input_ids, past_k, past_v, position) -> (logits, new_k, new_v)

    input_ids  int64 [B, T]                        prompt (T = p, position 0) or one token
    past_k/v   L tensors dtype [B, kv_heads, S, hd]  one per layer, read only; slots
                                                   j < position are valid
    position   int64 0-d                           number of valid past slots (= past_len)
    logits     dtype [B, 1, vocab]                 last position only (last_only=True)
    new_k/v    dtype [layers, B, kv_heads, T, hd]  the caller stores them at
                                                   slots position..position+T-1

In the ONNX graph the past is 2L inputs, `past_k_0..past_k_{L-1}` then
`past_v_0..past_v_{L-1}` (`input_names`), so each layer's attention reads its own bound
buffer: no node slices, gathers, concatenates or copies the past (a stacked
[layers, ..] past input made the exporter emit one Gather per layer and tensor, which ONNX
Runtime materialises: the whole cache copied every step). Attention is split into the past
block and the new block with one softmax over both (`_attend`): the past is consumed in
place by two matmuls (q @ K^T, which ONNX Runtime fuses into one MatMul with transposed B,
and probs @ V), and only the T new keys/values are concatenated, logically, through the
softmax. The new K/V come out stacked (T slots per layer: one small concatenation).

The graph is pure (no in-place cache writes, no data-dependent control flow); its math is
`Decoder.forward_with_cache`'s (same helpers, per-layer past). S can be a static buffer
(S = max_context: keys past `position` are masked, so decode cost is flat in the context)
or the exact past (S = position, marked dynamic, an empty [.., 0, hd] past for the
prefill): one graph serves both when the T and S axes are exported as dynamic. Positions,
rotary tables and the ALiBi bias are computed from `position` inside the graph.

`export_onnx` wraps `torch.onnx.export` (dynamo exporter) with those names and dynamic
axes (B, T and one S shared by every layer's past).

Fused flavour (`fused=True`, ONNX Runtime's CPU provider only; `fused_attention`): each
layer's attention, cache write included, is one `com.microsoft.GroupQueryAttention` node,
and the outputs are `logits` then `present_k_0..`, `present_v_0..` ([B, kv_heads, S, hd],
the past with the T new slots written: bound to the past's own memory, ONNX Runtime writes
them in place and attends only slots < position + T, so S is the static max_context
buffer). The plain flavour stays the portable graph (TensorRT builds from it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from idealrt.services.serving.decoder.fused_attention import (
    gqa_step,
    onnx_translation,
    step_lengths,
)
from idealrt.services.serving.decoder.model import Decoder

__all__ = [
    "OUTPUT_NAMES",
    "DecoderStep",
    "example_inputs",
    "export_onnx",
    "input_names",
    "output_names",
    "past_names",
]

OUTPUT_NAMES = ("logits", "new_k", "new_v")
Out = tuple[Tensor, Tensor, Tensor]  # projected attention output, K and V to return
Attend = Callable[[Any, Tensor, Tensor, Tensor], Out]  # (block, normed x, past K, past V)
Rope = tuple[Tensor, Tensor] | None


def past_names(layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The graph's per-layer past inputs: (past_k_0.., past_v_0..)."""
    return (
        tuple(f"past_k_{i}" for i in range(layers)),
        tuple(f"past_v_{i}" for i in range(layers)),
    )


def output_names(layers: int, *, fused: bool = False) -> tuple[str, ...]:
    """The step graph's outputs: logits, new_k, new_v; fused: logits, present_k_*, present_v_*."""
    if not fused:
        return OUTPUT_NAMES
    keys, values = past_names(layers)
    return ("logits", *(f"present_{n[5:]}" for n in (*keys, *values)))


def input_names(layers: int) -> tuple[str, ...]:
    """Every input of the step graph of a `layers`-layer decoder, in graph order."""
    keys, values = past_names(layers)
    return ("input_ids", *keys, *values, "position")


def _attend(
    q: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_bias: torch.Tensor,
    new_bias: torch.Tensor,
) -> torch.Tensor:
    """Attention of q (scaled, grouped [B, kv, G*T, hd]) over the past block (read in
    place) and the new block, with one softmax in fp32 over both."""
    s = past_k.shape[2]
    scores = torch.cat(
        (
            torch.matmul(q, past_k.transpose(-1, -2)).float() + past_bias,
            torch.matmul(q, k.transpose(-1, -2)).float() + new_bias,
        ),
        dim=-1,
    )
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs[..., :s], past_v) + torch.matmul(probs[..., s:], v)


class DecoderStep(nn.Module):
    """One functional step of `decoder` with a per-layer past (an nn.Module, as exporters
    want); the math of `decoder.forward_with_cache`. fused: attention through `gqa_step`
    (outputs: logits, then every layer's present K, then every layer's present V)."""

    def __init__(self, decoder: Decoder, *, last_only: bool = True, fused: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.last_only = last_only
        self.fused = fused

    def forward(
        self,
        input_ids: torch.Tensor,
        past_k: list[torch.Tensor],
        past_v: list[torch.Tensor],
        position: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        dec = self.decoder
        b, t = input_ids.shape
        q_pos = position + torch.arange(t, device=input_ids.device)
        x = dec._embed(input_ids, q_pos)
        rope = (dec.rope_cos[q_pos], dec.rope_sin[q_pos]) if dec._rotary else None
        if self.fused:  # the residual stream as rows [B*T, d]: no reshapes around the GEMMs
            x = x.reshape(b * t, -1)
            attend = self._fused_attention(position, b, t, rope)
        else:
            attend = self._split_attention(q_pos, position, past_k[0].shape[2], rope)
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        for blk, pk, pv in zip(dec._blocks, past_k, past_v, strict=True):
            h = dec._norm(x, blk.attn_norm_w, blk.attn_norm_b)
            attn, nk, nv = attend(blk, h, pk, pv)
            x = dec._residual(blk, x, h, attn)
            new_k.append(nk)
            new_v.append(nv)
        if self.fused:  # every layer's present K, then every layer's present V
            return (dec._logits(x.view(b, t, -1), self.last_only), *new_k, *new_v)
        return dec._logits(x, self.last_only), torch.stack(new_k), torch.stack(new_v)

    def _split_attention(self, q_pos: Tensor, position: Tensor, s: int, rope: Rope) -> Attend:
        """Attention over the read-only past and the new block (`_attend`): returns the
        projected output and the new K, V themselves."""
        dec = self.decoder
        t = q_pos.shape[0]
        k_pos = torch.arange(s, device=q_pos.device)
        past_bias = dec._grouped(dec._bias(q_pos, k_pos, (position - 1).expand(t)))
        new_bias = dec._grouped(dec._bias(q_pos, q_pos, q_pos))

        def attend(blk: Any, h: Tensor, pk: Tensor, pv: Tensor) -> Out:
            q, k, v = dec._qkv(blk, h, rope)
            o = _attend(dec._group_q(q) * dec.scale, pk, pv, k, v, past_bias, new_bias)
            return dec._attn_out(blk, o.reshape(q.shape)), k, v

        return attend

    def _fused_attention(self, position: Tensor, b: int, t: int, rope: Rope) -> Attend:
        """Attention as one `gqa_step` a layer on rows h [B*T, d]: returns the projected
        output (rows) and the presents (the past with the new slots written). Without
        rotary the qkv projection goes to the op packed, as it comes out of the GEMM."""
        dec = self.decoder
        seqlens, total = step_lengths(position, b, t)
        spec = (dec.heads, dec.kv_heads, dec.scale, dec.window or 0)

        def rows(a: Tensor) -> Tensor:  # [B, n, T, hd] -> [B, T, n*hd]
            return a.transpose(1, 2).reshape(b, t, -1)

        def attend(blk: Any, h: Tensor, pk: Tensor, pv: Tensor) -> Out:
            if rope is None:
                packed = dec._linear(h, blk.qkv_w, blk.qkv_b).view(b, t, -1)
                o, ck, cv = gqa_step(packed, None, None, pk, pv, seqlens, total, *spec)
            else:
                q, k, v = dec._qkv(blk, h.view(b, t, -1), rope)
                o, ck, cv = gqa_step(rows(q), rows(k), rows(v), pk, pv, seqlens, total, *spec)
            return dec._linear(o.view(b * t, -1), blk.o_w, blk.o_b), ck, cv

        return attend


def example_inputs(
    decoder: Decoder, *, batch: int = 2, tokens: int = 2, past: int = 3
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Inputs of the right dtypes/shapes on the decoder's device (past slots zero)."""
    dev = decoder.head_w.device
    shape = (batch, decoder.kv_heads, past, decoder.head_dim)
    ids = torch.zeros(batch, tokens, dtype=torch.int64, device=dev)

    def zeros() -> list[torch.Tensor]:
        return [
            torch.zeros(shape, dtype=decoder.dtype, device=dev) for _ in range(decoder.spec.layers)
        ]

    return ids, zeros(), zeros(), torch.tensor(past, dtype=torch.int64, device=dev)


def export_onnx(
    decoder: Decoder,
    path: str | os.PathLike[str],
    *,
    last_only: bool = True,
    fused: bool = False,
) -> None:
    """Export `DecoderStep(decoder, fused=fused)` to an ONNX file with dynamic B, T and S
    axes."""
    step = DecoderStep(decoder, last_only=last_only, fused=fused).eval()
    batch, tokens, past = (
        torch.export.Dim("batch"),
        torch.export.Dim("tokens"),
        torch.export.Dim("past"),
    )
    layers = decoder.spec.layers
    per_layer = [{0: batch, 2: past} for _ in range(layers)]
    shapes = {
        "input_ids": {0: batch, 1: tokens},
        "past_k": per_layer,
        "past_v": list(per_layer),
        "position": None,
    }
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            step,
            example_inputs(decoder),
            str(path),
            input_names=list(input_names(layers)),
            output_names=list(output_names(layers, fused=fused)),
            dynamic_shapes=shapes,
            custom_translation_table=onnx_translation() if fused else None,
            dynamo=True,
        )
