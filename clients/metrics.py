"""Client of the MetricsService.

Workloads travel as the requests' packed `prompt_tokens` / `output_tokens` columns (a few
bytes a query, no message per query on either side), and per-query estimates come back
as the response's packed columns, read into numpy with one copy each. This needs a
metrics service that knows the columns (this release's); one that does not sees an empty
workload (QUERIES_REQUIRED)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from idealrt.clients._channel import ClientChannel
from idealrt.core import convert as cv
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP
from idealrt.core.domain import CostModel
from idealrt.core.grpc_client import (
    call,
    request_id_or_new,
)
from idealrt.core.model_spec import ModelSpec
from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as pbg

__all__ = [
    "Comparison",
    "CostReport",
    "Estimates",
    "MetricsClient",
    "ParetoResult",
    "ParetoRow",
    "Summary",
]

STREAM_CHUNK = 65536


@dataclasses.dataclass(frozen=True)
class Summary:
    count: int
    sum_s: float
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    out_of_domain: int
    sum_low_s: float = 0.0
    sum_high_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Estimates:
    runtime_s: npt.NDArray[np.float64]
    low_s: npt.NDArray[np.float64]
    high_s: npt.NDArray[np.float64]
    out_of_domain: npt.NDArray[np.bool_]
    summary: Summary


@dataclasses.dataclass(frozen=True)
class CostReport:
    accelerators: int
    runtime_s: float
    accelerator_s: float
    dollars: float
    energy_j: float
    energy_source: str
    co2_g: float
    energy_error: str = ""  # why metered energy could not be used (then energy is from TDP)


@dataclasses.dataclass(frozen=True)
class Comparison:
    ratio: float
    low: float
    high: float
    significant: bool
    a_total_s: float
    b_total_s: float


@dataclasses.dataclass(frozen=True)
class ParetoRow:
    model: str
    cost: float  # idealized runtime of the workload, seconds
    accuracy: float
    on_frontier: bool


@dataclasses.dataclass(frozen=True)
class ParetoResult:
    """Rows sorted by cost (then accuracy, best first), and the models left unjoined."""

    rows: tuple[ParetoRow, ...]
    missing_cost: tuple[str, ...] = ()
    missing_accuracy: tuple[str, ...] = ()

    @property
    def frontier(self) -> tuple[ParetoRow, ...]:
        return tuple(r for r in self.rows if r.on_frontier)


def _summary(m: pb.WorkloadSummary) -> Summary:
    return Summary(
        count=m.count,
        sum_s=m.sum_seconds,
        mean_s=m.mean_seconds,
        p50_s=m.p50_seconds,
        p90_s=m.p90_seconds,
        p99_s=m.p99_seconds,
        out_of_domain=m.out_of_domain,
        sum_low_s=m.sum_low_seconds,
        sum_high_s=m.sum_high_seconds,
    )


Tokens = Sequence[int] | npt.NDArray[np.integer[Any]]


def _extend(column: Any, values: Tokens) -> None:
    """Append token counts to a packed field one by one (the slow path: values that are
    not all int32 integers, e.g. floats, go through int() as they always did)."""
    try:
        column.extend(values)
    except TypeError:
        del column[:]
        column.extend(int(v) for v in values)


_INT32 = np.iinfo(np.int32)
_WIRE_LEN = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _column(number: int, values: Tokens) -> bytes | None:
    """The wire encoding of packed sfixed32 field `number` = `values` (a little-endian
    int32 array: one copy of a numpy array, one conversion of a list), or None when the
    values are not all int32 integers (then the slow path)."""
    try:
        arr = values if isinstance(values, np.ndarray) else np.array(values, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        return None
    if arr.size and (int(arr.min()) < _INT32.min or int(arr.max()) > _INT32.max):
        return None
    payload = arr.astype("<i4", copy=False).tobytes()
    return _varint(number << 3 | _WIRE_LEN) + _varint(len(payload)) + payload if payload else b""


M = TypeVar("M", bound=Message)


def _wire_columns(msg: Message, p: Tokens, o: Tokens) -> bytes | None:
    """The wire encoding of `msg`'s prompt_tokens / output_tokens columns = p, o (None
    when they are not all int32 integers); ValueError on lengths that differ, as pairing
    them one to one always raised. A message's encoding followed by these bytes is the
    message with the columns set (protobuf merges concatenated encodings)."""
    if len(p) != len(o):
        raise ValueError(f"prompt_tokens and output_tokens differ in length ({len(p)} vs {len(o)})")
    fields = msg.DESCRIPTOR.fields_by_name
    wire = [
        _column(fields[name].number, v) for name, v in (("prompt_tokens", p), ("output_tokens", o))
    ]
    if wire[0] is None or wire[1] is None:
        return None
    return wire[0] + wire[1]


def _with_columns(msg: M, p: Tokens, o: Tokens) -> M:
    """`msg` with its prompt_tokens / output_tokens columns set (ValueError on lengths
    that differ)."""
    wire = _wire_columns(msg, p, o)
    if wire is not None:
        msg.MergeFromString(wire)
        return msg
    _extend(msg.prompt_tokens, p)  # type: ignore[attr-defined]
    _extend(msg.output_tokens, o)  # type: ignore[attr-defined]
    return msg


def _floats(values: Any, n: int) -> npt.NDArray[np.float64]:
    """A packed double column of a response; zeros when the server sent none."""
    return np.asarray(values, dtype=np.float64) if len(values) else np.zeros(n)


class MetricsClient(ClientChannel):
    """ClientChannel(target, timeout, tls=, token=) on the MetricsService."""

    _STUB = pbg.MetricsServiceStub
    _stub: pbg.MetricsServiceStub
    _raw_estimate: Any = None

    def _estimate_wire(self) -> Any:
        """EstimateRuntime taking the request's encoded bytes (what the stub's serializer
        would produce), so a large workload's columns go to the channel without being
        parsed into a message and serialized again."""
        if self._raw_estimate is None:
            self._raw_estimate = self._channel.unary_unary(
                f"/{pb.DESCRIPTOR.services_by_name['MetricsService'].full_name}/EstimateRuntime",
                request_serializer=None,  # bytes as they are
                response_deserializer=pb.EstimateRuntimeResponse.FromString,
            )
        return self._raw_estimate

    def fit(
        self,
        profile_id: str,
        *,
        request_id: str = "",
        name: str = "",
        fit_overhead: bool = False,
        bootstrap: int = 0,
        constant_beta: bool = False,
        seed: int = 0,
    ) -> CostModel:
        r = call(
            self._stub.FitCostModel,
            pb.FitCostModelRequest(
                request_id=request_id_or_new(request_id),
                profile_id=profile_id,
                name=name,
                options=pb.FitOptions(
                    fit_overhead=fit_overhead,
                    bootstrap=bootstrap,
                    constant_beta=constant_beta,
                    seed=seed,
                ),
            ),
            max(self.timeout, 300.0),
        )
        return cv.cost_model_from_pb(r.cost_model)

    def get_cost_model(self, id: str) -> CostModel:
        r = call(self._stub.GetCostModel, pb.GetCostModelRequest(id=id), self.timeout)
        return cv.cost_model_from_pb(r.cost_model)

    def list_cost_models(
        self, page_size: int = 0, page_token: str = "", profile_id: str = ""
    ) -> tuple[list[CostModel], str]:
        r = call(
            self._stub.ListCostModels,
            pb.ListCostModelsRequest(
                page_size=page_size, page_token=page_token, profile_id=profile_id
            ),
            self.timeout,
        )
        return [cv.cost_model_from_pb(c) for c in r.cost_models], r.next_page_token

    def estimate(
        self,
        cost_model_id: str,
        prompt_tokens: Tokens,
        output_tokens: Tokens,
        per_query: bool = True,
        intervals: bool = False,
    ) -> Estimates:
        """Runtime estimates; 95% intervals (low_s/high_s, sum_low_s/sum_high_s) only with
        `intervals` (otherwise zeros: the server does no bootstrap work). Without
        `per_query` the per-query arrays are empty."""
        head = pb.EstimateRuntimeRequest(
            cost_model_id=cost_model_id, per_query=per_query, intervals=intervals
        )
        wire = _wire_columns(head, prompt_tokens, output_tokens)
        if wire is not None:  # the columns' bytes as they are: no message built or copied
            r = call(self._estimate_wire(), head.SerializeToString() + wire, self.timeout)
        else:
            r = call(
                self._stub.EstimateRuntime,
                _with_columns(head, prompt_tokens, output_tokens),
                self.timeout,
            )
        est = r.estimates
        if est:  # a server that answers in messages
            return Estimates(
                runtime_s=np.array([e.runtime_seconds for e in est], dtype=np.float64),
                low_s=np.array([e.low_seconds for e in est], dtype=np.float64),
                high_s=np.array([e.high_seconds for e in est], dtype=np.float64),
                out_of_domain=np.array([e.out_of_domain for e in est], dtype=np.bool_),
                summary=_summary(r.summary),
            )
        n = len(r.runtime_seconds)
        return Estimates(
            runtime_s=np.asarray(r.runtime_seconds, dtype=np.float64),
            low_s=_floats(r.low_seconds, n),
            high_s=_floats(r.high_seconds, n),
            out_of_domain=np.asarray(r.out_of_domain, dtype=np.bool_).reshape(n),
            summary=_summary(r.summary),
        )

    def stream_estimate(
        self, cost_model_id: str, chunks: Iterable[tuple[Sequence[int], Sequence[int]]]
    ) -> Summary:
        def requests() -> Iterable[pb.StreamEstimateRuntimeRequest]:
            first = True
            for p, o in chunks:
                for i in range(0, len(p), STREAM_CHUNK):
                    msg = pb.StreamEstimateRuntimeRequest(
                        cost_model_id=cost_model_id if first else ""
                    )
                    _extend(msg.prompt_tokens, p[i : i + STREAM_CHUNK])
                    _extend(msg.output_tokens, o[i : i + STREAM_CHUNK])
                    yield msg
                    first = False

        r = call(self._stub.StreamEstimateRuntime, requests(), max(self.timeout, 600.0))
        return _summary(r.summary)

    def denoise(
        self,
        profile_id: str,
        *,
        method: str = "quantile",
        quantile: float = 0.1,
        request_id: str = "",
        name: str = "",
    ) -> CostModel:
        m = {"min": pb.DENOISE_METHOD_MIN, "quantile": pb.DENOISE_METHOD_QUANTILE}[method]
        r = call(
            self._stub.DenoiseCostModel,
            pb.DenoiseCostModelRequest(
                request_id=request_id_or_new(request_id),
                profile_id=profile_id,
                method=m,
                quantile=quantile,
                name=name,
            ),
            max(self.timeout, 300.0),
        )
        return cv.cost_model_from_pb(r.cost_model)

    def cost(
        self,
        cost_model_id: str,
        prompt_tokens: Tokens,
        output_tokens: Tokens,
        *,
        accelerator: str,
        spec: ModelSpec | None = None,
        dtype: str = "fp16",
        max_context: int = 0,
        reserve_fraction: float = 0.1,
        power_of_two: bool = True,
        prices: Mapping[str, float] | None = None,
        grid_g_co2_per_kwh: float = 0.0,
    ) -> CostReport:
        req = pb.ComputeCostRequest(
            cost_model_id=cost_model_id,
            accelerator=accelerator,
            dtype=cv.dtype_to_pb(dtype),
            max_context=max_context,
            reserve_fraction=reserve_fraction,
            power_of_two=power_of_two,
            price_per_hour_usd=dict(prices or {}),
            grid_g_co2_per_kwh=grid_g_co2_per_kwh,
        )
        _with_columns(req, prompt_tokens, output_tokens)
        if spec is not None:
            req.model_spec.CopyFrom(cv.spec_to_pb(spec))
        r = call(self._stub.ComputeCost, req, self.timeout)
        return CostReport(
            accelerators=r.accelerators,
            runtime_s=r.runtime_seconds,
            accelerator_s=r.accelerator_seconds,
            dollars=r.dollars,
            energy_j=r.energy_joules,
            energy_source=r.energy_source,
            co2_g=r.co2_grams,
            energy_error=r.energy_error,
        )

    def roofline(
        self,
        spec: ModelSpec,
        *,
        dtype: str = "fp32",
        accelerator: str = "",
        peak_flops: float = 0.0,
        bandwidth: float = 0.0,
        prompt_tokens: Sequence[int] = (),
        contexts: Sequence[int] = (),
        cost_model_id: str = "",
    ) -> dict[str, list[dict[str, Any]]]:
        r = call(
            self._stub.ComputeRoofline,
            pb.ComputeRooflineRequest(
                model_spec=cv.spec_to_pb(spec),
                dtype=cv.dtype_to_pb(dtype),
                accelerator=accelerator,
                peak_flops=peak_flops,
                bandwidth_bytes_per_second=bandwidth,
                prompt_tokens=list(prompt_tokens),
                contexts=list(contexts),
                cost_model_id=cost_model_id,
            ),
            self.timeout,
        )

        def pts(items: Iterable[pb.RooflinePoint]) -> list[dict[str, Any]]:
            return [
                {
                    "tokens": x.tokens,
                    "lower_bound_s": x.lower_bound_seconds,
                    "fitted_s": x.fitted_seconds,
                    "fraction_of_bound": x.fraction_of_bound,
                }
                for x in items
            ]

        return {"prefill": pts(r.prefill), "decode": pts(r.decode)}

    def compare(
        self,
        profile_id_a: str,
        profile_id_b: str,
        prompt_tokens: Tokens,
        output_tokens: Tokens,
        *,
        bootstrap: int = DEFAULT_BOOTSTRAP,
        seed: int = 0,
    ) -> Comparison:
        r = call(
            self._stub.CompareCostModels,
            _with_columns(
                pb.CompareCostModelsRequest(
                    profile_id_a=profile_id_a,
                    profile_id_b=profile_id_b,
                    bootstrap=bootstrap,
                    seed=seed,
                ),
                prompt_tokens,
                output_tokens,
            ),
            max(self.timeout, 600.0),
        )
        return Comparison(
            ratio=r.ratio,
            low=r.ratio_low,
            high=r.ratio_high,
            significant=r.significant,
            a_total_s=r.a_total_seconds,
            b_total_s=r.b_total_seconds,
        )

    def pareto(
        self,
        cost_model_ids: Mapping[str, str],
        prompt_tokens: Tokens,
        output_tokens: Tokens,
        accuracy_csv: str,
    ) -> ParetoResult:
        """The efficiency-capability frontier: each model's workload runtime on its cost
        model (`cost_model_ids`: model name -> id) against its accuracy (CSV text)."""
        r = call(
            self._stub.ComputePareto,
            _with_columns(
                pb.ComputeParetoRequest(
                    cost_model_ids=dict(cost_model_ids), accuracy_csv=accuracy_csv
                ),
                prompt_tokens,
                output_tokens,
            ),
            self.timeout,
        )
        return ParetoResult(
            rows=tuple(
                ParetoRow(x.model, x.cost_seconds, x.accuracy, x.on_frontier) for x in r.rows
            ),
            missing_cost=tuple(r.missing_cost),
            missing_accuracy=tuple(r.missing_accuracy),
        )

    def export_helm(
        self, cost_model_ids: Mapping[str, str], prompt_tokens: Sequence[int] = ()
    ) -> dict[str, Any]:
        r = call(
            self._stub.ExportHelm,
            pb.ExportHelmRequest(
                cost_model_ids=dict(cost_model_ids), prompt_tokens=list(prompt_tokens)
            ),
            self.timeout,
        )
        doc: dict[str, Any] = json.loads(r.json)
        return doc

    def import_helm(
        self,
        doc: Mapping[str, Any],
        *,
        kind: str = "idealized",
        request_id: str = "",
        namespace: str = "",
    ) -> list[CostModel]:
        """Store the cost models of a HELM document in `namespace` ("": default)."""
        r = call(
            self._stub.ImportHelm,
            pb.ImportHelmRequest(
                request_id=request_id_or_new(request_id),
                json=json.dumps(doc),
                kind=kind,
                namespace=namespace,
            ),
            self.timeout,
        )
        return [cv.cost_model_from_pb(c) for c in r.cost_models]
