"""What a `model.weights_path` names, checked without loading it (and without torch).

A weights path is a checkpoint file or a Hugging Face model directory (`model.safetensors`,
sharded `model.safetensors.index.json`, `pytorch_model.bin`, sharded
`pytorch_model.bin.index.json`). `checkpoint_files` resolves it to its files and probes
each one's framing, reading headers only: a safetensors file's header must parse and every
tensor's byte range must lie inside the file (a truncated file fails here); any other file
must be a `torch.save` zip archive (what `torch.load(mmap=True)` reads; a truncated one has
lost its central directory). Errors, all InvalidArgument on field `model.weights_path`:
WEIGHTS_NOT_FOUND (nothing there, or a directory without weights), WEIGHTS_INVALID (there
but not a checkpoint: a text file, an empty file, a device or FIFO, a broken index, a
truncated or corrupt file). What the tensors hold is `weights.load_weights_`'s to check.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any

from idealrt.core.errors import InvalidArgument, invalid
from idealrt.services.serving.reasons import WEIGHTS_INVALID, WEIGHTS_NOT_FOUND
from idealrt.services.serving.validate import shown

__all__ = ["FIELD", "INDEXES", "SINGLE_FILES", "checkpoint_files", "not_a_checkpoint"]

FIELD = "model.weights_path"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header
_MAX_INDEX = 64 << 20  # an index lists tensor names; 64 MiB is ~1M of them


def not_a_checkpoint(path: str | os.PathLike[str], why: str) -> InvalidArgument:
    return invalid(FIELD, WEIGHTS_INVALID, f"{shown(str(path), 200)} is not a checkpoint: {why}")


def _stat(path: Path) -> os.stat_result:
    if "\0" in str(path):
        raise not_a_checkpoint(path, "the path contains a NUL character")
    try:
        return path.stat()
    except OSError as e:
        raise invalid(
            FIELD,
            WEIGHTS_NOT_FOUND,
            f"no file or directory at {shown(str(path), 200)} ({e.strerror})",
        ) from None


def _read(path: Path, size: int, offset: int = 0) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError as e:
        raise not_a_checkpoint(path, f"cannot be read ({e.strerror})") from None


def _probe_safetensors(path: Path, size: int) -> None:
    if size < 8:
        raise not_a_checkpoint(path, f"{size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", _read(path, 8))
    if not 2 <= n <= min(_MAX_HEADER, size - 8):
        raise not_a_checkpoint(
            path, f"its safetensors header claims {n} bytes, the file holds {size - 8}"
        )
    try:
        header = json.loads(_read(path, n, 8))
    except (UnicodeDecodeError, ValueError):
        raise not_a_checkpoint(path, "its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise not_a_checkpoint(path, "its safetensors header is not a JSON object")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise not_a_checkpoint(path, f"tensor {shown(str(name))} has no valid data_offsets")
        if offsets[1] > data:
            raise not_a_checkpoint(
                path,
                f"tensor {shown(str(name))} ends at byte {offsets[1]} of the data, which holds "
                f"{data} (a truncated file?)",
            )


def _probe_torch(path: Path) -> None:
    try:
        ok = zipfile.is_zipfile(path)
        if ok:
            with zipfile.ZipFile(path) as zf:
                ok = any(n.endswith("data.pkl") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        ok = False
    if not ok:
        raise not_a_checkpoint(
            path,
            "neither a .safetensors file nor a torch.save zip archive "
            "(or a truncated or corrupt one)",
        )


def _probe_file(path: Path) -> None:
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise not_a_checkpoint(path, "not a regular file")
    if path.suffix == ".safetensors":
        _probe_safetensors(path, st.st_size)
    else:
        _probe_torch(path)


def _index_shards(directory: Path, index: Path) -> list[Path]:
    size = _stat(index).st_size
    if size > _MAX_INDEX:
        raise not_a_checkpoint(index, f"an index of {size} bytes (at most {_MAX_INDEX})")
    try:
        doc: Any = json.loads(_read(index, size))
    except (UnicodeDecodeError, ValueError):
        raise not_a_checkpoint(index, "the index is not JSON") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise not_a_checkpoint(index, 'the index has no "weight_map" of tensor -> file')
    names = set(weight_map.values())
    for name in names:
        # shards are files beside the index, never paths elsewhere
        if not isinstance(name, str) or not name or Path(name).name != name or name in ("..", "."):
            raise not_a_checkpoint(index, f"the index names shard {shown(str(name))}")
    return [directory / n for n in sorted(names)]


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The weight files at `path` (a checkpoint file or a Hugging Face directory), each
    probed; InvalidArgument WEIGHTS_NOT_FOUND / WEIGHTS_INVALID on `model.weights_path`."""
    p = Path(path)
    st = _stat(p)
    if stat.S_ISDIR(st.st_mode):
        files = None
        for index in INDEXES:
            if (p / index).is_file():
                files = _index_shards(p, p / index)
                break
        if files is None:
            files = [p / single for single in SINGLE_FILES if (p / single).is_file()][:1]
        if not files:
            raise invalid(
                FIELD,
                WEIGHTS_NOT_FOUND,
                f"{shown(str(p), 200)} holds no {', '.join(SINGLE_FILES)} or their index",
            )
    elif stat.S_ISREG(st.st_mode):
        files = [p]
    else:
        raise not_a_checkpoint(p, "neither a regular file nor a directory")
    for f in files:
        _probe_file(f)
    return files
