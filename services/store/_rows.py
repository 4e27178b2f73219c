"""Domain dataclasses <-> table rows. Columns are the truth for what they hold (ids,
state, times, counters); the JSON payload carries the nested rest."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.engine import RowMapping

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
from idealrt.core.model_spec import ModelSpec
from idealrt.services.store import _serde

__all__ = [
    "cost_model_from_row",
    "cost_model_row",
    "profile_from_row",
    "profile_row",
    "sample_from_row",
    "sample_row",
]

_PROFILE_PAYLOAD: dict[str, Any] = {
    "model": ModelRef,
    "stack": StackSpec,
    "plan": ProfilePlan,
    "target": Target,
    "provenance": Provenance,
    "model_spec": ModelSpec | None,
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


def profile_from_row(row: Mapping[str, Any] | RowMapping) -> Profile:
    payload = json.loads(row["payload"])
    parts = {
        name: _serde.from_jsonable(tp, payload[name])
        for name, tp in _PROFILE_PAYLOAD.items()
        if name in payload
    }
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
        **parts,
    )


def sample_row(s: Sample, *, profile_id: str, batch_id: str, seq: int) -> dict[str, Any]:
    contention = {
        k: v for k, v in _serde.to_jsonable(s.contention).items() if _DEFAULT_CONTENTION.get(k) != v
    }
    return {
        "profile_id": profile_id,
        "seq": seq,
        "batch_id": batch_id,
        "prompt_tokens": s.prompt_tokens,
        "output_tokens": s.output_tokens,
        "batch_size": s.batch_size,
        "prefill_ns": s.prefill_ns,
        "total_ns": s.total_ns,
        "decode_ns": _serde.encode_ns(s.decode_ns),
        "rpc_ns": s.rpc_ns,
        "heldout": s.heldout,
        "repeat": s.repeat,
        "flag": s.flag.value,
        "contention": json.dumps(contention, sort_keys=True, separators=(",", ":")),
        "start_time": s.start_time,
    }


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
