"""The exported decoder step, shared by the onnxruntime and tensorrt backends: its on-disk
export cache, and the KV buffers that feed the step's past inputs.

Export cache
    `<root>/onnx/<key>/model.onnx` (+ `model.onnx.data`, `meta.json`), root =
    $IDEALRT_CACHE_DIR or ~/.cache/idealrt. The key is the sha256 of `ExportKey`: the spec's
    shape hash, dtype, weights identity (seed and the device type that drew it, or the
    weight files' path/size/mtime), torch, exporter (onnxscript, onnx) and opset versions,
    and a hash of the decoder's source files (a change to the math is a new graph).
    The graph is exported from a decoder built with `max_context = spec.max_positions`, so
    one file serves every max_context. Writes are atomic: the export goes to a private
    temporary directory beside the entry, is fsynced, and the directory is renamed into
    place, so an entry exists completely or not at all. A per-key `flock` makes concurrent
    exporters of one key wait (blocked, not polling) for the first; if two still race (no
    flock, e.g. some network filesystems), the loser's rename fails and it uses the
    winner's entry. `cached_file` keeps derived single-file artifacts (TensorRT engines)
    with the same discipline.

KV buffers (`KVBuffers`)
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

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from idealrt.core.domain import StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.logging import get_logger
from idealrt.core.model_spec import ModelSpec

__all__ = [
    "ALIGN",
    "CACHE_ENV",
    "DEFAULT_BUCKET",
    "CachedExport",
    "ExportKey",
    "KVBuffers",
    "cache_root",
    "cached_export",
    "cached_file",
    "export_decoder",
    "export_key",
    "int_option",
    "weights_identity",
]

CACHE_ENV = "IDEALRT_CACHE_DIR"
DEFAULT_BUCKET = 32  # KV buffer growth, in slots (the backends' kv_bucket option)
MODEL_FILE = "model.onnx"
# Sources whose change changes the exported graph or the weights it holds.
_SOURCES = (
    "idealrt.services.serving.decoder.model",
    "idealrt.services.serving.decoder._ops",
    "idealrt.services.serving.decoder.export",
    "idealrt.services.serving.decoder.fused_attention",
    "idealrt.services.serving.decoder.build",
    "idealrt.services.serving.weights",
)
_log = get_logger(__name__)


def cache_root(environ: dict[str, str] | None = None) -> Path:
    """$IDEALRT_CACHE_DIR, else ~/.cache/idealrt (ONNX exports go under <root>/onnx)."""
    env = os.environ if environ is None else environ
    return Path(env.get(CACHE_ENV) or Path.home() / ".cache" / "idealrt")


@dataclasses.dataclass(frozen=True)
class ExportKey:
    spec_hash: str
    dtype: str
    weights: str
    torch: str
    exporter: str
    opset: str
    code: str
    graph: str = "plain"  # "fused-attention": the onnxruntime CPU flavour (`fused_attention`)

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return "absent"


def _code_hash() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        module = importlib.import_module(name)
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()[:16]


def weights_identity(weights_path: str, seed: int, init_device: str) -> str:
    """What the weights are: "seed:S@cpu" (seeded init draws differ by device type) or the
    resolved path with each weight file's name, size and mtime (a stat, not a content hash:
    hashing gigabytes on every load would cost more than the export it saves)."""
    if not weights_path:
        return f"seed:{seed}@{init_device}"
    path = Path(weights_path).resolve()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"files:{path}:{h.hexdigest()[:16]}"


def export_key(spec: ModelSpec, dtype: str, weights: str, *, fused: bool = False) -> ExportKey:
    from torch.onnx import _constants  # the exporter's default opset

    exporter = f"onnxscript {_version('onnxscript')}, onnx {_version('onnx')}"
    opset = str(getattr(_constants, "ONNX_DEFAULT_OPSET", "default"))
    return ExportKey(
        spec.spec_hash(),
        dtype,
        weights,
        torch.__version__,
        exporter,
        opset,
        _code_hash(),
        "fused-attention" if fused else "plain",
    )


@dataclasses.dataclass(frozen=True)
class CachedExport:
    path: Path  # the model.onnx file
    key: ExportKey
    hit: bool  # False when this call exported it
    export_ns: int  # 0 on a hit


@contextlib.contextmanager
def _key_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps entries whole
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks in the kernel; no polling
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _sync_dir(path)


def cached_export(root: Path, key: ExportKey, export: Callable[[Path], None]) -> CachedExport:
    """The entry of `key` under root/onnx, calling `export(model_path)` only when absent."""
    base = root / "onnx"
    base.mkdir(parents=True, exist_ok=True)
    digest = key.digest()
    entry = base / digest
    if (entry / MODEL_FILE).is_file():
        return CachedExport(entry / MODEL_FILE, key, True, 0)
    with _key_lock(base / f"{digest}.lock"):
        if (entry / MODEL_FILE).is_file():  # another process exported it while we waited
            return CachedExport(entry / MODEL_FILE, key, True, 0)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=base))
        try:
            t0 = time.perf_counter_ns()
            export(tmp / MODEL_FILE)
            export_ns = time.perf_counter_ns() - t0
            meta = {**dataclasses.asdict(key), "export_ns": export_ns}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            _fsync_tree(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp made it private; entries are readable like files
            try:
                os.rename(tmp, entry)
            except OSError:
                if not (entry / MODEL_FILE).is_file():
                    raise
                _log.info("onnx_export_raced", key=digest)  # the winner's entry stands
                return CachedExport(entry / MODEL_FILE, key, True, 0)
            _sync_dir(base)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _log.info("onnx_exported", key=digest, export_ms=export_ns // 1_000_000, path=str(entry))
    return CachedExport(entry / MODEL_FILE, key, False, export_ns)


def cached_file(path: Path, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """(the bytes at `path`, True), or (make(), False) after writing them there atomically
    (temporary file, fsync, rename) while holding the path's lock."""
    if path.is_file():
        return path.read_bytes(), True
    path.parent.mkdir(parents=True, exist_ok=True)
    with _key_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            return path.read_bytes(), True
        data = make()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _sync_dir(path.parent)
    return data, False


def export_decoder(
    spec: ModelSpec,
    dtype: str,
    *,
    seed: int,
    weights_path: str,
    init_device: torch.device,
    root: Path,
    fused: bool = False,
) -> CachedExport:
    """The cached ONNX step of the decoder that `build_decoder(spec, dtype, seed or
    weights_path)` makes on `init_device` (seeded weights are drawn there, as the pytorch
    backend draws them, then moved to the CPU for the export)."""
    from idealrt.services.serving.decoder import build_decoder, export_onnx, torch_dtype

    device = torch.device("cpu") if weights_path else init_device
    key = export_key(spec, dtype, weights_identity(weights_path, seed, device.type), fused=fused)

    def export(path: Path) -> None:
        for module in ("onnx", "onnxscript"):
            if importlib.util.find_spec(module) is None:
                raise FailedPrecondition(
                    "DEPENDENCY_MISSING",
                    f"exporting the decoder to ONNX needs {module!r}: pip install idealrt[onnx]",
                )
        decoder = build_decoder(
            spec,
            dtype=torch_dtype(dtype),
            device=device,
            max_context=spec.max_positions,
            seed=seed,
            weights_path=weights_path,
        ).cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        export_onnx(decoder, path, fused=fused)

    return cached_export(root, key, export)


def int_option(stack: StackSpec, key: str, default: int, lowest: int) -> int:
    """Integer option `key` of the stack (`default` when absent), InvalidArgument
    OPTION_INVALID below `lowest` or when not an integer."""
    raw = stack.options.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lowest - 1
    if value < lowest:
        raise InvalidArgument(
            "OPTION_INVALID",
            f"option {key} must be an integer >= {lowest}, got {raw!r}",
            field="stack.options",
        )
    return value


# ---- KV buffers -------------------------------------------------------------------------
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
