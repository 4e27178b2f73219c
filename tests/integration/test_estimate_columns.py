"""EstimateRuntime (and ComputeCost, ComputePareto, CompareCostModels) over real servers
(store and metrics, each `build_server` on 127.0.0.1:0): the workload as packed columns
gives what it gives as queries, per-query answers come back in the request's form, the
client library sends columns and keeps its API, and requests that mix or mismatch the
forms are refused naming the field."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.clients.metrics import MetricsClient
from idealrt.clients.store import StoreClient
from idealrt.core.config import MetricsConfig, StoreConfig
from idealrt.core.domain import Backend, ModelRef, Profile, ProfilePlan, ProfileState, StackSpec
from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as pbg
from idealrt.services.metrics.server import build_server as build_metrics
from idealrt.services.store.server import build_server as build_store

from ..unit.costmodel.test_fit import Truth, make_samples

MAX_QUERIES = 20_000
ACCEL = "A100-80GB"


@dataclasses.dataclass
class Served:
    stub: pbg.MetricsServiceStub
    target: str
    profile_a: str
    profile_b: str
    cost_model: str


def _profile(store: StoreClient, truth: Truth, seed: int) -> str:
    prof, _ = store.create_profile(
        Profile(
            id="",
            model=ModelRef(name="gpt2"),
            stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
            plan=ProfilePlan(prompt_tokens=(1,), output_tokens=(1,)),
        )
    )
    grid: dict[str, Any] = {"prompts": (1, 64, 256, 1024), "outputs": (2, 16, 64), "repeats": 3}
    store.append_samples(prof.id, "b0", make_samples(truth, **grid, noise=0.01, seed=seed))
    store.update_profile(dataclasses.replace(prof, state=ProfileState.SUCCEEDED))
    return prof.id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data: Path = tmp_path_factory.mktemp("columns")
    store_server, store_port = build_store(
        StoreConfig(address="127.0.0.1:0", store_url=f"sqlite:///{data}/store.db")
    )
    metrics_server, metrics_port = build_metrics(
        MetricsConfig(
            address="127.0.0.1:0",
            store_target=f"127.0.0.1:{store_port}",
            max_queries_per_call=MAX_QUERIES,
        )
    )
    store = StoreClient(f"127.0.0.1:{store_port}")
    target = f"127.0.0.1:{metrics_port}"
    channel = grpc.insecure_channel(target)
    try:
        a = _profile(store, Truth(), 1)
        b = _profile(store, Truth(b0=0.012), 2)
        stub = pbg.MetricsServiceStub(channel)
        fitted = stub.FitCostModel(
            pb.FitCostModelRequest(profile_id=a, options=pb.FitOptions(bootstrap=30)),
            timeout=120,
        )
        yield Served(stub, target, a, b, fitted.cost_model.id)
    finally:
        channel.close()
        store.close()
        metrics_server.stop(0)
        store_server.stop(0)


def _workload(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 3000, size=n).tolist(), rng.integers(1, 200, size=n).tolist()


def _queries(p: list[int], o: list[int]) -> list[pb.Query]:
    return [pb.Query(prompt_tokens=a, output_tokens=b) for a, b in zip(p, o, strict=True)]


def _refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    return info.value.code(), detail.reason, detail.metadata["field"]


@pytest.mark.parametrize("n", [1, 3, 5000])
@pytest.mark.parametrize("intervals", [False, True])
def test_columns_answer_as_queries_do(served: Served, n: int, intervals: bool) -> None:
    p, o = _workload(n, seed=n)
    common = {"cost_model_id": served.cost_model, "per_query": True, "intervals": intervals}
    by_msgs = served.stub.EstimateRuntime(
        pb.EstimateRuntimeRequest(queries=_queries(p, o), **common), timeout=60
    )
    by_cols = served.stub.EstimateRuntime(
        pb.EstimateRuntimeRequest(prompt_tokens=p, output_tokens=o, **common), timeout=60
    )
    assert by_cols.summary == by_msgs.summary and by_cols.summary.count == n
    assert (by_cols.summary.sum_high_seconds > 0) is intervals
    # queries in, messages out; columns in, columns out
    assert len(by_msgs.estimates) == n and len(by_msgs.runtime_seconds) == 0
    assert len(by_cols.estimates) == 0
    assert list(by_cols.runtime_seconds) == [e.runtime_seconds for e in by_msgs.estimates]
    assert list(by_cols.out_of_domain) == [e.out_of_domain for e in by_msgs.estimates]
    if intervals:
        assert list(by_cols.low_seconds) == [e.low_seconds for e in by_msgs.estimates]
        assert list(by_cols.high_seconds) == [e.high_seconds for e in by_msgs.estimates]
        assert all(e.low_seconds <= e.high_seconds for e in by_msgs.estimates)
    else:
        assert len(by_cols.low_seconds) == len(by_cols.high_seconds) == 0
        assert all(e.low_seconds == e.high_seconds == 0 for e in by_msgs.estimates)


def test_the_client_sends_columns_and_keeps_its_api(served: Served) -> None:
    p, o = _workload(300, seed=7)
    with MetricsClient(served.target) as m:
        est = m.estimate(served.cost_model, p, o, intervals=True)
        arrays = m.estimate(served.cost_model, np.array(p), np.array(o, dtype=np.int32))
        floats = m.estimate(served.cost_model, [float(x) for x in p], o)  # int() as ever
        summary_only = m.estimate(served.cost_model, p, o, per_query=False)
        with pytest.raises(ValueError):
            m.estimate(served.cost_model, p, o[:-1])
        cost = m.cost(served.cost_model, np.array(p), o, accelerator=ACCEL)
        pareto = m.pareto({"a": served.cost_model}, p, o, "a,0.5")
    ref = served.stub.EstimateRuntime(
        pb.EstimateRuntimeRequest(
            cost_model_id=served.cost_model, queries=_queries(p, o), per_query=True,
            intervals=True,
        ),
        timeout=60,
    )  # fmt: skip
    np.testing.assert_array_equal(est.runtime_s, [e.runtime_seconds for e in ref.estimates])
    np.testing.assert_array_equal(est.low_s, [e.low_seconds for e in ref.estimates])
    np.testing.assert_array_equal(est.high_s, [e.high_seconds for e in ref.estimates])
    np.testing.assert_array_equal(est.out_of_domain, [e.out_of_domain for e in ref.estimates])
    assert est.summary.sum_low_s == ref.summary.sum_low_seconds > 0
    assert est.runtime_s.dtype == np.float64 and est.out_of_domain.dtype == np.bool_
    np.testing.assert_array_equal(arrays.runtime_s, est.runtime_s)
    np.testing.assert_array_equal(arrays.low_s, np.zeros(300))  # no intervals: zeros
    np.testing.assert_array_equal(floats.runtime_s, est.runtime_s)
    assert summary_only.runtime_s.size == 0 and summary_only.summary.sum_s == est.summary.sum_s
    assert cost.runtime_s == pytest.approx(est.summary.sum_s, rel=1e-12)
    assert pareto.rows[0].cost == pytest.approx(est.summary.sum_s, rel=1e-12)


def test_cost_pareto_and_compare_take_columns(served: Served) -> None:
    p, o = _workload(50, seed=3)
    q = _queries(p, o)
    cm = served.cost_model
    cost = [
        served.stub.ComputeCost(
            pb.ComputeCostRequest(cost_model_id=cm, accelerator=ACCEL, **kw), timeout=60
        )
        for kw in ({"queries": q}, {"prompt_tokens": p, "output_tokens": o})
    ]
    assert cost[0] == cost[1] and cost[0].runtime_seconds > 0
    pareto = [
        served.stub.ComputePareto(
            pb.ComputeParetoRequest(cost_model_ids={"a": cm}, accuracy_csv="a,0.5", **kw),
            timeout=60,
        )
        for kw in ({"queries": q}, {"prompt_tokens": p, "output_tokens": o})
    ]
    assert pareto[0] == pareto[1]
    base = {"profile_id_a": served.profile_a, "profile_id_b": served.profile_b, "bootstrap": 20}
    compare = [
        served.stub.CompareCostModels(pb.CompareCostModelsRequest(**base, **kw), timeout=120)
        for kw in ({"queries": q}, {"prompt_tokens": p, "output_tokens": o})
    ]
    assert compare[0] == compare[1] and compare[0].ratio > 0


def _estimate(served: Served, **kw: Any) -> Any:
    req = pb.EstimateRuntimeRequest(cost_model_id=served.cost_model, **kw)
    return lambda: served.stub.EstimateRuntime(req, timeout=60)


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_bad_workloads_are_refused_naming_the_field(served: Served) -> None:
    q = [pb.Query(prompt_tokens=4, output_tokens=4)]
    cases = [
        ({"queries": q, "prompt_tokens": [4], "output_tokens": [4]}, "QUERIES_AMBIGUOUS",
         "queries"),
        ({"queries": q, "output_tokens": [4]}, "QUERIES_AMBIGUOUS", "queries"),
        ({"prompt_tokens": [4, 5], "output_tokens": [4]}, "QUERIES_INVALID", "output_tokens"),
        ({"prompt_tokens": [4, 0], "output_tokens": [4, 4]}, "QUERY_TOKENS_INVALID",
         "prompt_tokens[1]"),
        ({"prompt_tokens": [4, 4, 4], "output_tokens": [4, 4, -3]}, "QUERY_TOKENS_INVALID",
         "output_tokens[2]"),
        ({"prompt_tokens": [4] * (MAX_QUERIES + 1), "output_tokens": [4] * (MAX_QUERIES + 1)},
         "QUERIES_TOO_MANY", "prompt_tokens"),
        ({}, "QUERIES_REQUIRED", "queries"),
    ]  # fmt: skip
    for kw, reason, field in cases:
        assert _refused(_estimate(served, **kw)) == (INVALID, reason, field), kw
    # a bad query among many messages is still named by its index
    p, o = _workload(500)
    p[321] = 0
    got = _refused(_estimate(served, queries=_queries(p, o)))
    assert got == (INVALID, "QUERY_TOKENS_INVALID", "queries[321].prompt_tokens")
    got = _refused(
        lambda: served.stub.ComputeCost(
            pb.ComputeCostRequest(
                cost_model_id=served.cost_model, accelerator=ACCEL, queries=q, prompt_tokens=[1]
            ),
            timeout=60,
        )
    )
    assert got == (INVALID, "QUERIES_AMBIGUOUS", "queries")
