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
from datetime import datetime
from typing import Any

from idealrt.core import paging
from idealrt.core.costmodel import validate as costmodel_validate
from idealrt.core.domain import (
    ContentionObservation,
    CostModel,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Provenance,
    Sample,
    SampleFlag,
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
    )


def _decode_steps(value: object, field: str) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise invalid(field, VALUE_INVALID, f"{field} must be a sequence of integers")
    try:
        steps = array("q", value)
    except (TypeError, OverflowError):
        raise invalid(field, VALUE_INVALID, f"{field} must be int64 nanoseconds") from None
    if steps and min(steps) < 0:
        raise invalid(field, VALUE_OUT_OF_RANGE, f"{field} must be >= 0")
    return tuple(steps)


def _sample(s: object, f: str) -> Sample:
    if not isinstance(s, Sample):
        raise invalid(f, VALUE_INVALID, f"{f} must be a Sample")
    try:
        flag = SampleFlag(s.flag)
    except ValueError:
        raise invalid(f"{f}.flag", VALUE_INVALID, f"{f}.flag is not a SampleFlag") from None
    if not isinstance(s.heldout, bool):
        raise invalid(f"{f}.heldout", VALUE_INVALID, f"{f}.heldout must be a bool")
    contention = _roundtrip(ContentionObservation, s.contention, f"{f}.contention")
    for name in ("foreign_cpu_s", "sm_clock_mhz", "temperature_c", "energy_j"):
        if not math.isfinite(getattr(contention, name)):
            raise invalid(f"{f}.contention.{name}", VALUE_INVALID, "must be a finite number")
    return Sample(
        prompt_tokens=_int(s.prompt_tokens, f"{f}.prompt_tokens", 0, _INT32_MAX),
        output_tokens=_int(s.output_tokens, f"{f}.output_tokens", 0, _INT32_MAX),
        prefill_ns=_int(s.prefill_ns, f"{f}.prefill_ns"),
        decode_ns=_decode_steps(s.decode_ns, f"{f}.decode_ns"),
        total_ns=_int(s.total_ns, f"{f}.total_ns"),
        batch_size=_int(s.batch_size, f"{f}.batch_size", 1, _INT32_MAX),
        start_time=_time(s.start_time, f"{f}.start_time"),
        rpc_ns=_int(s.rpc_ns, f"{f}.rpc_ns"),
        heldout=s.heldout,
        repeat=_int(s.repeat, f"{f}.repeat", -_INT32_MAX, _INT32_MAX),
        flag=flag,
        contention=contention,
        seq=-1,
    )


def check_samples(samples: object) -> list[Sample]:
    if not isinstance(samples, Sequence) or isinstance(samples, str | bytes):
        raise invalid("samples", VALUE_INVALID, "samples must be a sequence of Sample")
    return [_sample(s, f"samples[{i}]") for i, s in enumerate(samples)]


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
