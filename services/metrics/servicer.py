"""MetricsService: each RPC converts its request, makes one MetricsEngine call, converts back."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import grpc
import numpy as np

from idealrt.core import convert as cv
from idealrt.core.costmodel.estimate import WorkloadEstimate
from idealrt.core.costmodel.fit import FitOptions
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP
from idealrt.core.errors import InvalidArgument
from idealrt.core.namespaces import check_namespace
from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as pbg
from idealrt.services.metrics.engine import (
    CostRequest,
    EstimateResult,
    MetricsEngine,
    RooflinePoint,
    RooflineRequest,
)
from idealrt.services.metrics.reasons import ENUM_UNSPECIFIED, MODEL_SPEC_REQUIRED

__all__ = ["MetricsServicer"]


def _queries(qs: Iterable[pb.Query]) -> tuple[list[int], list[int]]:
    items = list(qs)
    return [q.prompt_tokens for q in items], [q.output_tokens for q in items]


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


def _estimates(r: EstimateResult) -> list[pb.QueryEstimate]:
    if r.runtime_s is None:
        return []
    n = len(r.runtime_s)
    low = r.low_s if r.low_s is not None else np.zeros(n)
    high = r.high_s if r.high_s is not None else np.zeros(n)
    ood = r.out_of_domain if r.out_of_domain is not None else np.zeros(n, dtype=bool)
    return [
        pb.QueryEstimate(
            runtime_seconds=float(a),
            low_seconds=float(b),
            high_seconds=float(c),
            out_of_domain=bool(d),
        )
        for a, b, c, d in zip(r.runtime_s, low, high, ood, strict=True)
    ]


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
        p, o = _queries(request.queries)
        r = self.engine.estimate(
            request.cost_model_id, p, o, per_query=request.per_query, intervals=request.intervals
        )
        return pb.EstimateRuntimeResponse(
            estimates=_estimates(r), summary=_summary(r.workload, r.sum_interval)
        )

    def StreamEstimateRuntime(
        self,
        request_iterator: Iterator[pb.StreamEstimateRuntimeRequest],
        context: grpc.ServicerContext,
    ) -> pb.StreamEstimateRuntimeResponse:
        chunks = (
            (c.cost_model_id, list(c.prompt_tokens), list(c.output_tokens))
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
        p, o = _queries(request.queries)
        r = self.engine.cost(
            CostRequest(
                cost_model_id=request.cost_model_id,
                prompt_tokens=p,
                output_tokens=o,
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
        p, o = _queries(request.queries)
        c = self.engine.compare(
            request.profile_id_a,
            request.profile_id_b,
            p,
            o,
            bootstrap=request.bootstrap,
            seed=request.seed,
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
        p, o = _queries(request.queries)
        r = self.engine.pareto(dict(request.cost_model_ids), p, o, request.accuracy_csv)
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
