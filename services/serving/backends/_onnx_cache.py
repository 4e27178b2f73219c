"""The exported decoder step, shared by the onnxruntime and tensorrt backends: its on-disk
export cache and the integer options both read.

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

The KV buffers that feed the step's past inputs are in `_kv_buffers`.
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

import torch

from idealrt.core.domain import StackSpec
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.logging import get_logger
from idealrt.core.model_spec import ModelSpec
from idealrt.core.reasons import OPTION_INVALID
from idealrt.services.serving.reasons import DEPENDENCY_MISSING

__all__ = [
    "CACHE_ENV",
    "CachedExport",
    "ExportKey",
    "cache_root",
    "cached_export",
    "cached_file",
    "export_decoder",
    "export_key",
    "int_option",
    "weights_identity",
]

CACHE_ENV = "IDEALRT_CACHE_DIR"
MODEL_FILE = "model.onnx"
# Sources whose change changes the exported graph or the weights it holds.
_SOURCES = (
    "idealrt.services.serving.decoder.model",
    "idealrt.services.serving.decoder.block",
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
                    DEPENDENCY_MISSING,
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
            OPTION_INVALID,
            f"option {key} must be an integer >= {lowest}, got {raw!r}",
            field="stack.options",
        )
    return value
