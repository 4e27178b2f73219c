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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "decode_ns",
    "decoder",
    "digest",
    "dumps",
    "encode_int64",
    "encode_ns",
    "field_types",
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
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's resolved field types (its type hints), computed once per class."""
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


def from_jsonable(tp: Any, value: Any) -> Any:
    """Rebuild a value of type `tp` from what `to_jsonable` produced (see `decoder`)."""
    return decoder(tp)(value)


Decoder = Callable[[Any], Any]


@functools.cache
def decoder(tp: Any) -> Decoder:
    """The function that rebuilds a value of type `tp` from its JSON form, built once per
    type from its hints (a profile row decodes ~50 typed values: walking `typing` per value
    per row was most of ListProfiles' time). It raises what the walk always raised, and
    when it did: TypeError or ValueError on a value that does not fit, TypeError on a
    type this module cannot decode (an unsupported union, say) only once a value of it is
    decoded."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _identity
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        optional = type(None) in args
        if len(non_none) != 1:
            return _refuse(f"unsupported union {tp}", none_ok=optional)
        return _optional(non_none[0]) if optional else decoder(non_none[0])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _homogeneous_tuple(args[0])
        return _fixed_tuple(tp, args)
    if origin is list:
        item = decoder(args[0])
        return lambda value: [item(v) for v in value]
    if origin is dict:
        key, val = decoder(args[0]), decoder(args[1])
        return lambda value: {key(k): val(v) for k, v in value.items()}
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return _dataclass(tp)
        if issubclass(tp, enum.Enum):
            return tp
        if tp is datetime:
            return _datetime
        if tp is float:
            return float
        if tp in (int, str, bool):
            return _exact(tp)
    return _refuse(f"unsupported type {tp!r}")


def _identity(value: Any) -> Any:
    return value


def _refuse(message: str, *, none_ok: bool = False) -> Decoder:
    def refuse(value: Any) -> Any:
        if none_ok and value is None:
            return None
        raise TypeError(message)

    return refuse


def _optional(tp: Any) -> Decoder:
    inner = decoder(tp)
    return lambda value: None if value is None else inner(value)


def _homogeneous_tuple(tp: Any) -> Decoder:
    item = decoder(tp)
    if tp is int:  # tuple[int, ...]: token counts, knots (a plain-int list is its own value)
        return lambda value: tuple(v if type(v) is int else item(v) for v in value)
    return lambda value: tuple(item(v) for v in value)


def _fixed_tuple(tp: Any, args: tuple[Any, ...]) -> Decoder:
    items = [decoder(a) for a in args]

    def decode(value: Any) -> tuple[Any, ...]:
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} items for {tp}, got {len(value)}")
        return tuple(f(v) for f, v in zip(items, value, strict=True))

    return decode


def _dataclass(tp: type) -> Decoder:
    """Unknown keys are ignored and missing ones take the field's default. The fields'
    decoders are built at the first value (a dataclass may refer to itself)."""
    built: list[list[tuple[str, Decoder]]] = []

    def decode(value: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}")
        if not built:
            hints = field_types(tp)
            built.append(
                [(f.name, decoder(hints[f.name])) for f in dataclasses.fields(tp) if f.init]
            )
        return tp(**{name: dec(value[name]) for name, dec in built[0] if name in value})

    return decode


def _datetime(value: Any) -> datetime:
    return to_utc(datetime.fromisoformat(value))


def _exact(tp: type) -> Decoder:
    def decode(value: Any) -> Any:
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    return decode


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


def encode_int64(steps: array[int]) -> bytes:
    """`encode_ns` of an int64 array (typecode "q"), without copying it on little-endian
    hosts."""
    if _LITTLE:
        return steps.tobytes()
    swapped = array("q", steps)  # pragma: no cover - big-endian hosts
    swapped.byteswap()  # pragma: no cover
    return swapped.tobytes()  # pragma: no cover


def decode_ns(blob: bytes) -> tuple[int, ...]:
    if len(blob) % 8:
        raise ValueError(f"decode_ns blob of {len(blob)} bytes is not a multiple of 8")
    arr = array("q")
    arr.frombytes(bytes(blob))
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return tuple(arr)
