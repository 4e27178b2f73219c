"""Domain dataclasses <-> table rows. Columns are the truth for what they hold (ids,
state, times, counters); the JSON payload carries the nested rest."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from sqlalchemy.engine import RowMapping

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
from idealrt.core.model_spec import ModelSpec
from idealrt.services.store import _serde

__all__ = [
    "SAMPLE_COLUMNS",
    "batch_columns",
    "cost_model_from_row",
    "cost_model_row",
    "profile_from_row",
    "profile_row",
    "same_sample_values",
    "sample_from_row",
    "sample_row",
    "sample_values",
]

_PROFILE_PAYLOAD: dict[str, Any] = {
    "model": ModelRef,
    "stack": StackSpec,
    "plan": ProfilePlan,
    "target": Target,
    "provenance": Provenance,
    "model_spec": ModelSpec | None,
    # Added after the first rows were written: a payload without one decodes to the
    # default (no migration: `_decode_payload` passes only the keys present).
    "placement": Placement,
    "queue_position": int,
}
# Stored as columns, not in the cost model's payload.
_COST_MODEL_COLUMNS = (
    "id", "request_id", "profile_id", "kind", "name", "create_time", "namespace",
)  # fmt: skip
_DEFAULT_CONTENTION = _serde.to_jsonable(ContentionObservation())


def _nullable(value: str) -> str | None:
    return value or None


def profile_row(p: Profile, *, update_time: datetime) -> dict[str, Any]:
    payload = {name: getattr(p, name) for name in _PROFILE_PAYLOAD}
    return {
        "id": p.id,
        "request_id": _nullable(p.request_id),
        "state": p.state.value,
        "create_time": p.create_time,
        "update_time": update_time,
        "start_time": p.start_time,
        "end_time": p.end_time,
        "completed_samples": p.completed_samples,
        "total_samples": p.total_samples,
        "error": p.error,
        "payload": _serde.dumps(payload),
        "namespace": p.namespace,
    }


# Payload texts whose decoded parts are remembered: at most this many, of at most this
# size (a profile's is ~1 KB): a few MB.
_PAYLOAD_MEMO = 4096
_PAYLOAD_MEMO_BYTES = 16 * 1024
_PAYLOAD_DECODERS = tuple((name, _serde.decoder(tp)) for name, tp in _PROFILE_PAYLOAD.items())


def _profile_payload(text: str) -> tuple[tuple[str, Any], ...]:
    """`_decode_payload`, memoized for texts up to _PAYLOAD_MEMO_BYTES."""
    if len(text) > _PAYLOAD_MEMO_BYTES:
        return _decode_payload(text)
    return _payload_memo(text)


def _decode_payload(text: str) -> tuple[tuple[str, Any], ...]:
    """The decoded parts of a profile's payload text, (name, value) for each part present.

    Memoized by the text: a payload is a pure function of its text, its parts are frozen
    dataclasses, and a profile's payload changes only when it is updated, so every read
    of an unchanged profile (a list page, a get) shares the parts decoded at its first
    read instead of parsing the JSON and rebuilding ~50 typed values again. The parts are
    shared between the Profiles returned: frozen, they are read-only, the dicts in them
    (options, provenance entries) included. Bounded (see _PAYLOAD_MEMO); a module-level
    cache only because the function is pure: what it holds is never wrong, at worst
    evicted."""
    data = json.loads(text)
    return tuple((name, dec(data[name])) for name, dec in _PAYLOAD_DECODERS if name in data)


_payload_memo = functools.lru_cache(maxsize=_PAYLOAD_MEMO)(_decode_payload)


def profile_from_row(row: Mapping[str, Any] | RowMapping) -> Profile:
    """A new Profile of the row (its frozen parts shared with other reads of the same
    payload, see `_profile_payload`)."""
    return Profile(
        id=row["id"],
        request_id=row["request_id"] or "",
        state=ProfileState(row["state"]),
        create_time=row["create_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        completed_samples=row["completed_samples"],
        total_samples=row["total_samples"],
        error=row["error"],
        namespace=row["namespace"],
        **dict(_profile_payload(row["payload"])),
    )


# The columns of `sample_values`, in its order (a sample's own fields; the insert adds
# profile_id, seq, batch_id and namespace).
SAMPLE_COLUMNS = (
    "prompt_tokens", "output_tokens", "batch_size", "prefill_ns", "total_ns", "decode_ns",
    "rpc_ns", "heldout", "repeat", "flag", "contention", "start_time", "timing", "chunks",
)  # fmt: skip
_CONTENTION_DEFAULTS = tuple(_DEFAULT_CONTENTION.items())
# json.dumps(..., sort_keys=True, separators=(",", ":")) without building an encoder a call
_COMPACT = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _contention_json(c: ContentionObservation) -> str:
    """The non-default fields as compact key-sorted JSON (fields hold plain floats, ints
    and strings, which are their own JSON values: `to_jsonable` of each is itself)."""
    changed = {k: v for k, d in _CONTENTION_DEFAULTS if (v := getattr(c, k)) != d}
    return _COMPACT.encode(changed) if changed else "{}"


def sample_values(s: Sample) -> tuple[Any, ...]:
    """A validated sample's column values, in SAMPLE_COLUMNS order (hot: one tuple per
    appended sample)."""
    return (
        s.prompt_tokens,
        s.output_tokens,
        s.batch_size,
        s.prefill_ns,
        s.total_ns,
        _serde.encode_ns(s.decode_ns),
        s.rpc_ns,
        s.heldout,
        s.repeat,
        s.flag.value,
        _contention_json(s.contention),
        s.start_time,
        s.timing.value,
        s.chunks,
    )


# How json (ensure_ascii, the default) writes each contention field's value: floats and
# ints as their repr (finite floats only: validation refuses the others), text escaped.
_JSON_VALUE: dict[type, Callable[[Any], str]] = {
    float: float.__repr__,
    int: int.__repr__,
    str: encode_basestring_ascii,
}
# (name, default, encoder of its type), sorted by name (json's sort_keys)
_CONTENTION_KEYS = tuple(
    (name, default, _JSON_VALUE[type(default)]) for name, default in sorted(_CONTENTION_DEFAULTS)
)


def _contention_texts(c: ContentionColumns, n: int) -> list[str]:
    """`_contention_json` of each of a batch's n observations, by column: the columns that
    hold only their default are left out up front (most are, in a profile: no GPU, no
    energy counter), and an observation met before in the batch reuses its text."""
    active = [
        (f'"{name}":', column, default, encode)
        for name, default, encode in _CONTENTION_KEYS
        if (column := getattr(c, name)).count(default) != n
    ]
    if not active:
        return ["{}"] * n
    columns = [a[1] for a in active]
    seen: dict[tuple[Any, ...], str] = {}
    out = []
    for values in zip(*columns, strict=True):
        text = seen.get(values)
        if text is None:
            parts = [
                key + encode(v)
                for (key, _, default, encode), v in zip(active, values, strict=True)
                if v != default
            ]
            text = seen[values] = "{" + ",".join(parts) + "}"
        out.append(text)
    return out


_FLAG_VALUES = {f: f.value for f in SampleFlag}
_TIMINGS = {t.value: t for t in SampleTiming}


def batch_columns(batch: SampleBatch) -> list[Sequence[Any]]:
    """A validated batch's column values (decode steps as int64 arrays, see
    `_validate.check_sample_batch`), one sequence per SAMPLE_COLUMNS entry, each sample's
    values those `sample_values` gives (the ingest path: no row built per sample)."""
    n = len(batch)
    return [
        batch.prompt_tokens,
        batch.output_tokens,
        batch.batch_size,
        batch.prefill_ns,
        batch.total_ns,
        [_serde.encode_int64(steps) for steps in batch.decode_ns],  # type: ignore[arg-type]
        batch.rpc_ns,
        batch.heldout,
        batch.repeat,
        [_FLAG_VALUES[f] for f in batch.flag],
        _contention_texts(batch.contention, n),
        batch.start_time,
        _timing_values(batch.timing, n),
        batch.chunks,
    ]


def _timing_values(column: Sequence[SampleTiming], n: int) -> list[str]:
    """The timing column as text: one value repeated (a profile's samples share one
    timing as a rule) without a lookup per sample."""
    if n and column.count(column[0]) == n:
        return [column[0].value] * n
    return [t.value for t in column]


_CONTENTION_AT = SAMPLE_COLUMNS.index("contention")


def same_sample_values(stored: Sequence[Any], given: Sequence[Any]) -> bool:
    """Whether two samples' column values (SAMPLE_COLUMNS order: a stored row's, as
    SQLAlchemy reads them, and a validated sample's) are the values of equal samples:
    equal column values are (every encoding here is one-to-one on valid samples), and so
    are values that differ only in how the contention's JSON spells equal observations
    (a row written with default fields in it, or in another key order)."""
    if len(stored) != len(given):
        return False
    c = _CONTENTION_AT
    if any(a != b for i, (a, b) in enumerate(zip(stored, given, strict=True)) if i != c):
        return False
    return stored[c] == given[c] or _serde.loads(ContentionObservation, stored[c]) == _serde.loads(
        ContentionObservation, given[c]
    )


def sample_row(s: Sample, *, profile_id: str, batch_id: str, seq: int) -> dict[str, Any]:
    row = dict(zip(SAMPLE_COLUMNS, sample_values(s), strict=True))
    row.update(profile_id=profile_id, seq=seq, batch_id=batch_id)
    return row


def sample_from_row(row: Mapping[str, Any] | RowMapping) -> Sample:
    return Sample(
        prompt_tokens=row["prompt_tokens"],
        output_tokens=row["output_tokens"],
        prefill_ns=row["prefill_ns"],
        decode_ns=_serde.decode_ns(row["decode_ns"]),
        total_ns=row["total_ns"],
        batch_size=row["batch_size"],
        start_time=row["start_time"],
        rpc_ns=row["rpc_ns"],
        heldout=bool(row["heldout"]),
        repeat=row["repeat"],
        flag=SampleFlag(row["flag"]),
        contention=_serde.loads(ContentionObservation, row["contention"]),
        timing=_TIMINGS[row["timing"]],
        chunks=row["chunks"],
        seq=row["seq"],
    )


def cost_model_row(cm: CostModel) -> dict[str, Any]:
    payload = {k: v for k, v in _serde.to_jsonable(cm).items() if k not in _COST_MODEL_COLUMNS}
    return {
        "id": cm.id,
        "request_id": _nullable(cm.request_id),
        "profile_id": _nullable(cm.profile_id),
        "kind": cm.kind,
        "name": cm.name,
        "create_time": cm.create_time,
        "payload": json.dumps(payload, sort_keys=True, separators=(",", ":")),
        "namespace": cm.namespace,
    }


def cost_model_from_row(row: Mapping[str, Any] | RowMapping) -> CostModel:
    payload = json.loads(row["payload"])
    payload.update(
        id=row["id"],
        request_id=row["request_id"] or "",
        profile_id=row["profile_id"] or "",
        kind=row["kind"],
        name=row["name"],
        create_time=None,
        namespace=row["namespace"],
    )
    cm: CostModel = _serde.from_jsonable(CostModel, payload)
    return dataclasses.replace(cm, create_time=row["create_time"])
