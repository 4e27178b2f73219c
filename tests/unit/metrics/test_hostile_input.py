"""Hostile input over real servers (store and metrics, each `build_server` on 127.0.0.1:0):
NaN/Inf and out-of-range numbers, too many queries, oversized or deeply nested JSON,
poisoned HELM tables and fits that end inconsistent are refused with a stable reason naming
the field (never INTERNAL); the server keeps answering and nothing stored changes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.clients.store import StoreClient
from idealrt.common.v1 import common_pb2 as cpb
from idealrt.core.config import MetricsConfig, StoreConfig
from idealrt.core.domain import (
    Backend,
    CostModel,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Sample,
    StackSpec,
)
from idealrt.core.grpc_server import GrpcServer
from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as pbg
from idealrt.services.metrics.server import build_server as build_metrics
from idealrt.services.metrics.validate import json_depth
from idealrt.services.store.server import build_server as build_store

from ..costmodel.test_fit import Truth, make_samples

MAX_QUERIES = 50
MAX_JSON_BYTES = 1 << 16
MAX_JSON_DEPTH = 8
ACCEL = "A100-80GB"
SPEC = cpb.ModelSpec(
    name="tiny", layers=2, d_model=64, heads=4, d_ff=128, vocab=100, max_positions=128,
    norm=cpb.NORM_LAYERNORM, activation=cpb.ACTIVATION_GELU, positional=cpb.POSITIONAL_LEARNED,
)  # fmt: skip


@dataclass
class Served:
    stub: pbg.MetricsServiceStub
    store: StoreClient
    profile_a: str
    profile_b: str
    cost_model: CostModel

    def snapshot(self) -> list[CostModel]:
        return self.store.list_cost_models(1000, "")[0]

    def queries(self, n: int = 2) -> list[pb.Query]:
        return [pb.Query(prompt_tokens=16 + i % 7, output_tokens=4) for i in range(n)]


def _profile(store: StoreClient, samples: list[Sample]) -> str:
    prof, _ = store.create_profile(
        Profile(
            id="",
            model=ModelRef(name="gpt2"),
            stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
            plan=ProfilePlan(prompt_tokens=(1,), output_tokens=(1,)),
        )
    )
    store.append_samples(prof.id, "b0", samples)
    store.update_profile(replace(prof, state=ProfileState.SUCCEEDED))
    return prof.id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data: Path = tmp_path_factory.mktemp("hostile")
    servers: list[GrpcServer] = []
    store_server, store_port = build_store(
        StoreConfig(address="127.0.0.1:0", store_url=f"sqlite:///{data}/store.db")
    )
    servers.append(store_server)
    metrics_server, metrics_port = build_metrics(
        MetricsConfig(
            address="127.0.0.1:0",
            store_target=f"127.0.0.1:{store_port}",
            max_queries_per_call=MAX_QUERIES,
            max_json_bytes=MAX_JSON_BYTES,
            max_json_depth=MAX_JSON_DEPTH,
        )
    )
    servers.append(metrics_server)
    store = StoreClient(f"127.0.0.1:{store_port}")
    channel = grpc.insecure_channel(f"127.0.0.1:{metrics_port}")
    grid: dict[str, Any] = {"prompts": (1, 64, 256), "outputs": (2, 16), "repeats": 3}
    a = _profile(store, make_samples(Truth(), **grid, noise=0.01, seed=1))
    b = _profile(store, make_samples(Truth(b0=0.012), **grid, noise=0.01, seed=2))
    stub = pbg.MetricsServiceStub(channel)
    fitted = stub.FitCostModel(
        pb.FitCostModelRequest(profile_id=a, options=pb.FitOptions(bootstrap=20)), timeout=120
    )
    try:
        yield Served(stub, store, a, b, store.get_cost_model(fitted.cost_model.id))
    finally:
        channel.close()
        store.close()
        for server in reversed(servers):
            server.stop(0)


def _refused(
    served: Served,
    call: Callable[[pbg.MetricsServiceStub], object],
    reason: str,
    field: str,
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
) -> None:
    """`call` fails with `code` and ErrorInfo(reason, field); no stored cost model changed
    or appeared; the server still answers."""
    before = served.snapshot()
    with pytest.raises(grpc.RpcError) as info:
        call(served.stub)
    err = info.value
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    assert (err.code(), detail.reason, detail.metadata["field"]) == (code, reason, field)
    assert served.snapshot() == before
    got = served.stub.GetCostModel(pb.GetCostModelRequest(id=served.cost_model.id), timeout=30)
    assert got.cost_model.id == served.cost_model.id


# ---- 2. JSON documents: size, depth, content --------------------------------------------


def _helm(table: dict[str, object], beta: object = 0.01) -> dict[str, object]:
    return {"runtime_per_output_token": beta, "runtime_for_prompt_tokens": table}


def _import(text: str) -> Callable[[pbg.MetricsServiceStub], object]:
    return lambda stub: stub.ImportHelm(pb.ImportHelmRequest(json=text), timeout=60)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 50_000,  # far past the parser's recursion limit (was RecursionError -> INTERNAL)
        '{"a":' * 2000 + "1" + "}" * 2000,
        "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),  # one level too many
        json.dumps({"m": {**_helm({"1": 0.1}), "extra": [[[[[[[[[1]]]]]]]]]}}),
    ],
)
def test_import_helm_refuses_deep_json(served: Served, text: str) -> None:
    _refused(served, _import(text), "JSON_TOO_DEEP", "json")


def test_import_helm_refuses_a_document_over_the_size_limit(served: Served) -> None:
    doc = {f"m/{i}": _helm({"1": 0.1}) for i in range(MAX_JSON_BYTES // 40)}
    text = json.dumps(doc)
    assert len(text) > MAX_JSON_BYTES
    _refused(served, _import(text), "JSON_TOO_LARGE", "json")
    multibyte = json.dumps({"ü" * (MAX_JSON_BYTES // 2): _helm({"1": 0.1})}, ensure_ascii=False)
    assert len(multibyte) <= MAX_JSON_BYTES < len(multibyte.encode())  # bytes, not characters
    _refused(served, _import(multibyte), "JSON_TOO_LARGE", "json")


@pytest.mark.parametrize("text", ["9" * 5000, "{", '{"m": NaN', ""])
def test_import_helm_refuses_text_that_is_not_json(served: Served, text: str) -> None:
    _refused(served, _import(text), "INVALID_HELM_JSON", "json")


def test_brackets_in_strings_do_not_count_as_nesting(served: Served) -> None:
    name = 'm/[[[[[[[[[[{{{{{{{{"\\'
    text = json.dumps({name: _helm({"1": 0.02, "64": 0.05})})
    assert json_depth(text) == 3
    got = served.stub.ImportHelm(pb.ImportHelmRequest(json=text), timeout=60)
    assert [c.name for c in got.cost_models] == [name]


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (_helm({"2147483648": 0.1}), '$["m/bad"]["runtime_for_prompt_tokens"]["2147483648"]'),
        (
            _helm({"9" * 4000: 0.1}),
            '$["m/bad"]["runtime_for_prompt_tokens"]["' + "9" * 64 + '..."]',
        ),
        (_helm({"1": 0.1}, beta=int("9" * 400)), '$["m/bad"]["runtime_per_output_token"]'),
        (_helm({"1": 1e300}), '$["m/bad"]["runtime_for_prompt_tokens"]["1"]'),
        (_helm({"1": math.inf}), '$["m/bad"]["runtime_for_prompt_tokens"]["1"]'),
    ],
)
def test_import_helm_refuses_poisoned_tables_and_stores_none(
    served: Served, entry: dict[str, object], field: str
) -> None:
    """A good model beside a bad one: neither is stored."""
    text = json.dumps({"m/good": _helm({"1": 0.02}), "m/bad": entry})
    _refused(served, _import(text), "INVALID_HELM_JSON", field)


# ---- 3. what the engine derives is checked before it is stored ----------------------------


def test_a_fit_that_ends_inconsistent_is_not_stored(served: Served) -> None:
    """Decode steps that grow so steeply with context that the fitted line crosses zero
    below the profiled contexts: beta0 < 0 is no usable cost model."""
    samples = []
    for p in (256, 512):
        for o in (2, 8):
            for r in range(3):
                steps = tuple(round((-0.002 + 2e-5 * (p + j + 1)) * 1e9) for j in range(o - 1))
                samples.append(Sample(p, o, 10**7, steps, 10**7 + sum(steps), repeat=r))
    pid = _profile(served.store, samples)
    req = pb.FitCostModelRequest(profile_id=pid, options=pb.FitOptions(bootstrap=3))
    _refused(
        served,
        lambda stub: stub.FitCostModel(req, timeout=60),
        "COST_MODEL_DEGENERATE",
        "profile_id",
        grpc.StatusCode.FAILED_PRECONDITION,
    )


# ---- 4. NaN, Inf and out-of-range numbers -------------------------------------------------


def _cost(**kw: Any) -> Callable[[Served], Callable[[pbg.MetricsServiceStub], object]]:
    def make(s: Served) -> Callable[[pbg.MetricsServiceStub], object]:
        req = pb.ComputeCostRequest(
            cost_model_id=s.cost_model.id, queries=s.queries(), accelerator=ACCEL, model_spec=SPEC
        )
        for key, value in kw.items():
            if key == "prices":
                req.price_per_hour_usd.update(value)
            elif key == "spec":
                req.model_spec.CopyFrom(value)
            else:
                setattr(req, key, value)
        return lambda stub: stub.ComputeCost(req, timeout=60)

    return make


def _roofline(**kw: Any) -> Callable[[Served], Callable[[pbg.MetricsServiceStub], object]]:
    def make(s: Served) -> Callable[[pbg.MetricsServiceStub], object]:
        req = pb.ComputeRooflineRequest(
            model_spec=SPEC, dtype=cpb.D_TYPE_FP16, accelerator=ACCEL, cost_model_id=s.cost_model.id
        )
        for key, value in kw.items():
            if isinstance(value, list):
                getattr(req, key).extend(value)
            else:
                setattr(req, key, value)
        return lambda stub: stub.ComputeRoofline(req, timeout=60)

    return make


def _denoise(quantile: float) -> Callable[[Served], Callable[[pbg.MetricsServiceStub], object]]:
    def make(s: Served) -> Callable[[pbg.MetricsServiceStub], object]:
        req = pb.DenoiseCostModelRequest(
            profile_id=s.profile_a, method=pb.DENOISE_METHOD_QUANTILE, quantile=quantile
        )
        return lambda stub: stub.DenoiseCostModel(req, timeout=60)

    return make


def _compare(**kw: Any) -> Callable[[Served], Callable[[pbg.MetricsServiceStub], object]]:
    def make(s: Served) -> Callable[[pbg.MetricsServiceStub], object]:
        req = pb.CompareCostModelsRequest(
            profile_id_a=s.profile_a, profile_id_b=s.profile_b, queries=s.queries(), **kw
        )
        return lambda stub: stub.CompareCostModels(req, timeout=60)

    return make


def _fit(**kw: Any) -> Callable[[Served], Callable[[pbg.MetricsServiceStub], object]]:
    def make(s: Served) -> Callable[[pbg.MetricsServiceStub], object]:
        req = pb.FitCostModelRequest(profile_id=s.profile_a, options=pb.FitOptions(**kw))
        return lambda stub: stub.FitCostModel(req, timeout=60)

    return make


def _estimate(p: int, o: int) -> Callable[[Served], Callable[[pbg.MetricsServiceStub], object]]:
    def make(s: Served) -> Callable[[pbg.MetricsServiceStub], object]:
        req = pb.EstimateRuntimeRequest(
            cost_model_id=s.cost_model.id, queries=[pb.Query(prompt_tokens=p, output_tokens=o)]
        )
        return lambda stub: stub.EstimateRuntime(req, timeout=60)

    return make


HUGE = cpb.ModelSpec()
HUGE.CopyFrom(SPEC)
HUGE.layers, HUGE.d_model, HUGE.heads = 2**31 - 1, 2**30, 1
HUGE.d_ff, HUGE.vocab, HUGE.max_positions = 2**31 - 1, 2**31 - 1, 2**31 - 1
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("make", "reason", "field"),
    [
        (_cost(reserve_fraction=NAN), "RESERVE_FRAC_INVALID", "reserve_fraction"),
        (_cost(reserve_fraction=1.0), "RESERVE_FRAC_INVALID", "reserve_fraction"),
        (_cost(reserve_fraction=-0.5), "RESERVE_FRAC_INVALID", "reserve_fraction"),
        (_cost(prices={ACCEL: INF}), "PRICE_INVALID", f"price_per_hour_usd[{ACCEL}]"),
        (_cost(prices={ACCEL: NAN}), "PRICE_INVALID", f"price_per_hour_usd[{ACCEL}]"),
        (_cost(prices={"H100-80GB": -1.0}), "PRICE_INVALID", "price_per_hour_usd[H100-80GB]"),
        (_cost(grid_g_co2_per_kwh=INF), "GRID_INTENSITY_INVALID", "grid_g_co2_per_kwh"),
        (_cost(grid_g_co2_per_kwh=NAN), "GRID_INTENSITY_INVALID", "grid_g_co2_per_kwh"),
        (_cost(grid_g_co2_per_kwh=-1.0), "GRID_INTENSITY_INVALID", "grid_g_co2_per_kwh"),
        (_cost(max_context=-1), "MAX_CONTEXT_INVALID", "max_context"),
        (_cost(spec=HUGE, max_context=2**31 - 1), "ACCELERATORS_INVALID", "max_context"),
        (_roofline(peak_flops=NAN), "HARDWARE_LIMITS_INVALID", "peak_flops"),
        (_roofline(peak_flops=INF, bandwidth_bytes_per_second=1e12), "HARDWARE_LIMITS_INVALID",
         "peak_flops"),
        (_roofline(bandwidth_bytes_per_second=-1.0), "HARDWARE_LIMITS_INVALID",
         "bandwidth_bytes_per_second"),
        (_roofline(bandwidth_bytes_per_second=INF), "HARDWARE_LIMITS_INVALID",
         "bandwidth_bytes_per_second"),
        (_roofline(prompt_tokens=[16, 0]), "TOKENS_INVALID", "prompt_tokens[1]"),
        (_roofline(contexts=[-5]), "TOKENS_INVALID", "contexts[0]"),
        (_denoise(NAN), "QUANTILE_INVALID", "quantile"),
        (_denoise(INF), "QUANTILE_INVALID", "quantile"),
        (_denoise(-0.1), "QUANTILE_INVALID", "quantile"),
        (_compare(seed=-1, bootstrap=20), "SEED_INVALID", "seed"),
        (_compare(bootstrap=-1), "BOOTSTRAP_INVALID", "bootstrap"),
        (_compare(bootstrap=10**6), "BOOTSTRAP_INVALID", "bootstrap"),
        (_fit(seed=-1, bootstrap=3), "INVALID_FIT_OPTIONS", "options.seed"),
        (_fit(bootstrap=10**6), "BOOTSTRAP_INVALID", "options.bootstrap"),
        (_estimate(0, 4), "QUERY_TOKENS_INVALID", "queries[0].prompt_tokens"),
        (_estimate(4, -1), "QUERY_TOKENS_INVALID", "queries[0].output_tokens"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_refused(
    served: Served,
    make: Callable[[Served], Callable[[pbg.MetricsServiceStub], object]],
    reason: str,
    field: str,
) -> None:
    _refused(served, make(served), reason, field)


def test_an_unreadable_accuracy_csv_is_refused(served: Served) -> None:
    req = pb.ComputeParetoRequest(
        cost_model_ids={"a": served.cost_model.id},
        queries=served.queries(),
        accuracy_csv="a," + "1" * 200_000,  # beyond the csv module's field limit
    )
    _refused(
        served,
        lambda stub: stub.ComputePareto(req, timeout=60),
        "ACCURACY_CSV_INVALID",
        "accuracy_csv",
    )


# ---- 5. queries per unary call -------------------------------------------------------------


@pytest.mark.parametrize(
    "rpc", ["EstimateRuntime", "ComputeCost", "CompareCostModels", "ComputePareto"]
)
def test_queries_beyond_the_per_call_limit_are_refused(served: Served, rpc: str) -> None:
    qs = served.queries(MAX_QUERIES + 1)
    cm = served.cost_model.id
    requests: dict[str, object] = {
        "EstimateRuntime": pb.EstimateRuntimeRequest(cost_model_id=cm, queries=qs),
        "ComputeCost": pb.ComputeCostRequest(
            cost_model_id=cm, queries=qs, accelerator=ACCEL, model_spec=SPEC
        ),
        "CompareCostModels": pb.CompareCostModelsRequest(
            profile_id_a=served.profile_a, profile_id_b=served.profile_b, queries=qs
        ),
        "ComputePareto": pb.ComputeParetoRequest(
            cost_model_ids={"a": cm}, queries=qs, accuracy_csv="a,0.5"
        ),
    }
    req = requests[rpc]
    _refused(
        served, lambda stub: getattr(stub, rpc)(req, timeout=60), "QUERIES_TOO_MANY", "queries"
    )


def test_the_limit_itself_and_streams_are_fine(served: Served) -> None:
    cm = served.cost_model.id
    at = served.stub.EstimateRuntime(
        pb.EstimateRuntimeRequest(cost_model_id=cm, queries=served.queries(MAX_QUERIES)),
        timeout=60,
    )
    assert at.summary.count == MAX_QUERIES
    chunks = [
        pb.StreamEstimateRuntimeRequest(
            cost_model_id=cm, prompt_tokens=[16] * MAX_QUERIES, output_tokens=[4] * MAX_QUERIES
        )
        for _ in range(3)
    ]
    streamed = served.stub.StreamEstimateRuntime(iter(chunks), timeout=60)
    assert streamed.summary.count == 3 * MAX_QUERIES


# ---- 6. records from elsewhere cannot make the engine run away ---------------------------


def test_fit_options_no_fit_here_could_have_written_fall_back_to_the_defaults(
    served: Served,
) -> None:
    """A model stored through the store's own API, asking its replicates to be re-derived
    with a million bootstrap refits: intervals come from the default options instead."""
    options = dict(served.cost_model.fit_options, bootstrap="1000000")
    fresh = replace(served.cost_model, id="", request_id="", fit_options=options)
    copy, _ = served.store.create_cost_model(fresh)
    got = served.stub.EstimateRuntime(
        pb.EstimateRuntimeRequest(
            cost_model_id=copy.id, queries=served.queries(), per_query=True, intervals=True
        ),
        timeout=120,
    )
    assert got.summary.sum_low_seconds <= got.summary.sum_seconds <= got.summary.sum_high_seconds
    assert all(np.isfinite(q.runtime_seconds) for q in got.estimates)


def test_an_error_echoing_a_huge_input_still_arrives_as_that_error(served: Served) -> None:
    """An accelerator name of 70,000 characters is echoed in the error message; the server
    caps the message (core.grpc_server.MAX_MESSAGE_CHARS), so the client gets the
    INVALID_ARGUMENT itself, not RESOURCE_EXHAUSTED for oversized trailing metadata."""
    _refused(served, _cost(accelerator="x" * 70_000)(served), "UNKNOWN_ACCELERATOR", "accelerator")


# ---- issue 11: failures surface (missing spec, unusable energy readings) -----------------


def test_cost_without_a_spec_to_use_is_a_failed_precondition(served: Served) -> None:
    """A cost model with no profile to take a spec from, and no model_spec in the request:
    FAILED_PRECONDITION MODEL_SPEC_MISSING (it used to price one accelerator silently)."""
    orphan, _ = served.store.create_cost_model(
        replace(served.cost_model, id="", request_id="", profile_id="")
    )
    req = pb.ComputeCostRequest(
        cost_model_id=orphan.id, queries=served.queries(), accelerator=ACCEL
    )
    _refused(
        served,
        lambda stub: stub.ComputeCost(req, timeout=60),
        "MODEL_SPEC_MISSING",
        "model_spec",
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def test_unusable_energy_readings_are_a_labelled_field(served: Served) -> None:
    """The cost model's profile is not SUCCEEDED, so its samples cannot be read for energy:
    the cost is still answered (energy from TDP) and energy_error says why."""
    pending, _ = served.store.create_profile(
        Profile(
            id="",
            model=ModelRef(name="gpt2"),
            stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
            plan=ProfilePlan(prompt_tokens=(1,), output_tokens=(1,)),
        )
    )
    cm, _ = served.store.create_cost_model(
        replace(served.cost_model, id="", request_id="", profile_id=pending.id)
    )
    req = pb.ComputeCostRequest(
        cost_model_id=cm.id, queries=served.queries(), accelerator=ACCEL, model_spec=SPEC
    )
    got = served.stub.ComputeCost(req, timeout=60)
    assert got.energy_source == "tdp"
    assert got.energy_error.startswith("PROFILE_NOT_SUCCEEDED")


def test_pareto_without_cost_models_is_refused(served: Served) -> None:
    req = pb.ComputeParetoRequest(queries=served.queries(), accuracy_csv="a,0.5\n")
    _refused(
        served,
        lambda stub: stub.ComputePareto(req, timeout=60),
        "COST_MODEL_IDS_REQUIRED",
        "cost_model_ids",
    )
