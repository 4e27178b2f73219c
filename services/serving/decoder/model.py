"""The reference decoder: one nn.Module for every supported family, built from a ModelSpec.

Families differ only in a few switches read from the spec (norm, activation, positional
scheme, biases, parallel block, shared norm, embedding norm); the math of each matches the
Hugging Face implementation (tested to 1e-4 relative in fp32, tests/unit/serving).

Weights: matrices are [in, out] (x @ W; see Block); the LM head is `head_w` [d, vocab] and a
tied model reads its token embeddings from the head's columns (one copy, as in HF).

KV cache: one preallocated tensor [layers, 2, batch, kv_heads, max_context, head_dim]
(`Decoder.new_cache`), K at [:, 0] and V at [:, 1]; new entries are written in place, never
concatenated. A sliding window (Mistral) is applied by masking and by attending only the last
`window` slots; the cache still holds max_context positions (no ring buffer), so its bytes
can exceed `ModelSpec.kv_cache_bytes` (which caps at the window) when max_context > window.
Three entry points share the weights:

- `forward(ids, cache, past_len: int)`: eager prefill (past_len 0) and decode (T=1); attends
  to the cache prefix [.., :past_len+T] with `scaled_dot_product_attention`. The fast path.
- `forward_static(ids, cache, position: Tensor)`: same cache, in place, but every shape is
  static: attends over the whole max_context window with a mask built from the 0-d int64
  `position` tensor. For CUDA graphs and torch.compile (no recompiles, no host sync).
- `forward_with_cache(ids, past_k, past_v, position)`: functional (no mutation), for ONNX
  export; see `idealrt.services.serving.decoder.export`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from idealrt.core.model_spec import ModelSpec, Norm, Positional
from idealrt.services.serving.decoder import _ops
from idealrt.services.serving.decoder.block import Block, NativeOps, param

__all__ = ["Decoder"]

_NEG_INF = float("-inf")


def _aten_linear(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x2, w) if b is None else torch.addmm(b, x2, w)


class Decoder(nn.Module):
    """A decoder-only transformer of `spec`'s shape. Parameters are created uninitialised:
    use `idealrt.services.serving.decoder.build_decoder` (seeded init or loaded weights)."""

    positions: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    alibi_slopes: torch.Tensor

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype, max_context: int = 0) -> None:
        super().__init__()
        max_context = max_context or spec.max_positions
        if max_context < 1 or max_context > spec.max_positions:
            raise ValueError(f"max_context must be in 1..{spec.max_positions}, got {max_context}")
        self.spec = spec
        self.dtype = dtype
        self.max_context = max_context
        self.heads = spec.heads
        self.kv_heads = spec.kv_heads_effective
        self.groups = spec.heads // self.kv_heads
        self.head_dim = spec.head_dim
        self.window = spec.sliding_window
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self._layernorm = spec.norm == Norm.LAYERNORM
        self._rotary = spec.positional == Positional.ROTARY
        self._alibi = spec.positional == Positional.ALIBI
        self._interleaved = spec.family == "gptj"  # GPT-J rotates pairs; NeoX/Llama halves
        self._rot_dim = int(self.head_dim * spec.rotary_pct) if self._rotary else 0
        self._rot_dim -= self._rot_dim % 2
        self._pos_offset = 2 if spec.positional == Positional.LEARNED_OFFSET else 0
        self._parallel = spec.parallel_attention
        self._shared_norm = spec.shared_norm_effective

        d, opt = spec.d_model, {"dtype": dtype}
        # The LM head is [d, vocab]; a tied model looks its token embeddings up in the
        # head's columns, an untied one has its own [vocab, d] table.
        self.head_w = param(d, spec.vocab, **opt)
        self.embed = None if spec.tied_embeddings else param(spec.vocab, d, **opt)
        rows = {
            Positional.LEARNED: spec.max_positions,
            Positional.LEARNED_OFFSET: spec.max_positions + 2,
        }
        self.pos_embed = param(rows[spec.positional], d, **opt) if spec.positional in rows else None
        embed_norm = spec.embedding_norm_effective
        self.embed_norm_w = param(d, **opt) if embed_norm else None
        self.embed_norm_b = param(d, **opt) if embed_norm and self._layernorm else None
        self.layers = nn.ModuleList(Block(spec, dtype) for _ in range(spec.layers))
        # The same modules, typed for the per-layer loops.
        self._blocks: list[Block] = [b for b in self.layers if isinstance(b, Block)]
        self.final_norm_w = param(d, **opt)
        self.final_norm_b = param(d, **opt) if self._layernorm else None
        self.head_b = param(spec.vocab, **opt) if spec.lm_head_bias_effective else None
        self._native: NativeOps | None = None
        self.reset_buffers()

    def use_native(self, ops: NativeOps | None) -> None:
        """Route the batch-1, single-token work of the eager `forward` (a decode step) to
        `ops`: its products x [1, in] @ W, and (fp32) each layer's attention from the qkv
        row: rotary, cache write, ALiBi, sliding window, grouped heads. None restores ATen.
        Never used while tracing, compiling or exporting (those see ATen ops only), nor by
        `forward_static` / `forward_with_cache`."""
        self._native = ops

    def _native_now(self, rows: int) -> NativeOps | None:
        ops = self._native
        if ops is None or rows != 1 or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        return ops

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x [.., in] @ w [in, out] (+ b), as one product over the flattened rows."""
        if x.dim() == 2:  # rows already (the fused ONNX step): no reshapes to export
            ops = self._native_now(x.shape[0])
            return _aten_linear(x, w, b) if ops is None else ops(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])
        ops = self._native_now(x2.shape[0])
        y = _aten_linear(x2, w, b) if ops is None else ops(x2, w, b)
        return y.view(*x.shape[:-1], w.shape[1])

    # ---- buffers (derived, never saved) ----
    def reset_buffers(self) -> None:
        """(Re)compute rotary tables, ALiBi slopes and position indices on the parameters'
        device. Call after `to_empty()` (the builder does)."""
        device = self.head_w.device
        n = self.max_context
        self.register_buffer("positions", torch.arange(n, device=device), persistent=False)
        if self._rotary:
            cos, sin = _ops.rotary_tables(
                n,
                self._rot_dim,
                self.spec.rotary_base,
                interleaved=self._interleaved,
                device=device,
            )
            self.register_buffer("rope_cos", cos.to(self.dtype), persistent=False)
            self.register_buffer("rope_sin", sin.to(self.dtype), persistent=False)
        if self._alibi:
            slopes = _ops.alibi_slopes(self.heads).to(device).view(self.heads, 1, 1)
            self.register_buffer("alibi_slopes", slopes, persistent=False)

    def new_cache(self, batch_size: int = 1) -> torch.Tensor:
        """A zeroed KV cache [layers, 2, batch, kv_heads, max_context, head_dim]."""
        shape = (self.spec.layers, 2, batch_size, self.kv_heads, self.max_context, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.head_w.device)

    # ---- shared pieces ----
    def _norm(
        self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None
    ) -> torch.Tensor:
        assert w is not None
        if self._layernorm:
            return F.layer_norm(x, (x.shape[-1],), w, b, self.spec.norm_eps)
        return _ops.rms_norm(x, w, self.spec.norm_eps)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = _ops.rotate_interleaved if self._interleaved else _ops.rotate_half
        r = self._rot_dim
        if r == self.head_dim:
            return x * cos + rot(x) * sin
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + rot(x_rot) * sin, x_pass), dim=-1)

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor | slice) -> torch.Tensor:
        if self.embed is not None:
            x = F.embedding(ids, self.embed)
        else:
            x = self.head_w.index_select(1, ids.reshape(-1)).t().reshape(*ids.shape, -1)
        if self.pos_embed is not None:
            if isinstance(pos, slice):
                off = self._pos_offset
                x = x + self.pos_embed[pos.start + off : pos.stop + off]
            else:
                x = x + F.embedding(pos + self._pos_offset, self.pos_embed)
        if self.embed_norm_w is not None:
            x = self._norm(x, self.embed_norm_w, self.embed_norm_b)
        return x

    def _qkv(
        self, blk: Block, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, heads, T, hd], k and v [B, kv_heads, T, hd], rotary applied."""
        b, t, _ = h.shape
        qkv = self._linear(h, blk.qkv_w, blk.qkv_b)
        qkv = qkv.view(b, t, -1, self.head_dim).transpose(1, 2)
        q = qkv[:, : self.heads]
        k = qkv[:, self.heads : self.heads + self.kv_heads]
        v = qkv[:, self.heads + self.kv_heads :]
        if rope is not None:
            q, k = self._rotate(q, *rope), self._rotate(k, *rope)
        return q, k, v

    def _attn_out(self, blk: Block, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self._linear(o.transpose(1, 2).reshape(b, t, -1), blk.o_w, blk.o_b)

    def _residual(
        self, blk: Block, x: torch.Tensor, h: torch.Tensor, attn: torch.Tensor
    ) -> torch.Tensor:
        """x + attention, then the MLP: sequential, parallel with a shared norm (GPT-J) or
        parallel with its own norm (GPT-NeoX)."""
        if not self._parallel:
            x = x + attn
            return x + self._mlp(blk, self._norm(x, blk.mlp_norm_w, blk.mlp_norm_b))
        mlp_in = h if self._shared_norm else self._norm(x, blk.mlp_norm_w, blk.mlp_norm_b)
        return x + attn + self._mlp(blk, mlp_in)

    def _mlp(self, blk: Block, h: torch.Tensor) -> torch.Tensor:
        up = _ops.activation(self.spec.activation, self._linear(h, blk.up_w, blk.up_b))
        return self._linear(up, blk.down_w, blk.down_b)

    def _logits(self, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        if last_only:
            x = x[:, -1:]
        x = self._norm(x, self.final_norm_w, self.final_norm_b)
        return self._linear(x, self.head_w, self.head_b)

    def _grouped(self, bias: torch.Tensor) -> torch.Tensor:
        """A [1 or heads, T, K] additive bias in the grouped-query layout [.., G*T, K] that
        `_group_q` produces (query head h = kv_head * G + g, as HF's repeat_kv)."""
        if self.groups == 1:
            return bias
        if bias.shape[0] == 1:
            return bias.repeat(1, self.groups, 1)
        return bias.reshape(self.kv_heads, -1, bias.shape[-1])

    def _group_q(self, q: torch.Tensor) -> torch.Tensor:
        b, _, t, d = q.shape
        return q if self.groups == 1 else q.reshape(b, self.kv_heads, self.groups * t, d)

    def _bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        """Additive fp32 bias [1 or heads, T, K]: 0 where key k_pos[j] is visible to query
        q_pos[i] (k <= limit[i], within the sliding window), -inf elsewhere; plus ALiBi."""
        ok = k_pos[None, :] <= limit[:, None]
        if self.window:
            ok = ok & (k_pos[None, :] > q_pos[:, None] - self.window)
        zero = torch.zeros((), dtype=torch.float32, device=q_pos.device)
        bias = torch.where(ok, zero, _NEG_INF)[None]
        if self._alibi:
            bias = bias + self.alibi_slopes * k_pos.float()
        return bias

    # ---- eager: cache prefix, python past_len ----
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: torch.Tensor,
        past_len: int,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T (1 if last_only), vocab] for input_ids [B, T] at positions
        past_len..past_len+T-1; writes their K/V into `cache` in place."""
        t = input_ids.shape[1]
        start, end = past_len, past_len + t
        if end > self.max_context:
            raise ValueError(f"positions up to {end} exceed max_context {self.max_context}")
        x = self._embed(input_ids, slice(start, end))
        rope = (self.rope_cos[start:end], self.rope_sin[start:end]) if self._rotary else None
        lo = max(0, start + 1 - self.window) if self.window else 0
        mask: torch.Tensor | None = None
        causal = False
        if self._alibi or (t > 1 and (start > 0 or self.groups > 1 or lo > 0)):
            q_pos, k_pos = self.positions[start:end], self.positions[lo:end]
            mask = self._grouped(self._bias(q_pos, k_pos, q_pos)).to(self.dtype)
        elif t > 1:
            causal = True
        native = self._native_now(input_ids.numel()) if self.dtype == torch.float32 else None
        rope_row = (self.rope_cos[start], self.rope_sin[start]) if rope and native else None
        for i, blk in enumerate(self._blocks):
            kc, vc = cache[i, 0], cache[i, 1]
            h = self._norm(x, blk.attn_norm_w, blk.attn_norm_b)
            if native is not None:  # batch 1, one token: qkv -> cache + attention in one call
                o = native.attend_step(
                    self._linear(h, blk.qkv_w, blk.qkv_b),
                    kc,
                    vc,
                    start,
                    lo,
                    self.scale,
                    heads=self.heads,
                    rope=rope_row,
                    interleaved=self._interleaved,
                    alibi=self.alibi_slopes if self._alibi else None,
                )
                x = self._residual(blk, x, h, self._linear(o, blk.o_w, blk.o_b))
                continue
            q, k, v = self._qkv(blk, h, rope)
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            o = F.scaled_dot_product_attention(
                self._group_q(q),
                kc[:, :, lo:end],
                vc[:, :, lo:end],
                attn_mask=mask,
                is_causal=causal,
            )
            x = self._residual(blk, x, h, self._attn_out(blk, o.reshape(q.shape)))
        return self._logits(x, last_only)

    # ---- static window: in-place, tensor position (CUDA graphs, torch.compile) ----
    def forward_static(
        self,
        input_ids: torch.Tensor,
        cache: torch.Tensor,
        position: torch.Tensor,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """As `forward`, with past_len given as a 0-d int64 tensor on the model's device and
        attention over the whole max_context window (masked): every shape is static."""
        t = input_ids.shape[1]
        q_pos = position + self.positions[:t]
        x = self._embed(input_ids, q_pos)
        rope = (self.rope_cos[q_pos], self.rope_sin[q_pos]) if self._rotary else None
        mask = self._grouped(self._bias(q_pos, self.positions, q_pos)).to(self.dtype)
        for i, blk in enumerate(self._blocks):
            kc, vc = cache[i, 0], cache[i, 1]
            h = self._norm(x, blk.attn_norm_w, blk.attn_norm_b)
            q, k, v = self._qkv(blk, h, rope)
            kc.index_copy_(2, q_pos, k)
            vc.index_copy_(2, q_pos, v)
            o = F.scaled_dot_product_attention(self._group_q(q), kc, vc, attn_mask=mask)
            x = self._residual(blk, x, h, self._attn_out(blk, o.reshape(q.shape)))
        return self._logits(x, last_only)

    # ---- functional: ONNX export ----
    def forward_with_cache(
        self,
        input_ids: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        position: torch.Tensor,
        *,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Functional step: (logits [B, T', vocab], new_k, new_v [layers, B, kv_heads, T, hd]).

        past_k/past_v [layers, B, kv_heads, S, hd] are read only: keys at slot j < position
        are attended, the rest masked, so S may be the static max_context buffer or exactly
        the past length. The caller writes new_k/new_v at slots position..position+T-1.
        Attention is split (past block, new block, one softmax over both), so no cache copy
        happens inside the graph.
        """
        t = input_ids.shape[1]
        s = past_k.shape[3]
        q_pos = position + torch.arange(t, device=input_ids.device)
        k_pos = torch.arange(s, device=input_ids.device)
        x = self._embed(input_ids, q_pos)
        rope = (self.rope_cos[q_pos], self.rope_sin[q_pos]) if self._rotary else None
        past_bias = self._grouped(self._bias(q_pos, k_pos, (position - 1).expand(t)))
        new_bias = self._grouped(self._bias(q_pos, q_pos, q_pos))
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        for i, blk in enumerate(self._blocks):
            h = self._norm(x, blk.attn_norm_w, blk.attn_norm_b)
            q, k, v = self._qkv(blk, h, rope)
            qg = self._group_q(q) * self.scale
            scores = torch.cat(
                (
                    torch.matmul(qg, past_k[i].transpose(-1, -2)).float() + past_bias,
                    torch.matmul(qg, k.transpose(-1, -2)).float() + new_bias,
                ),
                dim=-1,
            )
            probs = scores.softmax(dim=-1).to(q.dtype)
            o = torch.matmul(probs[..., :s], past_v[i]) + torch.matmul(probs[..., s:], v)
            x = self._residual(blk, x, h, self._attn_out(blk, o.reshape(q.shape)))
            new_k.append(k)
            new_v.append(v)
        return self._logits(x, last_only), torch.stack(new_k), torch.stack(new_v)
