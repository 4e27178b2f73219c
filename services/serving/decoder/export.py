"""The ONNX-export-friendly step of the reference decoder (for the onnxruntime/TensorRT
backends).

    DecoderStep(decoder)(input_ids, past_k, past_v, position) -> (logits, new_k, new_v)

    input_ids  int64 [B, T]                        prompt (T = p, position 0) or one token
    past_k/v   dtype [layers, B, kv_heads, S, hd]  read only; slots j < position are valid
    position   int64 0-d                           number of valid past slots (= past_len)
    logits     dtype [B, 1, vocab]                 last position only (last_only=True)
    new_k/v    dtype [layers, B, kv_heads, T, hd]  the caller stores them at
                                                   slots position..position+T-1

The graph is pure (no in-place cache writes, no data-dependent control flow); its math is
`Decoder.forward_with_cache`. S can be a static buffer (S = max_context: keys past
`position` are masked, so decode cost is flat in the context) or the exact past (S =
position, marked dynamic, an empty [.., 0, hd] past for the prefill): one graph serves both
when the T and S axes are exported as dynamic. Positions, rotary tables and the ALiBi bias
are computed from `position` inside the graph.

`export_onnx` wraps `torch.onnx.export` (dynamo exporter) with those names and dynamic
axes; the cache layout [layers, 2, B, kv_heads, S, hd] of `Decoder.new_cache` gives
past_k = cache[:, 0] and past_v = cache[:, 1].
"""

from __future__ import annotations

import os

import torch
from torch import nn

from idealrt.services.serving.decoder.model import Decoder

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "DecoderStep", "example_inputs", "export_onnx"]

INPUT_NAMES = ("input_ids", "past_k", "past_v", "position")
OUTPUT_NAMES = ("logits", "new_k", "new_v")


class DecoderStep(nn.Module):
    """`forward` = `decoder.forward_with_cache` (an nn.Module, as exporters want)."""

    def __init__(self, decoder: Decoder, *, last_only: bool = True) -> None:
        super().__init__()
        self.decoder = decoder
        self.last_only = last_only

    def forward(
        self,
        input_ids: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        position: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decoder.forward_with_cache(
            input_ids, past_k, past_v, position, last_only=self.last_only
        )


def example_inputs(
    decoder: Decoder, *, batch: int = 2, tokens: int = 2, past: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the right dtypes/shapes on the decoder's device (past slots zero)."""
    dev = decoder.head_w.device
    shape = (decoder.spec.layers, batch, decoder.kv_heads, past, decoder.head_dim)
    ids = torch.zeros(batch, tokens, dtype=torch.int64, device=dev)
    pk = torch.zeros(shape, dtype=decoder.dtype, device=dev)
    return ids, pk, pk.clone(), torch.tensor(past, dtype=torch.int64, device=dev)


def export_onnx(decoder: Decoder, path: str | os.PathLike[str], *, last_only: bool = True) -> None:
    """Export `DecoderStep(decoder)` to an ONNX file with dynamic B, T and S axes."""
    step = DecoderStep(decoder, last_only=last_only).eval()
    batch, tokens, past = (
        torch.export.Dim("batch"),
        torch.export.Dim("tokens"),
        torch.export.Dim("past"),
    )
    shapes = {
        "input_ids": {0: batch, 1: tokens},
        "past_k": {1: batch, 3: past},
        "past_v": {1: batch, 3: past},
        "position": None,
    }
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            step,
            example_inputs(decoder),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=shapes,
            dynamo=True,
        )
