"""Fused attention for the ONNX step: ONNX Runtime's GroupQueryAttention.

`gqa_step` is a torch custom op (`idealrt::gqa_step`) whose math is the decoder's
attention for T new tokens at `position`: their K/V written into the per-layer cache at
slots position..position+T-1, then softmax(scale q.K^T) V over slots lo..p for the query
at p (lo = p + 1 - window with a sliding window, else 0; query head h reads kv head
h // groups, as `Decoder._group_q`). In eager mode it runs that math in PyTorch (on
copies: a custom op returns new tensors); in the ONNX export (`onnx_translation`) it becomes one
`com.microsoft.GroupQueryAttention` node:

    GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_seq_len)
        -> output [B, T, heads*hd], present_key, present_value [B, kv_heads, S, hd]

with seqlens_k = position + T - 1 (int32 [B]) and total_seq_len = position + T. Bound so
that present_key/present_value share past_key/past_value's memory, ONNX Runtime writes the
new K/V in place and attends only the first total_seq_len slots of the [.., S, hd] buffer
(S = max_context): no masked slots, no per-step cache copy, and the whole attention (cache
write, q.K^T, softmax, probs.V, all heads) is one kernel instead of ~17 graph nodes a layer.
This is how ONNX Runtime's own generation stack (onnxruntime-genai) runs decoder attention.

Where it applies (`unsupported`): ONNX Runtime's CPU provider in fp32 (its CUDA kernel takes
fp16/bf16 only, and no GPU was available to verify it), no ALiBi (the op has no per-head
linear bias). Rotary stays in the graph, before the op (the decoder's own rotate, so every
family's rotary variant is the reference's).
"""

from __future__ import annotations

from typing import Any

import torch

from idealrt.core.model_spec import ModelSpec, Positional

__all__ = ["gqa_step", "onnx_translation", "step_lengths", "unsupported"]


def unsupported(spec: ModelSpec, device_type: str, dtype: str) -> str | None:
    """Why fused attention cannot run this model on this device and dtype (None: it can)."""
    if device_type != "cpu":
        return (
            "it runs on ONNX Runtime's CPU provider only (the CUDA GroupQueryAttention kernel "
            "takes fp16/bf16 and is not verified here)"
        )
    if dtype != "fp32":
        return f"it runs fp32 on the CPU, not {dtype}"
    if spec.positional == Positional.ALIBI:
        return "GroupQueryAttention has no ALiBi bias"
    return None


def step_lengths(
    position: torch.Tensor, batch: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seqlens_k int32 [batch], total int32 0-d) for `tokens` new tokens at `position`
    (computed once per step graph, shared by every layer's node)."""
    total = (position + tokens).to(torch.int32)
    return (total - 1).reshape(1).expand(batch), total


@torch.library.custom_op("idealrt::gqa_step", mutates_args=())
def gqa_step(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    seqlens_k: torch.Tensor,
    total: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B, T, heads*hd], key/value [B, T, kv_heads*hd] (or both None and query the
    packed [B, T, (heads + 2 kv_heads)*hd] projection: q heads, k heads, v heads), past_k/past_v
    [B, kv_heads, S, hd] (slots < total - T valid), seqlens_k int32 [B] = total - 1 (the
    op's convention), total int32 0-d = position + T, window 0 = none: (output
    [B, T, heads*hd], present_k, present_v) with the T new slots written. `step_lengths`
    makes the two length tensors from the position."""
    b, t, _ = query.shape
    hd = past_k.shape[-1]
    pos = int(total) - t
    if key is None or value is None:
        query, key, value = query.split((num_heads * hd, kv_heads * hd, kv_heads * hd), dim=-1)
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k[:, :, pos : pos + t] = key.view(b, t, kv_heads, hd).transpose(1, 2)
    present_v[:, :, pos : pos + t] = value.view(b, t, kv_heads, hd).transpose(1, 2)
    q = query.view(b, t, num_heads, hd).transpose(1, 2)  # [B, heads, T, hd]
    groups = num_heads // kv_heads
    keys = present_k[:, :, : pos + t].repeat_interleave(groups, dim=1)
    values = present_v[:, :, : pos + t].repeat_interleave(groups, dim=1)
    scores = torch.matmul(q * scale, keys.transpose(-1, -2)).float()
    q_pos = torch.arange(pos, pos + t, device=query.device)[:, None]
    k_pos = torch.arange(pos + t, device=query.device)[None, :]
    visible = k_pos <= q_pos
    if window:
        visible = visible & (k_pos > q_pos - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1).to(query.dtype)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(b, t, num_heads * hd)
    return out, present_k, present_v


@gqa_step.register_fake
def _(
    query: torch.Tensor,
    key: Any,
    value: Any,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    seqlens_k: Any,
    total: Any,
    num_heads: int,
    *_: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = query.new_empty((query.shape[0], query.shape[1], num_heads * past_k.shape[-1]))
    return out, torch.empty_like(past_k), torch.empty_like(past_v)


def onnx_translation() -> dict[Any, Any]:
    """{gqa_step: its onnxscript translation} for `torch.onnx.export(custom_translation_table)`
    (onnx and onnxscript are imported only here: the export extra)."""
    import onnxscript
    from onnx.defs import OpSchema

    param, attr, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    schema = OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[
            param("query", "T"),
            param("key", "T"),
            param("value", "T"),
            param("past_key", "T"),
            param("past_value", "T"),
            param("seqlens_k", "M"),
            param("total_sequence_length", "M"),
        ],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("M", ["tensor(int32)"], ""),
        ],
        attributes=[
            attr("num_heads", kind.INT, ""),
            attr("kv_num_heads", kind.INT, ""),
            attr("scale", kind.FLOAT, ""),
            attr("local_window_size", kind.INT, ""),
        ],
    )
    msft = onnxscript.values.Opset("com.microsoft", 1)
    gqa = onnxscript.values.Op(msft, "GroupQueryAttention", op_schema=schema)

    def translate(
        query: Any,
        key: Any,
        value: Any,
        past_k: Any,
        past_v: Any,
        seqlens_k: Any,
        total: Any,
        num_heads: int,
        kv_heads: int,
        scale: float,
        window: int,
    ) -> Any:
        return gqa(
            query,
            key,
            value,
            past_k,
            past_v,
            seqlens_k,
            total,
            num_heads=num_heads,
            kv_num_heads=kv_heads,
            scale=scale,
            local_window_size=window if window else -1,
            _outputs=3,
        )

    return {torch.ops.idealrt.gqa_step.default: translate}
