"""Dense per-layer KV buffers for the exported decoder step (onnxruntime with the graph's
own attention, tensorrt).

ONNX Runtime and TensorRT take dense inputs, and a prefix view of one big
[.., max_context, hd] cache is not dense. So each layer's K and V (the step's per-layer
past inputs) live in a dense buffer of some capacity `cap` ([B, kv_heads, cap, hd],
slots >= position masked by the graph) that grows in steps of `bucket` slots; layer l
sits at a fixed, aligned offset, so binding a layer never copies and its address does
not move. Growth never stops a step for a full copy: the next, larger buffer is filled
while the current one is in use (each step writes its new token to both and copies 1/n
of the older rows), and becomes current when the current one is full. Per step: one
token written twice, ~cache/bucket bytes copied, and at most ~1.5 buckets of masked
slots attended. bucket >= max_context gives the static window (cost flat in the
context, like `Decoder.forward_static`). Memory: two buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ALIGN", "DEFAULT_BUCKET", "KVBuffers"]

DEFAULT_BUCKET = 32  # KV buffer growth, in slots (the backends' kv_bucket option)
Array = Any  # a numpy array (CPU) or a torch tensor (CUDA): both slice, reshape and assign

ALIGN = 128  # layer region alignment, in elements: >= 256 bytes in every dtype of the step


class KVBuffers:
    """Dense per-layer K and V buffers of growing capacity for one batch size (see the
    module doc).

    Layout: each of the four allocations (K and V of buffers 0 and 1) holds `layers`
    regions of `stride` elements (>= B*kv_heads*max_context*hd, a multiple of `align`); at
    capacity `cap`, layer l's K (or V) is the dense [B, kv_heads, cap, hd] at the start of
    its region, so its address never changes with the capacity and stays aligned.

    Protocol per generation: bind `prefill_outputs(p)` (dense, stacked) as new_k/new_v of
    the prompt step (with an empty past, `view(0, 0)`), then `after_prefill(p)`; for each
    decode step at `pos`, bind `past()` (per-layer lists, S = `cap`) as the step's
    past_k_*/past_v_*, run, then `store(pos, new_k, new_v)`, which returns True when
    `past()` changed (bind it again)."""

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_context: int,
        bucket: int,
        zeros: Callable[[int], Array],
        *,
        align: int = ALIGN,
        slots: int = 2,
    ) -> None:
        if bucket < 1 or max_context < 1 or align < 1:
            raise ValueError(
                f"bucket {bucket}, max_context {max_context} and align {align} must be >= 1"
            )
        self.dims = (layers, batch, kv_heads, head_dim)
        self.heads = batch * kv_heads  # rows of one layer
        self.rows = layers * self.heads
        self.max_context, self.bucket = max_context, bucket
        self.stride = -(-self.heads * max_context * head_dim // align) * align
        n = layers * self.stride
        # Four separate allocations: every layer's view starts at a multiple of `align`
        # elements from an allocation's base (TensorRT wants 256-byte aligned addresses).
        # slots=1: one static buffer (cap = max_context, never grown; fused attention)
        self._store = [(zeros(n), zeros(n)) for _ in range(slots)]
        self.current, self.cap = 0, 0
        self.next_cap, self._start, self._copied = 0, 0, 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for pair in self._store for a in pair)

    def view(self, slot: int, cap: int) -> tuple[list[Array], list[Array]]:
        """K and V of buffer `slot`: one dense [B, kv_heads, cap, hd] per layer."""
        layers, batch, kv, hd = self.dims
        m, shape = self.heads * cap * hd, (batch, kv, cap, hd)
        k, v = self._store[slot]
        offsets = [layer * self.stride for layer in range(layers)]
        return (
            [k[o : o + m].reshape(shape) for o in offsets],
            [v[o : o + m].reshape(shape) for o in offsets],
        )

    def _grid(self, slot: int, cap: int) -> tuple[Array, Array]:
        """K and V of buffer `slot` as [layers, B*kv_heads, cap, hd] (strided over the
        layer regions: one assignment reaches every layer)."""
        layers, _, _, hd = self.dims
        m, shape = self.heads * cap * hd, (layers, self.heads, cap, hd)
        k, v = self._store[slot]
        return (
            k.reshape(layers, self.stride)[:, :m].reshape(shape),
            v.reshape(layers, self.stride)[:, :m].reshape(shape),
        )

    def past(self) -> tuple[list[Array], list[Array]]:
        return self.view(self.current, self.cap)

    def prefill_outputs(self, p: int) -> tuple[Array, Array]:
        """Where the prompt step writes its new K/V: the start of buffer 1 as one dense
        [layers, B, kv_heads, p, hd] (scratch: `after_prefill` moves it to buffer 0)."""
        layers, batch, kv, hd = self.dims
        n, shape = layers * self.heads * p * hd, (layers, batch, kv, p, hd)
        k, v = self._store[1]
        return k[:n].reshape(shape), v[:n].reshape(shape)

    def first_cap(self, p: int) -> int:
        """Capacity after a p-token prompt: a bucket multiple leaving >= bucket/2 free slots
        (so the first growth is spread over that many steps)."""
        b = self.bucket
        return min(self.max_context, -(-(p + (b + 1) // 2) // b) * b)

    def after_prefill(self, p: int) -> None:
        cap = self.first_cap(p)
        layers, _, _, hd = self.dims
        src_k, src_v = self.prefill_outputs(p)
        dst_k, dst_v = self._grid(0, cap)
        dst_k[:, :, :p] = src_k.reshape(layers, self.heads, p, hd)
        dst_v[:, :, :p] = src_v.reshape(layers, self.heads, p, hd)
        self.current, self.cap = 0, cap
        self._begin_next(p)

    def _begin_next(self, valid: int) -> None:
        if self.cap >= self.max_context:
            self.next_cap = 0
            return
        self.next_cap = min(self.max_context, self.cap + self.bucket)
        self._start, self._copied = valid, 0

    def _copy_rows(self, src: tuple[Array, Array], dst: tuple[Array, Array], hi: int) -> None:
        """Rows [copied, hi) (over layers x B*kv_heads) of slots [:start], src to dst: at
        most three assignments per tensor (a partial layer, whole layers, a partial one)."""
        h, s, lo = self.heads, self._start, self._copied
        while lo < hi:
            layer, a = divmod(lo, h)
            if a == 0 and hi - lo >= h:
                end = layer + (hi - lo) // h
                for x, y in zip(src, dst, strict=True):
                    y[layer:end, :, :s] = x[layer:end, :, :s]
                lo = end * h
            else:
                b = min(h, a + hi - lo)
                for x, y in zip(src, dst, strict=True):
                    y[layer, a:b, :s] = x[layer, a:b, :s]
                lo += b - a

    def store(self, pos: int, new_k: Array, new_v: Array) -> bool:
        """Write the token at slot `pos` (new_k/new_v [layers, B, kv_heads, 1, hd]), move
        the next buffer's fill along; True when the current buffer changed."""
        layers, _, _, hd = self.dims
        shape = (layers, self.heads, 1, hd)
        nk, nv = new_k.reshape(shape), new_v.reshape(shape)
        if pos < self.cap:
            k, v = self._grid(self.current, self.cap)
            k[:, :, pos : pos + 1] = nk
            v[:, :, pos : pos + 1] = nv
        if not self.next_cap:
            return False
        other = 1 - self.current
        k2, v2 = self._grid(other, self.next_cap)
        k2[:, :, pos : pos + 1] = nk
        v2[:, :, pos : pos + 1] = nv
        # rows [copied, target) get the slots written before the fill began
        steps = self.cap - self._start + 1
        target = min(self.rows, -(-self.rows * (pos - self._start + 1) // steps))
        if target > self._copied:
            self._copy_rows(self._grid(self.current, self.cap), (k2, v2), target)
            self._copied = target
        if pos + 1 <= self.cap:
            return False
        assert self._copied == self.rows, "the next KV buffer was not filled in time"
        self.current, self.cap = other, self.next_cap
        self._begin_next(pos + 1)
        return True
