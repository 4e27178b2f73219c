"""JSON (de)serialization of the domain dataclasses, and the compact sample encodings.

`to_jsonable` / `from_jsonable` are driven by the dataclasses' type hints, so ModelSpec,
ModelRef, StackSpec, ProfilePlan, Target, Provenance, ContentionObservation, FitQuality and
CostModel all round-trip exactly (tuples stay tuples, enums come back as enums, datetimes as
tz-aware UTC). Unknown keys in stored JSON are ignored and missing keys take the field's
default, so a row written before a field was added or removed still loads.

Floats go through `json` with NaN/Infinity allowed (Python writes and reads them); that is
why payloads are stored as TEXT, not as PostgreSQL JSON, which would reject them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import sys
import types
import typing
from array import array
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "decode_ns",
    "digest",
    "dumps",
    "encode_ns",
    "from_jsonable",
    "loads",
    "to_jsonable",
    "to_utc",
]


def to_utc(value: datetime) -> datetime:
    """An aware datetime converted to UTC. Naive datetimes are refused by validation before
    they get here; reading them back (SQLite stores no offset) they are UTC by construction."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for a domain value (dataclass, enum, tuple, dict, datetime, ...)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return to_utc(value).isoformat()
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot serialize {type(value).__name__}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


def from_jsonable(tp: Any, value: Any) -> Any:
    """Rebuild a value of type `tp` from what `to_jsonable` produced."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"unsupported union {tp}")
        return from_jsonable(non_none[0], value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} items for {tp}, got {len(value)}")
        return tuple(from_jsonable(a, v) for a, v in zip(args, value, strict=True))
    if origin is list:
        return [from_jsonable(args[0], v) for v in value]
    if origin is dict:
        return {from_jsonable(args[0], k): from_jsonable(args[1], v) for k, v in value.items()}
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise TypeError(f"expected an object for {tp.__name__}")
            hints = _hints(tp)
            kwargs = {
                f.name: from_jsonable(hints[f.name], value[f.name])
                for f in dataclasses.fields(tp)
                if f.init and f.name in value
            }
            return tp(**kwargs)
        if issubclass(tp, enum.Enum):
            return tp(value)
        if tp is datetime:
            return to_utc(datetime.fromisoformat(value))
        if tp is float:
            return float(value)
        if tp in (int, str, bool):
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
            return value
    raise TypeError(f"unsupported type {tp!r}")


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON of a domain value (stable: equal values, equal text)."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"))


def loads(tp: Any, text: str) -> Any:
    return from_jsonable(tp, json.loads(text))


def digest(value: Any) -> str:
    """sha256 of the canonical JSON: compares request bodies of idempotent writes."""
    return hashlib.sha256(dumps(value).encode()).hexdigest()


# Decode steps: int64 little-endian, 8 bytes a step (a 2,000-token sample is 16 KB).
_LITTLE = sys.byteorder == "little"


def encode_ns(values: Sequence[int]) -> bytes:
    arr = array("q", values)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def decode_ns(blob: bytes) -> tuple[int, ...]:
    if len(blob) % 8:
        raise ValueError(f"decode_ns blob of {len(blob)} bytes is not a multiple of 8")
    arr = array("q")
    arr.frombytes(bytes(blob))
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return tuple(arr)
