"""MetricsService: converts, calls the MetricsEngine and the metric functions, converts back."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import grpc
import numpy as np

from idealrt.core import convert as cv
from idealrt.core.costmodel.estimate import WorkloadEstimate
from idealrt.core.costmodel.fit import FitOptions
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP
from idealrt.core.errors import InvalidArgument
from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as pbg
from idealrt.services.metrics.engine import EstimateResult, MetricsEngine

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


class MetricsServicer(pbg.MetricsServiceServicer):
    def __init__(self, engine: MetricsEngine) -> None:
        self.engine = engine

    def FitCostModel(
        self, request: pb.FitCostModelRequest, context: grpc.ServicerContext
    ) -> pb.FitCostModelResponse:
        o = request.options
        if o.bootstrap > 10_000:
            raise InvalidArgument(
                "BOOTSTRAP_INVALID", "options.bootstrap must be <= 10000", field="options.bootstrap"
            )
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
        r = self.engine.estimate(request.cost_model_id, p, o, per_query=request.per_query)
        return pb.EstimateRuntimeResponse(
            estimates=_estimates(r), summary=_summary(r.workload, r.sum_interval)
        )

    def StreamEstimateRuntime(
        self,
        request_iterator: Iterator[pb.StreamEstimateRuntimeRequest],
        context: grpc.ServicerContext,
    ) -> pb.StreamEstimateRuntimeResponse:
        def chunks() -> Iterator[tuple[str, list[int], list[int]]]:
            for i, chunk in enumerate(request_iterator):
                if len(chunk.prompt_tokens) != len(chunk.output_tokens):
                    raise InvalidArgument(
                        "QUERIES_INVALID",
                        f"chunk {i}: prompt_tokens and output_tokens differ in length",
                        field="output_tokens",
                    )
                yield chunk.cost_model_id, list(chunk.prompt_tokens), list(chunk.output_tokens)

        return pb.StreamEstimateRuntimeResponse(
            summary=_summary(self.engine.stream_estimate(chunks()))
        )

    def DenoiseCostModel(
        self, request: pb.DenoiseCostModelRequest, context: grpc.ServicerContext
    ) -> pb.DenoiseCostModelResponse:
        methods = {pb.DENOISE_METHOD_MIN: "min", pb.DENOISE_METHOD_QUANTILE: "quantile"}
        if request.method not in methods:
            raise InvalidArgument(
                "ENUM_UNSPECIFIED",
                "method must be DENOISE_METHOD_MIN or DENOISE_METHOD_QUANTILE",
                field="method",
            )
        cm = self.engine.denoise(
            request.profile_id,
            methods[request.method],
            request.quantile or 0.1,
            request_id=request.request_id,
            name=request.name,
        )
        return pb.DenoiseCostModelResponse(cost_model=cv.cost_model_to_pb(cm))

    def ComputeCost(
        self, request: pb.ComputeCostRequest, context: grpc.ServicerContext
    ) -> pb.ComputeCostResponse:
        from idealrt.services.metrics.cost import accelerators_needed, cost_of, fit_energy_model

        cm = self.engine.get(request.cost_model_id)
        p, o = _queries(request.queries)
        r = self.engine.estimate(cm.id, p, o, per_query=False)
        if not request.accelerator:
            raise InvalidArgument(
                "ACCELERATOR_REQUIRED", "accelerator is required", field="accelerator"
            )
        spec = self.engine.spec_for(
            cm,
            cv.spec_from_pb(request.model_spec, "model_spec")
            if request.HasField("model_spec")
            else None,
        )
        dtype = cv.dtype_from_pb(request.dtype, "dtype") if request.dtype else "fp16"
        if spec is None:
            n = 1
        else:
            n = accelerators_needed(
                spec,
                dtype,
                request.accelerator,
                request.max_context or spec.max_positions,
                reserve_frac=request.reserve_fraction or 0.1,
                power_of_two=request.power_of_two,
            )
        energy = None
        if cm.profile_id and cm.kind == "idealized":
            try:
                energy = fit_energy_model(self.engine.samples_of(cm.profile_id))
            except Exception:
                energy = None
        c = cost_of(
            r.workload.total_s,
            n,
            request.accelerator,
            dict(request.price_per_hour_usd) or None,
            energy_model=energy,
            prompt_tokens=float(sum(p)),
            output_tokens=float(sum(o)),
            requests=float(len(p)),
            grid_g_co2_per_kwh=request.grid_g_co2_per_kwh or None,
        )
        return pb.ComputeCostResponse(
            accelerators=n,
            runtime_seconds=r.workload.total_s,
            accelerator_seconds=c.accelerator_seconds,
            dollars=c.dollars,
            energy_joules=c.energy_j,
            energy_source=c.energy_source,
            co2_grams=c.co2_g or 0.0,
        )

    def ComputeRoofline(
        self, request: pb.ComputeRooflineRequest, context: grpc.ServicerContext
    ) -> pb.ComputeRooflineResponse:
        from idealrt.core.hardware import accelerator
        from idealrt.services.metrics.roofline import (
            MeasuredHardware,
            fraction_of_bound,
            roofline,
        )

        if not request.HasField("model_spec"):
            raise InvalidArgument(
                "MODEL_SPEC_REQUIRED", "model_spec is required", field="model_spec"
            )
        spec = cv.spec_from_pb(request.model_spec, "model_spec")
        dtype = cv.dtype_from_pb(request.dtype, "dtype")
        hw: object
        if request.peak_flops > 0 and request.bandwidth_bytes_per_second > 0:
            hw = MeasuredHardware(
                mem_bandwidth_bytes_s=request.bandwidth_bytes_per_second,
                peak_flops_s=request.peak_flops,
            )
        else:
            hw = accelerator(request.accelerator or "cpu")
        ps = list(request.prompt_tokens) or [1, 128, 512]
        cs = list(request.contexts) or [128, 512]
        resp = pb.ComputeRooflineResponse()
        if request.cost_model_id:
            fr = fraction_of_bound(
                self.engine.get(request.cost_model_id),
                spec,
                hw,
                dtype,
                ps,
                cs,
            )
            for i, p in enumerate(fr.prompt_tokens):
                resp.prefill.add(
                    tokens=p,
                    lower_bound_seconds=float(fr.prefill_lower_s[i]),
                    fitted_seconds=float(fr.prefill_actual_s[i]),
                    fraction_of_bound=float(fr.prefill_fraction[i]),
                )
            for i, c in enumerate(fr.contexts):
                resp.decode.add(
                    tokens=c,
                    lower_bound_seconds=float(fr.decode_lower_s[i]),
                    fitted_seconds=float(fr.decode_actual_s[i]),
                    fraction_of_bound=float(fr.decode_fraction[i]),
                )
            return resp
        for p in ps:
            resp.prefill.add(
                tokens=p,
                lower_bound_seconds=roofline(spec, hw, dtype, p, p).prefill_s_lower,
            )
        for c in cs:
            resp.decode.add(
                tokens=c,
                lower_bound_seconds=roofline(spec, hw, dtype, 1, c).decode_s_lower,
            )
        return resp

    def CompareCostModels(
        self, request: pb.CompareCostModelsRequest, context: grpc.ServicerContext
    ) -> pb.CompareCostModelsResponse:
        from idealrt.services.metrics.compare import compare

        p, o = _queries(request.queries)
        if not p:
            raise InvalidArgument(
                "QUERIES_REQUIRED", "queries: give at least one query", field="queries"
            )
        if request.bootstrap < 0 or request.bootstrap > 5000:
            raise InvalidArgument(
                "BOOTSTRAP_INVALID", "bootstrap must be in [0, 5000]", field="bootstrap"
            )
        c = compare(
            self.engine.samples_of(request.profile_id_a),
            self.engine.samples_of(request.profile_id_b),
            p,
            o,
            n_boot=request.bootstrap or DEFAULT_BOOTSTRAP,
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

    def ExportHelm(
        self, request: pb.ExportHelmRequest, context: grpc.ServicerContext
    ) -> pb.ExportHelmResponse:
        doc = self.engine.export_helm(dict(request.cost_model_ids), list(request.prompt_tokens))
        return pb.ExportHelmResponse(json=json.dumps(doc, indent=2))

    def ImportHelm(
        self, request: pb.ImportHelmRequest, context: grpc.ServicerContext
    ) -> pb.ImportHelmResponse:
        try:
            doc = json.loads(request.json)
        except json.JSONDecodeError as err:
            raise InvalidArgument(
                "INVALID_HELM_JSON", f"json: not valid JSON ({err})", field="json"
            ) from None
        cms = self.engine.import_helm(doc, request.kind, request.request_id)
        return pb.ImportHelmResponse(cost_models=[cv.cost_model_to_pb(c) for c in cms])
