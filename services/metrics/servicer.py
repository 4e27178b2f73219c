"""MetricsService: each RPC converts its request, makes one MetricsEngine call, converts back.

One module because it is one idea, the conversions between the contract and the domain;
the long part of it is converting large workloads fast. A workload comes as `queries` or
as the packed `prompt_tokens` / `output_tokens` columns (never both); either is read into
numpy arrays without a Python step per query, and per-query results go back in the
request's form: `estimates`, or the response's packed columns.

Reading `queries` (one message per query) the plain way costs two attribute reads per
query (~0.3 us each: 100,000 queries take tens of ms). Instead the request is serialized
again and parsed as a *view* whose field of the same number is one `Columns` message
(`repeated int32 prompt_tokens = 1; repeated int32 output_tokens = 2`). Protobuf parses
repeated occurrences of a singular message field by merging them, and merging appends
repeated fields, so the view's two columns are every query's prompt_tokens and
output_tokens in order, read into numpy with one copy each. This is exact when the
serialization is canonical and every count is present:
- unknown fields are discarded from the request first (one unknown field numbered 1 or
  2 with another wire type would otherwise be read into a column);
- proto3 leaves a 0 off the wire, so a query with a 0 (invalid: counts are >= 1) makes a
  column shorter than the queries; then the queries are read the plain way, so the error
  names the right query.

Writing results: the packed columns of a response are encoded directly (tag, length,
little-endian doubles / one byte per bool) and merged into the message; `repeated
QueryEstimate estimates` likewise, as fixed-size records of all four fields (proto3
parsers accept fields that carry their default value). Below `_SMALL` queries the plain
paths are the cheaper ones and are used."""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from idealrt.core import convert as cv
from idealrt.core.costmodel.estimate import WorkloadEstimate
from idealrt.core.costmodel.fit import FitOptions
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP
from idealrt.core.errors import InvalidArgument
from idealrt.core.namespaces import check_namespace
from idealrt.core.reasons import QUERIES_INVALID
from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as pbg
from idealrt.services.metrics.engine import (
    CostRequest,
    EstimateResult,
    MetricsEngine,
    RooflinePoint,
    RooflineRequest,
)
from idealrt.services.metrics.reasons import (
    ENUM_UNSPECIFIED,
    MODEL_SPEC_REQUIRED,
    QUERIES_AMBIGUOUS,
)

__all__ = ["MetricsServicer"]

Tokens = npt.NDArray[np.int32] | npt.NDArray[np.int64]

# ---- large workloads without a Python step per query (see the module doc)

_SMALL = 32  # queries below which the plain conversions are the cheaper ones

_WIRE_LEN = 2
_WIRE_I64 = 1
_WIRE_VARINT = 0


def _views() -> dict[int, type[message.Message]]:
    """View messages (see the module doc) for `queries` at each field number it has in
    the metrics requests."""
    f = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(
        name="idealrt_metrics_internal_views.proto",
        package="idealrt.metrics.internal",
        syntax="proto3",
    )
    cols = fd.message_type.add(name="Columns")
    for name, number in (("prompt_tokens", 1), ("output_tokens", 2)):
        cols.field.add(name=name, number=number, type=f.TYPE_INT32, label=f.LABEL_REPEATED)
    numbers = {
        m.fields_by_name["queries"].number
        for m in (
            pb.EstimateRuntimeRequest.DESCRIPTOR,
            pb.ComputeCostRequest.DESCRIPTOR,
            pb.CompareCostModelsRequest.DESCRIPTOR,
            pb.ComputeParetoRequest.DESCRIPTOR,
        )
    }
    for number in sorted(numbers):
        view = fd.message_type.add(name=f"QueriesAt{number}")
        view.field.add(
            name="queries",
            number=number,
            type=f.TYPE_MESSAGE,
            type_name=".idealrt.metrics.internal.Columns",
            label=f.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {
        n: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"idealrt.metrics.internal.QueriesAt{n}")
        )
        for n in sorted(numbers)
    }


_VIEWS = _views()
_PAIR = operator.attrgetter("prompt_tokens", "output_tokens")


def _plain(queries: Sequence[pb.Query]) -> tuple[Tokens, Tokens]:
    pairs = np.array(list(map(_PAIR, queries)), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _query_columns(request: message.Message) -> tuple[Tokens, Tokens]:
    """(prompt_tokens, output_tokens) of `request.queries`. Discards the request's unknown
    fields (see the module doc)."""
    queries = request.queries  # type: ignore[attr-defined]
    n = len(queries)
    if n < _SMALL:
        return _plain(queries)
    number = request.DESCRIPTOR.fields_by_name["queries"].number
    request.DiscardUnknownFields()
    view = _VIEWS[number].FromString(request.SerializeToString())
    p = np.asarray(view.queries.prompt_tokens, dtype=np.int32)  # type: ignore[attr-defined]
    o = np.asarray(view.queries.output_tokens, dtype=np.int32)  # type: ignore[attr-defined]
    if p.size != n or o.size != n:  # a 0 somewhere: let the plain path name the query
        return _plain(queries)
    return p, o


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _packed(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _WIRE_LEN) + _varint(len(payload)) + payload


def _number(msg: type[message.Message], field: str) -> int:
    number: int = msg.DESCRIPTOR.fields_by_name[field].number
    return number


def _merge_doubles(msg: message.Message, field: str, values: npt.ArrayLike) -> None:
    """msg.<field> (repeated double, empty) = values, in one parse."""
    arr = np.asarray(values, dtype="<f8")
    if arr.size:
        msg.MergeFromString(_packed(_number(type(msg), field), arr.tobytes()))


def _merge_bools(msg: message.Message, field: str, values: npt.ArrayLike) -> None:
    """msg.<field> (repeated bool, empty) = values, in one parse."""
    arr = np.asarray(values, dtype=np.bool_).astype(np.uint8)
    if arr.size:
        msg.MergeFromString(_packed(_number(type(msg), field), arr.tobytes()))


def _record() -> tuple[np.dtype[np.void], dict[str, int]]:
    """The dtype of one `estimates` entry on the wire, and its constant bytes."""
    q = pb.QueryEstimate
    parts = [("entry", "u1"), ("length", "u1")]
    consts = {"entry": _number(pb.EstimateRuntimeResponse, "estimates") << 3 | _WIRE_LEN}
    size = 0
    for name in ("runtime_seconds", "low_seconds", "high_seconds"):
        parts += [(f"{name}_tag", "u1"), (name, "<f8")]
        consts[f"{name}_tag"] = _number(q, name) << 3 | _WIRE_I64
        size += 9
    parts += [("out_of_domain_tag", "u1"), ("out_of_domain", "u1")]
    consts["out_of_domain_tag"] = _number(q, "out_of_domain") << 3 | _WIRE_VARINT
    consts["length"] = size + 2
    assert all(c < 0x80 for c in consts.values())  # one-byte tags and length
    return np.dtype(parts), consts


_RECORD, _RECORD_CONSTS = _record()


def _merge_estimates(
    msg: pb.EstimateRuntimeResponse,
    runtime_s: npt.ArrayLike,
    low_s: npt.ArrayLike,
    high_s: npt.ArrayLike,
    out_of_domain: npt.ArrayLike,
) -> None:
    """msg.estimates (empty) = one QueryEstimate per query, in one parse."""
    rt = np.asarray(runtime_s, dtype=np.float64)
    rec = np.empty(rt.size, dtype=_RECORD)
    for name, value in _RECORD_CONSTS.items():
        rec[name] = value
    rec["runtime_seconds"] = rt
    rec["low_seconds"] = low_s
    rec["high_seconds"] = high_s
    rec["out_of_domain"] = np.asarray(out_of_domain, dtype=np.bool_)
    if rec.size:
        msg.MergeFromString(rec.tobytes())


# ---- the RPCs' conversions


def _workload(request: message.Message) -> tuple[Tokens, Tokens, bool]:
    """(prompt_tokens, output_tokens, columns) of a request with `queries` and the two
    packed columns: columns is True when the workload came as the columns."""
    p_col = request.prompt_tokens  # type: ignore[attr-defined]
    o_col = request.output_tokens  # type: ignore[attr-defined]
    if not (len(p_col) or len(o_col)):
        p, o = _query_columns(request)
        return p, o, False
    if len(request.queries):  # type: ignore[attr-defined]
        raise InvalidArgument(
            QUERIES_AMBIGUOUS,
            "give the workload either as queries or as the prompt_tokens and output_tokens "
            "columns, not both",
            field="queries",
        )
    if len(p_col) != len(o_col):
        raise InvalidArgument(
            QUERIES_INVALID,
            f"prompt_tokens and output_tokens differ in length ({len(p_col)} vs "
            f"{len(o_col)}); query i is (prompt_tokens[i], output_tokens[i])",
            field="output_tokens",
        )
    return np.asarray(p_col, dtype=np.int32), np.asarray(o_col, dtype=np.int32), True


def _summary(w: WorkloadEstimate, sum_iv: tuple[float, float] | None = None) -> pb.WorkloadSummary:
    pc = w.percentiles
    msg = pb.WorkloadSummary(
        count=w.count,
        sum_seconds=w.total_s,
        mean_seconds=w.mean_s,
        p50_seconds=pc.get(50.0, 0.0),
        p90_seconds=pc.get(90.0, 0.0),
        p99_seconds=pc.get(99.0, 0.0),
        out_of_domain=w.out_of_domain,
    )
    if sum_iv is not None:
        msg.sum_low_seconds, msg.sum_high_seconds = sum_iv
    return msg


def _estimate_response(r: EstimateResult, columns: bool) -> pb.EstimateRuntimeResponse:
    msg = pb.EstimateRuntimeResponse(summary=_summary(r.workload, r.sum_interval))
    if r.runtime_s is None:
        return msg
    n = len(r.runtime_s)
    ood = r.out_of_domain if r.out_of_domain is not None else np.zeros(n, dtype=bool)
    if columns:
        _merge_doubles(msg, "runtime_seconds", r.runtime_s)
        if r.low_s is not None and r.high_s is not None:
            _merge_doubles(msg, "low_seconds", r.low_s)
            _merge_doubles(msg, "high_seconds", r.high_s)
        _merge_bools(msg, "out_of_domain", ood)
        return msg
    low = r.low_s if r.low_s is not None else np.zeros(n)
    high = r.high_s if r.high_s is not None else np.zeros(n)
    if n >= _SMALL:
        _merge_estimates(msg, r.runtime_s, low, high, ood)
        return msg
    msg.estimates.extend(
        pb.QueryEstimate(
            runtime_seconds=float(a),
            low_seconds=float(b),
            high_seconds=float(c),
            out_of_domain=bool(d),
        )
        for a, b, c, d in zip(r.runtime_s, low, high, ood, strict=True)
    )
    return msg


def _roofline_points(points: Sequence[RooflinePoint]) -> list[pb.RooflinePoint]:
    return [
        pb.RooflinePoint(
            tokens=x.tokens,
            lower_bound_seconds=x.lower_bound_s,
            fitted_seconds=x.fitted_s,
            fraction_of_bound=x.fraction_of_bound,
        )
        for x in points
    ]


_DENOISE_METHODS = {pb.DENOISE_METHOD_MIN: "min", pb.DENOISE_METHOD_QUANTILE: "quantile"}


class MetricsServicer(pbg.MetricsServiceServicer):
    def __init__(self, engine: MetricsEngine) -> None:
        self.engine = engine

    def FitCostModel(
        self, request: pb.FitCostModelRequest, context: grpc.ServicerContext
    ) -> pb.FitCostModelResponse:
        o = request.options
        opts = FitOptions(
            fit_overhead=o.fit_overhead,
            bootstrap=DEFAULT_BOOTSTRAP if o.bootstrap == 0 else max(o.bootstrap, 0),
            beta_linear=not o.constant_beta,
            seed=o.seed,
        )
        cm = self.engine.fit(
            request.profile_id, opts, request_id=request.request_id, name=request.name
        )
        return pb.FitCostModelResponse(cost_model=cv.cost_model_to_pb(cm))

    def GetCostModel(
        self, request: pb.GetCostModelRequest, context: grpc.ServicerContext
    ) -> pb.GetCostModelResponse:
        return pb.GetCostModelResponse(cost_model=cv.cost_model_to_pb(self.engine.get(request.id)))

    def ListCostModels(
        self, request: pb.ListCostModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListCostModelsResponse:
        items, token = self.engine.list_models(
            request.page_size, request.page_token, request.profile_id
        )
        return pb.ListCostModelsResponse(
            cost_models=[cv.cost_model_to_pb(c) for c in items], next_page_token=token
        )

    def EstimateRuntime(
        self, request: pb.EstimateRuntimeRequest, context: grpc.ServicerContext
    ) -> pb.EstimateRuntimeResponse:
        p, o, columns = _workload(request)
        r = self.engine.estimate(
            request.cost_model_id,
            p,
            o,
            per_query=request.per_query,
            intervals=request.intervals,
            columns=columns,
        )
        return _estimate_response(r, columns)

    def StreamEstimateRuntime(
        self,
        request_iterator: Iterator[pb.StreamEstimateRuntimeRequest],
        context: grpc.ServicerContext,
    ) -> pb.StreamEstimateRuntimeResponse:
        chunks = (
            (c.cost_model_id, np.asarray(c.prompt_tokens), np.asarray(c.output_tokens))
            for c in request_iterator
        )
        return pb.StreamEstimateRuntimeResponse(
            summary=_summary(self.engine.stream_estimate(chunks))
        )

    def DenoiseCostModel(
        self, request: pb.DenoiseCostModelRequest, context: grpc.ServicerContext
    ) -> pb.DenoiseCostModelResponse:
        if request.method not in _DENOISE_METHODS:
            raise InvalidArgument(
                ENUM_UNSPECIFIED,
                "method must be DENOISE_METHOD_MIN or DENOISE_METHOD_QUANTILE",
                field="method",
            )
        cm = self.engine.denoise(
            request.profile_id,
            _DENOISE_METHODS[request.method],
            request.quantile or 0.1,
            request_id=request.request_id,
            name=request.name,
        )
        return pb.DenoiseCostModelResponse(cost_model=cv.cost_model_to_pb(cm))

    def ComputeCost(
        self, request: pb.ComputeCostRequest, context: grpc.ServicerContext
    ) -> pb.ComputeCostResponse:
        p, o, columns = _workload(request)
        r = self.engine.cost(
            CostRequest(
                cost_model_id=request.cost_model_id,
                prompt_tokens=p,
                output_tokens=o,
                columns=columns,
                accelerator=request.accelerator,
                spec=cv.spec_from_pb(request.model_spec, "model_spec")
                if request.HasField("model_spec")
                else None,
                dtype=cv.dtype_from_pb(request.dtype, "dtype") if request.dtype else "fp16",
                max_context=request.max_context,
                reserve_fraction=request.reserve_fraction or 0.1,
                power_of_two=request.power_of_two,
                prices=dict(request.price_per_hour_usd) or None,
                grid_g_co2_per_kwh=request.grid_g_co2_per_kwh or None,
            )
        )
        c = r.breakdown
        return pb.ComputeCostResponse(
            accelerators=r.accelerators,
            runtime_seconds=r.runtime_s,
            accelerator_seconds=c.accelerator_seconds,
            dollars=c.dollars,
            energy_joules=c.energy_j,
            energy_source=c.energy_source,
            co2_grams=c.co2_g or 0.0,
            energy_error=r.energy_error,
        )

    def ComputeRoofline(
        self, request: pb.ComputeRooflineRequest, context: grpc.ServicerContext
    ) -> pb.ComputeRooflineResponse:
        if not request.HasField("model_spec"):
            raise InvalidArgument(MODEL_SPEC_REQUIRED, "model_spec is required", field="model_spec")
        r = self.engine.roofline(
            RooflineRequest(
                spec=cv.spec_from_pb(request.model_spec, "model_spec"),
                dtype=cv.dtype_from_pb(request.dtype, "dtype"),
                accelerator=request.accelerator,
                peak_flops=request.peak_flops,
                bandwidth_bytes_s=request.bandwidth_bytes_per_second,
                prompt_tokens=list(request.prompt_tokens),
                contexts=list(request.contexts),
                cost_model_id=request.cost_model_id,
            )
        )
        return pb.ComputeRooflineResponse(
            prefill=_roofline_points(r.prefill), decode=_roofline_points(r.decode)
        )

    def CompareCostModels(
        self, request: pb.CompareCostModelsRequest, context: grpc.ServicerContext
    ) -> pb.CompareCostModelsResponse:
        p, o, columns = _workload(request)
        c = self.engine.compare(
            request.profile_id_a,
            request.profile_id_b,
            p,
            o,
            bootstrap=request.bootstrap,
            seed=request.seed,
            columns=columns,
        )
        return pb.CompareCostModelsResponse(
            ratio=c.ratio,
            ratio_low=c.low,
            ratio_high=c.high,
            significant=c.significant,
            a_total_seconds=c.a_total_s,
            b_total_seconds=c.b_total_s,
        )

    def ComputePareto(
        self, request: pb.ComputeParetoRequest, context: grpc.ServicerContext
    ) -> pb.ComputeParetoResponse:
        p, o, columns = _workload(request)
        r = self.engine.pareto(
            dict(request.cost_model_ids), p, o, request.accuracy_csv, columns=columns
        )
        return pb.ComputeParetoResponse(
            rows=[
                pb.ParetoPoint(
                    model=x.model,
                    cost_seconds=x.cost,
                    accuracy=x.accuracy,
                    on_frontier=x.on_frontier,
                )
                for x in r.rows
            ],
            missing_cost=list(r.missing_cost),
            missing_accuracy=list(r.missing_accuracy),
        )

    def ExportHelm(
        self, request: pb.ExportHelmRequest, context: grpc.ServicerContext
    ) -> pb.ExportHelmResponse:
        doc = self.engine.export_helm(dict(request.cost_model_ids), list(request.prompt_tokens))
        return pb.ExportHelmResponse(json=json.dumps(doc, indent=2))

    def ImportHelm(
        self, request: pb.ImportHelmRequest, context: grpc.ServicerContext
    ) -> pb.ImportHelmResponse:
        namespace = check_namespace(request.namespace, "namespace")
        cms = self.engine.import_helm_json(
            request.json, request.kind, request.request_id, namespace=namespace
        )
        return pb.ImportHelmResponse(cost_models=[cv.cost_model_to_pb(c) for c in cms])
