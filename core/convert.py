"""Converters between protobuf messages and the domain dataclasses.

Only servicers and clients call these; the domain never sees pb2 types. `*_from_pb` on
client input rejects UNSPECIFIED enums with INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from idealrt.common.v1 import common_pb2 as cpb
from idealrt.common.v1 import resources_pb2 as rpb
from idealrt.core import domain as d
from idealrt.core.errors import InvalidArgument, invalid
from idealrt.core.model_spec import Activation, ModelSpec, Norm, Positional
from idealrt.core.namespaces import check_namespace
from idealrt.core.reasons import (
    API_KEY_ENV_RETIRED,
    DURATION_INVALID,
    MODEL_REQUIRED,
    TIMESTAMP_INVALID,
)

__all__ = [
    "ProfileMessages",
    "cost_model_from_pb",
    "cost_model_to_pb",
    "dtype_from_pb",
    "dtype_to_pb",
    "duration_from_pb",
    "model_ref_from_pb",
    "model_ref_to_pb",
    "placement_from_pb",
    "placement_to_pb",
    "plan_from_pb",
    "plan_to_pb",
    "profile_from_pb",
    "profile_state_from_pb",
    "profile_state_to_pb",
    "profile_to_pb",
    "sample_batch_from_pb",
    "sample_from_pb",
    "sample_to_pb",
    "spec_from_pb",
    "spec_to_pb",
    "stack_from_pb",
    "stack_to_pb",
    "target_from_pb",
    "target_to_pb",
    "ts_from_pb",
    "ts_to_pb",
]

E = TypeVar("E", bound=Enum)


def _enum_maps(domain: type[E], pb_enum: Any, prefix: str) -> tuple[dict[E, Any], dict[int, E]]:
    to_pb = {m: pb_enum.Value(f"{prefix}{m.name}") for m in domain}
    return to_pb, {v: k for k, v in to_pb.items()}


_NORM = _enum_maps(Norm, cpb.Norm, "NORM_")
_ACT = _enum_maps(Activation, cpb.Activation, "ACTIVATION_")
_POS = _enum_maps(Positional, cpb.Positional, "POSITIONAL_")
_BACKEND = _enum_maps(d.Backend, cpb.Backend, "BACKEND_")
_FLAG = _enum_maps(d.SampleFlag, cpb.SampleFlag, "SAMPLE_FLAG_")
_TIMING = _enum_maps(d.SampleTiming, cpb.SampleTiming, "SAMPLE_TIMING_")
# reading: UNSPECIFIED (a writer from before the field existed) is SERVER_STEPS, what the
# Sample contract promised then; see SampleTiming in common.proto
_TIMING_FROM_PB: dict[int, d.SampleTiming] = {
    **_TIMING[1],
    cpb.SAMPLE_TIMING_UNSPECIFIED: d.SampleTiming.SERVER_STEPS,
}
_TIMING_READ = (_TIMING[0], _TIMING_FROM_PB)
_STATE = _enum_maps(d.ProfileState, rpb.ProfileState, "PROFILE_STATE_")
_LEASE = _enum_maps(d.LeasePolicy, rpb.LeasePolicy, "LEASE_POLICY_")
_TARGET = _enum_maps(d.TargetKind, rpb.TargetKind, "TARGET_KIND_")
_DTYPE_TO_PB = {"fp32": cpb.D_TYPE_FP32, "fp16": cpb.D_TYPE_FP16, "bf16": cpb.D_TYPE_BF16}
_DTYPE_FROM_PB: dict[int, str] = {int(v): k for k, v in _DTYPE_TO_PB.items()}


def _from(maps: tuple[dict[E, Any], dict[int, E]], value: int, field: str, pb_enum: Any) -> Any:
    try:
        return maps[1][value]
    except KeyError:
        allowed = ", ".join(n for n in pb_enum.keys() if not n.endswith("UNSPECIFIED"))  # noqa: SIM118
        got = pb_enum.Name(value) if value in pb_enum.values() else value
        raise InvalidArgument(
            "ENUM_UNSPECIFIED" if value == 0 else "ENUM_INVALID",
            f"{field} must be one of {allowed}; got {got}",
            field=field,
        ) from None


def ts_to_pb(t: datetime | None) -> timestamp_pb2.Timestamp | None:
    if t is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t.astimezone(UTC))
    return ts


# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z
_TS_SECONDS = (-62_135_596_800, 253_402_300_799)
# google.protobuf.Duration's range: about +-10,000 years
_DURATION_SECONDS = 315_576_000_000
_MAX_NANOS = 999_999_999


def _path(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def ts_from_pb(msg: Any, field: str, path: str = "") -> datetime | None:
    """The Timestamp `field` of `msg` as an aware UTC datetime (None when unset).
    InvalidArgument(TIMESTAMP_INVALID, `path.field`) outside the Timestamp range (seconds
    within years 0001..9999, nanos in [0, 999999999])."""
    if not msg.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, field)
    name = _path(path, field)
    lo, hi = _TS_SECONDS
    if not (lo <= ts.seconds <= hi and 0 <= ts.nanos <= _MAX_NANOS):
        raise invalid(
            name,
            TIMESTAMP_INVALID,
            f"{name} must lie in 0001-01-01..9999-12-31 (seconds in [{lo}, {hi}], nanos in "
            f"[0, {_MAX_NANOS}]); got seconds={ts.seconds}, nanos={ts.nanos}",
        )
    return ts.ToDatetime(tzinfo=UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts_msg(t: datetime | None) -> timestamp_pb2.Timestamp | None:
    """`ts_to_pb`, its common case (a UTC datetime: every time the store returns) by
    arithmetic, a third of Timestamp.FromDatetime's cost; the same message."""
    if t is None or t.tzinfo is not UTC:
        return ts_to_pb(t)
    delta = t - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def _ts_value(msg: Any, field: str, path: str) -> datetime | None:
    """`ts_from_pb` (same checks, same error, same datetime) by arithmetic: what
    Timestamp.ToDatetime(tzinfo=UTC) computes, without its second range check and time
    zone conversion (UTC to UTC)."""
    if not msg.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, field)
    seconds, nanos = ts.seconds, ts.nanos
    lo, hi = _TS_SECONDS
    if not (lo <= seconds <= hi and 0 <= nanos <= _MAX_NANOS):
        return ts_from_pb(msg, field, path)  # raises its InvalidArgument
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def duration_from_pb(msg: Any, field: str, path: str = "") -> float | None:
    """The Duration `field` of `msg` in seconds (None when unset). InvalidArgument
    (DURATION_INVALID, `path.field`) outside the Duration range (|seconds| <= 315576000000,
    |nanos| <= 999999999) or when seconds and nanos differ in sign."""
    if not msg.HasField(field):
        return None
    d: duration_pb2.Duration = getattr(msg, field)
    name = _path(path, field)
    if not (
        abs(d.seconds) <= _DURATION_SECONDS
        and abs(d.nanos) <= _MAX_NANOS
        and (d.seconds == 0 or d.nanos == 0 or (d.seconds > 0) == (d.nanos > 0))
    ):
        raise invalid(
            name,
            DURATION_INVALID,
            f"{name} must have |seconds| <= {_DURATION_SECONDS} and |nanos| <= {_MAX_NANOS} "
            f"of the same sign; got seconds={d.seconds}, nanos={d.nanos}",
        )
    return d.seconds + d.nanos / 1e9


# ---- model ----


def spec_to_pb(s: ModelSpec) -> cpb.ModelSpec:
    return cpb.ModelSpec(
        name=s.name,
        layers=s.layers,
        d_model=s.d_model,
        heads=s.heads,
        kv_heads=s.kv_heads,
        d_ff=s.d_ff,
        vocab=s.vocab,
        max_positions=s.max_positions,
        norm=_NORM[0][s.norm],
        activation=_ACT[0][s.activation],
        positional=_POS[0][s.positional],
        tied_embeddings=s.tied_embeddings,
        parallel_attention=s.parallel_attention,
        rotary_pct=s.rotary_pct,
        rotary_base=s.rotary_base,
        bias=s.bias,
        norm_eps=s.norm_eps,
        family=s.family,
        attn_bias=s.attn_bias,
        lm_head_bias=s.lm_head_bias,
        embedding_norm=s.embedding_norm,
        shared_norm=s.shared_norm,
        sliding_window=s.sliding_window,
    )


def _opt(m: cpb.ModelSpec, name: str) -> bool | None:
    return bool(getattr(m, name)) if m.HasField(name) else None


def spec_from_pb(m: cpb.ModelSpec, field: str = "model.spec") -> ModelSpec:
    return ModelSpec(
        name=m.name,
        layers=m.layers,
        d_model=m.d_model,
        heads=m.heads,
        kv_heads=m.kv_heads,
        d_ff=m.d_ff,
        vocab=m.vocab,
        max_positions=m.max_positions,
        norm=_from(_NORM, m.norm, f"{field}.norm", cpb.Norm),
        activation=_from(_ACT, m.activation, f"{field}.activation", cpb.Activation),
        positional=_from(_POS, m.positional, f"{field}.positional", cpb.Positional),
        tied_embeddings=m.tied_embeddings,
        parallel_attention=m.parallel_attention,
        rotary_pct=m.rotary_pct or 1.0,
        rotary_base=m.rotary_base or 10000.0,
        bias=m.bias,
        norm_eps=m.norm_eps or 1e-5,
        family=m.family or "gpt2",
        attn_bias=_opt(m, "attn_bias"),
        lm_head_bias=_opt(m, "lm_head_bias"),
        embedding_norm=_opt(m, "embedding_norm"),
        shared_norm=_opt(m, "shared_norm"),
        sliding_window=m.sliding_window,
    )


def model_ref_to_pb(r: d.ModelRef) -> cpb.ModelRef:
    msg = cpb.ModelRef(name=r.name, seed=r.seed, weights_path=r.weights_path)
    if r.spec is not None:
        msg.spec.CopyFrom(spec_to_pb(r.spec))
    return msg


def model_ref_from_pb(m: cpb.ModelRef, field: str = "model") -> d.ModelRef:
    spec = spec_from_pb(m.spec, f"{field}.spec") if m.HasField("spec") else None
    if spec is None and not m.name and not m.weights_path:
        raise InvalidArgument(
            MODEL_REQUIRED,
            f"{field}: give a catalog name, a spec or a weights_path",
            field=f"{field}.name",
        )
    return d.ModelRef(name=m.name, spec=spec, seed=m.seed, weights_path=m.weights_path)


def dtype_to_pb(dtype: str) -> Any:
    return _DTYPE_TO_PB[dtype]


def dtype_from_pb(value: int, field: str = "stack.dtype") -> str:
    try:
        return _DTYPE_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(
            "ENUM_UNSPECIFIED" if value == 0 else "ENUM_INVALID",
            f"{field} must be one of D_TYPE_FP32, D_TYPE_FP16, D_TYPE_BF16",
            field=field,
        ) from None


def stack_to_pb(s: d.StackSpec) -> cpb.StackSpec:
    return cpb.StackSpec(
        backend=_BACKEND[0][s.backend],
        device=s.device,
        dtype=dtype_to_pb(s.dtype),
        options=dict(s.options),
    )


def stack_from_pb(m: cpb.StackSpec, field: str = "stack") -> d.StackSpec:
    return d.StackSpec(
        backend=_from(_BACKEND, m.backend, f"{field}.backend", cpb.Backend),
        device=m.device or "cpu",
        dtype=dtype_from_pb(m.dtype, f"{field}.dtype"),
        options=dict(m.options),
    )


# ---- samples ----


def _contention_to_pb(c: d.ContentionObservation) -> cpb.ContentionObservation:
    return cpb.ContentionObservation(
        foreign_cpu_seconds=c.foreign_cpu_s,
        gpu_foreign_processes=c.gpu_foreign_processes,
        sm_clock_mhz=c.sm_clock_mhz,
        temperature_c=c.temperature_c,
        throttle_reasons=c.throttle_reasons,
        energy_joules=c.energy_j,
        energy_source=c.energy_source,
    )


def _contention_from_pb(m: cpb.ContentionObservation) -> d.ContentionObservation:
    return d.ContentionObservation(
        foreign_cpu_s=m.foreign_cpu_seconds,
        gpu_foreign_processes=m.gpu_foreign_processes,
        sm_clock_mhz=m.sm_clock_mhz,
        temperature_c=m.temperature_c,
        throttle_reasons=m.throttle_reasons,
        energy_j=m.energy_joules,
        energy_source=m.energy_source,
    )


def sample_to_pb(s: d.Sample) -> cpb.Sample:
    return cpb.Sample(
        prompt_tokens=s.prompt_tokens,
        output_tokens=s.output_tokens,
        batch_size=s.batch_size,
        prefill_ns=s.prefill_ns,
        decode_ns=list(s.decode_ns),
        total_ns=s.total_ns,
        rpc_ns=s.rpc_ns,
        start_time=_ts_msg(s.start_time),
        heldout=s.heldout,
        repeat=s.repeat,
        flag=_FLAG[0][s.flag],
        contention=_contention_to_pb(s.contention),
        seq=s.seq,
        timing=_TIMING[0][s.timing],
        chunks=s.chunks,
    )


def sample_from_pb(m: cpb.Sample, field: str = "samples") -> d.Sample:
    return d.Sample(
        prompt_tokens=m.prompt_tokens,
        output_tokens=m.output_tokens,
        prefill_ns=m.prefill_ns,
        decode_ns=tuple(m.decode_ns),
        total_ns=m.total_ns,
        batch_size=m.batch_size or 1,
        start_time=_ts_value(m, "start_time", field),
        rpc_ns=m.rpc_ns,
        heldout=m.heldout,
        repeat=m.repeat,
        flag=_from(_FLAG, m.flag, f"{field}.flag", cpb.SampleFlag),
        contention=_contention_from_pb(m.contention),
        timing=_from(_TIMING_READ, m.timing, f"{field}.timing", cpb.SampleTiming),
        chunks=m.chunks,
        seq=m.seq,
    )


def sample_batch_from_pb(msgs: Sequence[cpb.Sample], field: str = "samples") -> d.SampleBatch:
    """A repeated Sample field as one SampleBatch: sample i as `sample_from_pb(msgs[i],
    f"{field}[i]")` gives it (seq aside: a batch has none), and its InvalidArgument for the
    first sample that has one. The ingest path (AppendSamples): the fields are read once
    per message into a row, the rows turned into columns in C, the checks made by column
    (min, max, a set of enum values), no Sample or ContentionObservation built; decode
    steps become int64 arrays (what the store keeps). Anything a column check refuses is
    converted again sample by sample, for the error the one-sample converter gives."""
    rows = [
        (
            m.prompt_tokens, m.output_tokens, m.prefill_ns, array("q", m.decode_ns[:]),
            m.total_ns, m.batch_size, m.HasField("start_time"), (t := m.start_time).seconds,
            t.nanos, m.rpc_ns, m.heldout, m.repeat, m.flag,
            (c := m.contention).foreign_cpu_seconds, c.gpu_foreign_processes, c.sm_clock_mhz,
            c.temperature_c, c.throttle_reasons, c.energy_joules, c.energy_source,
            m.timing, m.chunks,
        )
        for m in msgs
    ]  # fmt: skip
    if not rows:
        return d.SampleBatch.from_samples([])
    (
        prompt, output, prefill, decode, total, batch_size, timed, seconds, nanos, rpc,
        heldout, repeat, flags, cpu, gpu, sm_clock, temperature, throttle, energy, source,
        timings, chunks,
    ) = zip(*rows, strict=True)  # fmt: skip
    lo, hi = _TS_SECONDS
    known = _FLAG[1]
    known_timing = _TIMING_FROM_PB
    timing_values = set(timings)
    if not (
        lo <= min(seconds)
        and max(seconds) <= hi
        and min(nanos) >= 0
        and max(nanos) <= _MAX_NANOS
        and set(flags) <= known.keys()
        and timing_values <= known_timing.keys()
    ):
        return d.SampleBatch.from_samples(
            [sample_from_pb(m, f"{field}[{i}]") for i, m in enumerate(msgs)]
        )
    return d.SampleBatch(
        prompt_tokens=prompt,
        output_tokens=output,
        prefill_ns=prefill,
        decode_ns=decode,
        total_ns=total,
        batch_size=batch_size if 0 not in batch_size else tuple(b or 1 for b in batch_size),
        start_time=[
            _EPOCH + timedelta(seconds=s, microseconds=n // 1000) if set_ else None
            for set_, s, n in zip(timed, seconds, nanos, strict=True)
        ],
        rpc_ns=rpc,
        heldout=heldout,
        repeat=repeat,
        flag=[known[f] for f in flags],
        contention=d.ContentionColumns(
            foreign_cpu_s=cpu,
            gpu_foreign_processes=gpu,
            sm_clock_mhz=sm_clock,
            temperature_c=temperature,
            throttle_reasons=throttle,
            energy_j=energy,
            energy_source=source,
        ),
        timing=(  # one timing per profile is the rule: no lookup per sample then
            [known_timing[timings[0]]] * len(timings)
            if len(timing_values) == 1
            else [known_timing[t] for t in timings]
        ),
        chunks=chunks,
    )


# ---- profiles ----


def plan_to_pb(p: d.ProfilePlan) -> rpb.ProfilePlan:
    msg = rpb.ProfilePlan(
        prompt_tokens=list(p.prompt_tokens),
        output_tokens=list(p.output_tokens),
        repeats=p.repeats,
        warmups=p.warmups,
        holdout_prompt_tokens=list(p.holdout_prompt_tokens),
        holdout_output_tokens=list(p.holdout_output_tokens),
        seed=p.seed,
        randomize=p.randomize,
        until_ci_rel=p.until_ci_rel,
        max_repeats=p.max_repeats,
        lease=_LEASE[0][p.lease],
        batch_size=p.batch_size,
        adaptive_target_rel=p.adaptive_target_rel,
        adaptive_max_prompt_sizes=p.adaptive_max_prompt_sizes,
    )
    if p.spread_s > 0:
        msg.spread.CopyFrom(_duration(p.spread_s))
    if p.budget_s > 0:
        msg.budget.CopyFrom(_duration(p.budget_s))
    return msg


def _duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def plan_from_pb(m: rpb.ProfilePlan, field: str = "profile.plan") -> d.ProfilePlan:
    return d.ProfilePlan(
        prompt_tokens=tuple(m.prompt_tokens),
        output_tokens=tuple(m.output_tokens),
        repeats=m.repeats,
        warmups=m.warmups,
        holdout_prompt_tokens=tuple(m.holdout_prompt_tokens),
        holdout_output_tokens=tuple(m.holdout_output_tokens),
        seed=m.seed,
        randomize=m.randomize,
        until_ci_rel=m.until_ci_rel,
        max_repeats=m.max_repeats,
        budget_s=duration_from_pb(m, "budget", field) or 0.0,
        lease=_from(_LEASE, m.lease, f"{field}.lease", rpb.LeasePolicy),
        batch_size=m.batch_size or 1,
        adaptive_target_rel=m.adaptive_target_rel,
        adaptive_max_prompt_sizes=m.adaptive_max_prompt_sizes,
        spread_s=duration_from_pb(m, "spread", field) or 0.0,
    )


def target_to_pb(t: d.Target) -> rpb.Target:
    return rpb.Target(
        kind=_TARGET[0][t.kind],
        address=t.address,
        base_url=t.base_url,
        api_model=t.api_model,
        credential=t.credential,
        tokenizer=t.tokenizer,
        options=dict(t.options),
    )


def target_from_pb(m: rpb.Target, field: str = "profile.target") -> d.Target:
    if m.api_key_env:  # the field's value is not echoed: it names a server variable
        raise invalid(
            f"{field}.api_key_env",
            API_KEY_ENV_RETIRED,
            f"{field}.api_key_env is no longer accepted: a caller may not choose which of the "
            f"server's variables is sent where; name a credential configured on the profiler "
            f"({field}.credential) instead",
        )
    return d.Target(
        kind=_from(_TARGET, m.kind, f"{field}.kind", rpb.TargetKind),
        address=m.address,
        base_url=m.base_url,
        api_model=m.api_model,
        credential=m.credential,
        tokenizer=m.tokenizer,
        options=dict(m.options),
    )


def placement_to_pb(p: d.Placement) -> rpb.Placement:
    return rpb.Placement(gpu_product=p.gpu_product, node_pool=p.node_pool, whole_node=p.whole_node)


def placement_from_pb(m: rpb.Placement) -> d.Placement:
    return d.Placement(gpu_product=m.gpu_product, node_pool=m.node_pool, whole_node=m.whole_node)


def profile_state_to_pb(s: d.ProfileState) -> Any:
    return _STATE[0][s]


def profile_state_from_pb(v: int, field: str = "state") -> d.ProfileState:
    return _from(_STATE, v, field, rpb.ProfileState)


def profile_to_pb(p: d.Profile) -> rpb.Profile:
    msg = rpb.Profile(
        id=p.id,
        model=model_ref_to_pb(p.model),
        stack=stack_to_pb(p.stack),
        plan=plan_to_pb(p.plan),
        target=target_to_pb(p.target),
        state=_STATE[0][p.state],
        request_id=p.request_id,
        create_time=_ts_msg(p.create_time),
        start_time=_ts_msg(p.start_time),
        end_time=_ts_msg(p.end_time),
        completed_samples=p.completed_samples,
        total_samples=p.total_samples,
        error=p.error,
        provenance=dict(p.provenance.entries),
        namespace=p.namespace,
        queue_position=p.queue_position,
    )
    if p.model_spec is not None:
        msg.model_spec.CopyFrom(spec_to_pb(p.model_spec))
    if not p.placement.empty:  # unset: anywhere
        msg.placement.CopyFrom(placement_to_pb(p.placement))
    return msg


class ProfileMessages:
    """`profile_to_pb` with a bounded memo, for a server that answers the same stored
    profiles again and again (a list page, then a get of one of them).

    A Profile is mutable and unhashable, so the memo's key is its scalar fields by value
    and its frozen parts (model, stack, plan, target, provenance, model_spec, placement) by
    identity: the store hands out the same part objects for every read of an unchanged
    profile (see the store's row decoding), and an entry keeps its parts alive, so an id
    in a key names the very object converted, never a later one at the same address. A
    changed profile is a new key; a profile built elsewhere is merely a miss. The message
    returned is shared: copy it into a response (message constructors and CopyFrom copy),
    never change it. At most `size` entries, the oldest dropped first."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._memo: dict[tuple[Any, ...], tuple[rpb.Profile, tuple[object, ...]]] = {}
        self._lock = threading.Lock()

    def __call__(self, p: d.Profile) -> rpb.Profile:
        parts = (p.model, p.stack, p.plan, p.target, p.provenance, p.model_spec, p.placement)
        key = (
            p.id, p.state, p.request_id, p.create_time, p.start_time, p.end_time,
            p.completed_samples, p.total_samples, p.error, p.namespace, p.queue_position,
            *map(id, parts),
        )  # fmt: skip
        try:
            hit = self._memo.get(key)
        except TypeError:  # an unhashable field: not one the store returned
            return profile_to_pb(p)
        if hit is not None:
            return hit[0]
        msg = profile_to_pb(p)
        with self._lock:
            while len(self._memo) >= self._size:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = (msg, parts)
        return msg


def profile_from_pb(m: rpb.Profile, field: str = "profile", *, new: bool = False) -> d.Profile:
    """`new=True` for client-created profiles: state, progress and queue position are the
    server's (the namespace and placement are the client's, `new` or not). An empty
    namespace is "default"."""
    return d.Profile(
        id="" if new else m.id,
        model=model_ref_from_pb(m.model, f"{field}.model"),
        stack=stack_from_pb(m.stack, f"{field}.stack"),
        plan=plan_from_pb(m.plan, f"{field}.plan"),
        target=target_from_pb(m.target, f"{field}.target") if m.HasField("target") else d.Target(),
        state=d.ProfileState.QUEUED if new else profile_state_from_pb(m.state, f"{field}.state"),
        request_id=m.request_id,
        create_time=None if new else ts_from_pb(m, "create_time", field),
        start_time=None if new else ts_from_pb(m, "start_time", field),
        end_time=None if new else ts_from_pb(m, "end_time", field),
        completed_samples=0 if new else m.completed_samples,
        total_samples=0 if new else m.total_samples,
        error="" if new else m.error,
        provenance=d.Provenance(dict(m.provenance)) if not new else d.Provenance(),
        model_spec=spec_from_pb(m.model_spec, f"{field}.model_spec")
        if m.HasField("model_spec") and not new
        else None,
        namespace=check_namespace(m.namespace, f"{field}.namespace"),
        placement=placement_from_pb(m.placement) if m.HasField("placement") else d.Placement(),
        queue_position=0 if new else m.queue_position,
    )


# ---- cost models ----


def cost_model_to_pb(cm: d.CostModel) -> rpb.CostModel:
    q = cm.quality
    msg = rpb.CostModel(
        id=cm.id,
        profile_id=cm.profile_id,
        alpha_knots_p=list(cm.alpha_knots_p),
        alpha_knots_seconds=list(cm.alpha_knots_s),
        beta0_seconds=cm.beta0_s,
        beta1_seconds=cm.beta1_s,
        overhead_seconds=cm.overhead_s,
        request_id=cm.request_id,
        name=cm.name,
        kind=cm.kind,
        quality=rpb.FitQuality(
            method=q.method,
            points=q.points,
            mean_rel=q.mean_rel,
            p95_rel=q.p95_rel,
            max_rel=q.max_rel,
        ),
        valid_prompt_tokens_min=cm.valid_prompt_tokens[0],
        valid_prompt_tokens_max=cm.valid_prompt_tokens[1],
        valid_output_tokens_min=cm.valid_output_tokens[0],
        valid_output_tokens_max=cm.valid_output_tokens[1],
        create_time=ts_to_pb(cm.create_time),
        model_name=cm.model_name,
        fit_options=cm.fit_options,
        namespace=cm.namespace,
    )
    for k, (lo, hi) in cm.intervals.items():
        msg.intervals[k].low = lo
        msg.intervals[k].high = hi
    if cm.stack is not None:
        msg.stack.CopyFrom(stack_to_pb(cm.stack))
    return msg


def cost_model_from_pb(m: rpb.CostModel, field: str = "cost_model") -> d.CostModel:
    """An empty namespace is "default"."""
    return d.CostModel(
        id=m.id,
        profile_id=m.profile_id,
        alpha_knots_p=tuple(m.alpha_knots_p),
        alpha_knots_s=tuple(m.alpha_knots_seconds),
        beta0_s=m.beta0_seconds,
        beta1_s=m.beta1_seconds,
        overhead_s=m.overhead_seconds,
        request_id=m.request_id,
        name=m.name,
        kind=m.kind or "idealized",
        quality=d.FitQuality(
            method=m.quality.method or "none",
            points=m.quality.points,
            mean_rel=m.quality.mean_rel,
            p95_rel=m.quality.p95_rel,
            max_rel=m.quality.max_rel,
        ),
        intervals={k: (v.low, v.high) for k, v in m.intervals.items()},
        valid_prompt_tokens=(m.valid_prompt_tokens_min, m.valid_prompt_tokens_max),
        valid_output_tokens=(m.valid_output_tokens_min, m.valid_output_tokens_max),
        create_time=ts_from_pb(m, "create_time", field),
        model_name=m.model_name,
        stack=stack_from_pb(m.stack, f"{field}.stack") if m.HasField("stack") else None,
        fit_options=dict(m.fit_options),
        namespace=check_namespace(m.namespace, f"{field}.namespace"),
    )
