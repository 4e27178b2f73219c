"""Input checks for the store: everything is validated before a transaction writes, so bad
input is an InvalidArgument naming its field and never a half-written or unreadable row.
Valid input comes back normalized (plain ints, tuples, UTC datetimes)."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from types import NoneType
from typing import Any

import numpy as np

from idealrt.core import paging
from idealrt.core.costmodel import validate as costmodel_validate
from idealrt.core.domain import (
    ContentionColumns,
    ContentionObservation,
    CostModel,
    ModelRef,
    Placement,
    Profile,
    ProfilePlan,
    ProfileState,
    Provenance,
    Sample,
    SampleBatch,
    SampleFlag,
    SampleTiming,
    StackSpec,
    Target,
)
from idealrt.core.errors import invalid
from idealrt.core.model_spec import ModelSpec
from idealrt.core.namespaces import check_namespace
from idealrt.core.reasons import TIMESTAMP_INVALID
from idealrt.services.store import _serde
from idealrt.services.store.reasons import (
    ID_INVALID,
    VALUE_INVALID,
    VALUE_OUT_OF_RANGE,
)
from idealrt.services.store.schema import ID_LEN, NAME_LEN, REQUEST_ID_LEN

__all__ = [
    "check_cost_model",
    "check_id",
    "check_namespaces",
    "check_profile",
    "check_request_id",
    "check_sample_batch",
    "check_samples",
    "check_seq_cursor",
    "check_state",
]

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# Tokens this store issues are a few hundred characters (kind, a filter of at most ID_LEN,
# a time and an id); a longer one is not ours, and is refused before it is decoded, so a
# hostile token cannot nest deep enough to exhaust the JSON parser's recursion.
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1
_INT_ONLY = frozenset({int})  # the types of a sequence of plain ints (no bools, no numpy)
_BOOL_ONLY = frozenset({bool})
_EXACTLY: dict[Any, frozenset[type]] = {
    float: frozenset({float}),
    int: _INT_ONLY,
    str: frozenset({str}),
}
_FLAG_ONLY = frozenset({SampleFlag})
_TIMING_ONLY = frozenset({SampleTiming})
# A Kubernetes label value (what a placement's fields are matched against), when not empty.
_LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE_LEN = 63
_QUEUE_POSITION_MAX = 1_000_000


def check_id(value: object, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise invalid(field, ID_INVALID, f"{field} must be a string, got {type(value).__name__}")
    if value == "" and allow_empty:
        return value
    if len(value) > ID_LEN or not _ID_RE.fullmatch(value):
        raise invalid(
            field,
            ID_INVALID,
            f"{field} must be 1-{ID_LEN} characters of [A-Za-z0-9_.-], got {value[:80]!r}",
        )
    return value


def check_request_id(
    value: object,
    field: str = "request_id",
    *,
    allow_empty: bool = True,
    reason: str = "REQUEST_ID_INVALID",
) -> str:
    if (
        not isinstance(value, str)
        or len(value) > REQUEST_ID_LEN
        or not value.isprintable()
        or (not value and not allow_empty)
    ):
        empty = "" if allow_empty else "non-empty "
        raise invalid(
            field,
            reason,
            f"{field} must be a {empty}printable string of at most {REQUEST_ID_LEN} characters",
        )
    return value


def check_seq_cursor(cursor: list[Any]) -> int:
    """The cursor of a samples page: one int64 sequence number >= 0."""
    if (
        len(cursor) != 1
        or isinstance(cursor[0], bool)
        or not isinstance(cursor[0], int)
        or not 0 <= cursor[0] <= _INT64_MAX
    ):
        raise paging.invalid_token()
    return cursor[0]


def _int(value: object, field: str, lo: int = 0, hi: int = _INT64_MAX) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise invalid(field, VALUE_INVALID, f"{field} must be an integer") from None
    if not lo <= number <= hi:
        raise invalid(field, VALUE_OUT_OF_RANGE, f"{field} must be in [{lo}, {hi}], got {number}")
    return number


def _time(value: object, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise invalid(field, TIMESTAMP_INVALID, f"{field} must be a timezone-aware datetime (UTC)")
    return _serde.to_utc(value)


def _text(value: object, field: str, max_len: int | None = None) -> str:
    if not isinstance(value, str) or (max_len is not None and len(value) > max_len):
        limit = f" of at most {max_len} characters" if max_len else ""
        raise invalid(field, VALUE_INVALID, f"{field} must be a string{limit}")
    return value


def _nonempty(value: str, field: str) -> str:
    if not value:
        raise invalid(field, VALUE_INVALID, f"{field} must not be empty")
    return value


def _roundtrip(tp: Any, value: object, field: str) -> Any:
    """The value as the store will read it back; refuses what would not load."""
    try:
        return _serde.from_jsonable(tp, _serde.to_jsonable(value))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise invalid(field, VALUE_INVALID, f"{field} is malformed: {exc}") from None


def check_state(value: object, field: str = "state") -> ProfileState:
    try:
        return ProfileState(str(value))
    except ValueError:
        raise invalid(
            field,
            VALUE_INVALID,
            f"{field} must be one of {[s.value for s in ProfileState]}, got {value!r}",
        ) from None


def check_namespaces(namespaces: object) -> frozenset[str] | None:
    """A visibility set given to a Store method: None (every namespace) or a set of valid
    namespaces (empty: none at all)."""
    if namespaces is None:
        return None
    if not isinstance(namespaces, frozenset | set):
        raise invalid("namespaces", VALUE_INVALID, "namespaces must be a set of namespaces or None")
    return frozenset(check_namespace(n, "namespaces") for n in namespaces)


def _label_value(value: str, field: str) -> str:
    if value and (len(value) > _LABEL_VALUE_LEN or not _LABEL_VALUE_RE.fullmatch(value)):
        raise invalid(
            field,
            VALUE_INVALID,
            f"{field} must be empty or a Kubernetes label value: at most {_LABEL_VALUE_LEN} "
            f"characters of [A-Za-z0-9_.-], beginning and ending with [A-Za-z0-9], "
            f"got {value[:80]!r}",
        )
    return value


def _placement(value: object, field: str = "placement") -> Placement:
    placement: Placement = _roundtrip(Placement, value, field)
    _label_value(placement.gpu_product, f"{field}.gpu_product")
    _label_value(placement.node_pool, f"{field}.node_pool")
    return placement


def check_profile(p: object) -> Profile:
    if not isinstance(p, Profile):
        raise invalid("profile", VALUE_INVALID, "profile must be a Profile")
    return dataclasses.replace(
        p,
        id=check_id(p.id, "id", allow_empty=True),
        request_id=check_request_id(p.request_id),
        state=check_state(p.state),
        model=_roundtrip(ModelRef, p.model, "model"),
        stack=_roundtrip(StackSpec, p.stack, "stack"),
        plan=_roundtrip(ProfilePlan, p.plan, "plan"),
        target=_roundtrip(Target, p.target, "target"),
        provenance=_roundtrip(Provenance, p.provenance, "provenance"),
        model_spec=_roundtrip(ModelSpec | None, p.model_spec, "model_spec"),
        create_time=_time(p.create_time, "create_time"),
        start_time=_time(p.start_time, "start_time"),
        end_time=_time(p.end_time, "end_time"),
        completed_samples=_int(p.completed_samples, "completed_samples"),
        total_samples=_int(p.total_samples, "total_samples"),
        error=_text(p.error, "error"),
        namespace=check_namespace(p.namespace, "namespace"),
        placement=_placement(p.placement),
        queue_position=_int(p.queue_position, "queue_position", 0, _QUEUE_POSITION_MAX),
    )


def _decode_steps(value: object, field: str) -> tuple[int, ...]:
    if (  # the common case: a tuple of plain ints in range, normalized already
        type(value) is tuple
        and set(map(type, value)) <= _INT_ONLY
        and (not value or (min(value) >= 0 and max(value) <= _INT64_MAX))
    ):
        return value
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise invalid(field, VALUE_INVALID, f"{field} must be a sequence of integers")
    try:
        steps = array("q", value)
    except (TypeError, OverflowError):
        raise invalid(field, VALUE_INVALID, f"{field} must be int64 nanoseconds") from None
    if steps and min(steps) < 0:
        raise invalid(field, VALUE_OUT_OF_RANGE, f"{field} must be >= 0")
    return tuple(steps)


# A sample's integer fields: (name, lowest, highest).
_SAMPLE_INTS = (
    ("prompt_tokens", 0, _INT32_MAX),
    ("output_tokens", 0, _INT32_MAX),
    ("prefill_ns", 0, _INT64_MAX),
    ("total_ns", 0, _INT64_MAX),
    ("batch_size", 1, _INT32_MAX),
    ("rpc_ns", 0, _INT64_MAX),
    ("repeat", -_INT32_MAX, _INT32_MAX),
    ("chunks", 0, _INT32_MAX),
)
# ContentionObservation's fields and their exact types (float, int or str).
_CONTENTION_TYPES = tuple(
    (f.name, _serde.field_types(ContentionObservation)[f.name])
    for f in dataclasses.fields(ContentionObservation)
)
_CONTENTION_FLOATS = ("foreign_cpu_s", "sm_clock_mhz", "temperature_c", "energy_j")


def _contention(value: object, f: str) -> ContentionObservation:
    """The fast path of `_roundtrip` for the common case, a ContentionObservation whose
    fields already have their exact types (what the round trip would return, equal, and
    it is frozen); anything else takes the round trip (normalizes or refuses)."""
    if type(value) is ContentionObservation and all(
        type(getattr(value, name)) is tp for name, tp in _CONTENTION_TYPES
    ):
        return value
    checked: ContentionObservation = _roundtrip(ContentionObservation, value, f"{f}.contention")
    return checked


def _sample(s: object, f: str) -> Sample:
    """A valid sample normalized: `s` itself when it already is (the common case: samples
    converted from protobuf), else a new one with seq -1. Its seq is not checked (the
    store assigns seqs; a caller ignores it). Hot (every appended sample): each field's
    common case is one type check, the full check runs only off it."""
    if not isinstance(s, Sample):
        raise invalid(f, VALUE_INVALID, f"{f} must be a Sample")
    flag = s.flag
    if type(flag) is not SampleFlag:
        try:
            flag = SampleFlag(flag)
        except ValueError:
            raise invalid(f"{f}.flag", VALUE_INVALID, f"{f}.flag is not a SampleFlag") from None
    timing = s.timing
    if type(timing) is not SampleTiming:
        try:
            timing = SampleTiming(timing)
        except ValueError:
            raise invalid(
                f"{f}.timing", VALUE_INVALID, f"{f}.timing is not a SampleTiming"
            ) from None
    if not isinstance(s.heldout, bool):
        raise invalid(f"{f}.heldout", VALUE_INVALID, f"{f}.heldout must be a bool")
    contention = _contention(s.contention, f)
    for name in _CONTENTION_FLOATS:
        if not math.isfinite(getattr(contention, name)):
            raise invalid(f"{f}.contention.{name}", VALUE_INVALID, "must be a finite number")
    ints: dict[str, int] = {}
    for name, lo, hi in _SAMPLE_INTS:
        value = getattr(s, name)
        if type(value) is not int or not lo <= value <= hi:
            ints[name] = _int(value, f"{f}.{name}", lo, hi)
    decode = _decode_steps(s.decode_ns, f"{f}.decode_ns")
    start = s.start_time
    if type(start) is not datetime or start.tzinfo is not UTC:
        start = _time(start, f"{f}.start_time")
    if (
        not ints
        and flag is s.flag
        and timing is s.timing
        and contention is s.contention
        and start is s.start_time
        and decode is s.decode_ns
    ):
        return s
    return Sample(
        prompt_tokens=ints.get("prompt_tokens", s.prompt_tokens),
        output_tokens=ints.get("output_tokens", s.output_tokens),
        prefill_ns=ints.get("prefill_ns", s.prefill_ns),
        decode_ns=decode,
        total_ns=ints.get("total_ns", s.total_ns),
        batch_size=ints.get("batch_size", s.batch_size),
        start_time=start,
        rpc_ns=ints.get("rpc_ns", s.rpc_ns),
        heldout=s.heldout,
        repeat=ints.get("repeat", s.repeat),
        flag=flag,
        contention=contention,
        timing=timing,
        chunks=ints.get("chunks", s.chunks),
        seq=-1,
    )


def check_samples(samples: object) -> list[Sample]:
    if not isinstance(samples, Sequence) or isinstance(samples, str | bytes):
        raise invalid("samples", VALUE_INVALID, "samples must be a sequence of Sample")
    return [_sample(s, f"samples[{i}]") for i, s in enumerate(samples)]


_BATCH_COLUMNS = tuple(f.name for f in dataclasses.fields(SampleBatch) if f.name != "contention")
_CONTENTION_COLUMNS = tuple(f.name for f in dataclasses.fields(ContentionColumns))
# Sample's fields in order, but seq (a batch has none: the store assigns it)
_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample) if f.name != "seq")
_TIMES: frozenset[type] = frozenset({datetime, NoneType})


def _only(column: Sequence[Any], types: frozenset[type]) -> bool:
    return set(map(type, column)) <= types


def _tuple(column: Any) -> tuple[Any, ...]:
    """A column's values as a tuple; a numeric numpy array's as Python numbers (what
    the per-sample checks normalize its elements to: operator.index, float)."""
    if isinstance(column, np.ndarray) and column.dtype.kind in "iuf":
        return tuple(column.tolist())
    return column if type(column) is tuple else tuple(column)


def _int64_steps(steps: object) -> array[int] | None:
    """A sample's decode steps as an int64 array when they are one already, or a list or
    tuple that converts exactly (array("q") takes what `_decode_steps` takes from them);
    None for anything else (the per-sample check decides)."""
    if type(steps) is array and steps.typecode == "q":
        return steps
    if isinstance(steps, list | tuple) and type(steps) in (list, tuple):
        try:
            return array("q", steps)
        except (TypeError, OverflowError):
            return None
    return None


def _clean_batch(batch: SampleBatch) -> SampleBatch | None:
    """The batch normalized (columns as tuples, decode steps as int64 arrays) when every
    column holds what the per-sample checks (`_sample`) accept unchanged: checked a column
    at a time (the set of the types in it, its min and max), not a sample at a time. None
    when anything differs (the per-sample checks then find the first error, or
    normalize)."""
    columns = {name: _tuple(getattr(batch, name)) for name in _BATCH_COLUMNS if name != "decode_ns"}
    for name, lo, hi in _SAMPLE_INTS:  # the same columns, by name
        column = columns[name]
        if column and not (_only(column, _INT_ONLY) and lo <= min(column) and max(column) <= hi):
            return None
    if not (
        _only(columns["heldout"], _BOOL_ONLY)
        and _only(columns["flag"], _FLAG_ONLY)
        and _only(columns["timing"], _TIMING_ONLY)
    ):
        return None
    times = columns["start_time"]
    if not _only(times, _TIMES) or any(t is not None and t.tzinfo is not UTC for t in times):
        return None
    contention = {}
    for name, tp in _CONTENTION_TYPES:
        column = contention[name] = _tuple(getattr(batch.contention, name))
        if not _only(column, _EXACTLY[tp]):
            return None
        # the float columns: finite (a sum of finite numbers that overflows only sends the
        # batch to the per-sample checks)
        if tp is float and column and not math.isfinite(sum(column)):
            return None
    steps = [_int64_steps(s) for s in batch.decode_ns]
    if None in steps:
        return None
    joined = b"".join(steps)  # type: ignore[arg-type]
    if joined and np.frombuffer(joined, dtype=np.int64).min() < 0:
        return None
    return SampleBatch(**columns, decode_ns=steps, contention=ContentionColumns(**contention))  # type: ignore[arg-type]


def _is_column(column: object) -> bool:
    if isinstance(column, np.ndarray):
        return column.ndim == 1
    return isinstance(column, Sequence) and not isinstance(column, str | bytes)


def _batch_length(batch: SampleBatch) -> int:
    """The batch's size: every column a sequence (not text; a 1-D numpy array is one) of
    one length, else InvalidArgument naming the first that is not."""
    if not isinstance(batch.contention, ContentionColumns):
        raise invalid(
            "samples.contention", VALUE_INVALID, "samples.contention must be ContentionColumns"
        )
    columns = [(name, getattr(batch, name)) for name in _BATCH_COLUMNS]
    columns += [(f"contention.{n}", getattr(batch.contention, n)) for n in _CONTENTION_COLUMNS]
    size = -1
    for name, column in columns:
        if not _is_column(column):
            raise invalid(f"samples.{name}", VALUE_INVALID, f"samples.{name} must be a sequence")
        if size < 0:
            size = len(column)
        elif len(column) != size:
            raise invalid(
                f"samples.{name}",
                VALUE_INVALID,
                f"samples.{name} has {len(column)} values; the batch's other columns {size}",
            )
    return size


def check_sample_batch(batch: object) -> SampleBatch:
    """A valid SampleBatch normalized (columns as tuples, decode steps as int64 arrays),
    from a SampleBatch or a sequence of Sample: when every column passes the column checks
    (the common case: a batch converted from protobuf) its columns as they are; anything
    else goes sample by sample through `_sample` (the first bad one is the error, named
    samples[i].field as for a list of samples), normalized as it normalizes."""
    if not isinstance(batch, SampleBatch):
        return _int64_batch(check_samples(batch))  # a sequence of Sample (or the error)
    _batch_length(batch)
    clean = _clean_batch(batch)
    if clean is not None:
        return clean
    return _int64_batch(check_samples(_as_given(batch)))


def _as_given(batch: SampleBatch) -> list[Sample]:
    """The batch's samples with its values as they are (`SampleBatch.samples` makes the
    decode steps tuples: here the per-sample checks must see what was given)."""
    c = batch.contention
    observations = [
        ContentionObservation(*fields)
        for fields in zip(*(getattr(c, n) for n in _CONTENTION_COLUMNS), strict=True)
    ]
    columns = [getattr(batch, n) if n != "contention" else observations for n in _SAMPLE_FIELDS]
    return [Sample(*values) for values in zip(*columns, strict=True)]


def _int64_batch(samples: list[Sample]) -> SampleBatch:
    """Checked samples as a SampleBatch, decode steps as int64 arrays."""
    batch = SampleBatch.from_samples(samples)
    return dataclasses.replace(batch, decode_ns=[array("q", s) for s in batch.decode_ns])


def check_cost_model(cm: object) -> CostModel:
    if not isinstance(cm, CostModel):
        raise invalid("cost_model", VALUE_INVALID, "cost_model must be a CostModel")
    normalized: CostModel = _roundtrip(CostModel, cm, "cost_model")
    if len(normalized.alpha_knots_p) != len(normalized.alpha_knots_s):
        raise invalid(
            "alpha_knots_s",
            VALUE_INVALID,
            f"alpha_knots_p and alpha_knots_s differ in length "
            f"({len(normalized.alpha_knots_p)} vs {len(normalized.alpha_knots_s)})",
        )
    checked = dataclasses.replace(
        normalized,
        id=check_id(cm.id, "id", allow_empty=True),
        request_id=check_request_id(cm.request_id),
        profile_id=check_id(cm.profile_id, "profile_id", allow_empty=True),
        kind=_nonempty(_text(cm.kind, "kind", 32), "kind"),
        name=_text(cm.name, "name", NAME_LEN),
        create_time=_time(cm.create_time, "create_time"),
        namespace=check_namespace(cm.namespace, "namespace"),
    )
    # the model's own consistency (finite numbers, knots, ranges, kind): a record every
    # later estimate on it can evaluate
    costmodel_validate.check_cost_model(checked)
    return checked
