"""The real pipeline over gRPC: profile a tiny shape -> store -> fit -> estimate."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.clients.metrics import MetricsClient
from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.serving import ServingClient
from idealrt.clients.store import StoreClient
from idealrt.core.costmodel.predict import alpha_at
from idealrt.core.domain import (
    Backend,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    SampleFlag,
    StackSpec,
)
from idealrt.core.errors import IdealrtError
from idealrt.services.suite import Suite

PLAN = ProfilePlan(
    prompt_tokens=(1, 16, 48),
    output_tokens=(1, 4, 8),
    repeats=2,
    warmups=1,
    holdout_prompt_tokens=(8, 32),
    holdout_output_tokens=(3,),
    seed=1,
)


def _profile(plan: ProfilePlan = PLAN, model: str = "tiny-gpt2") -> Profile:
    return Profile(
        id="",
        model=ModelRef(name=model, seed=0),
        stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
        plan=plan,
        request_id=uuid.uuid4().hex,
    )


@pytest.fixture(scope="module")
def profiled(suite: Suite) -> tuple[Profile, ProfilerClient]:
    client = ProfilerClient(suite.profiler)
    created = client.create_profile(_profile())
    updates = list(client.watch(created.id))
    assert updates, "watch yielded nothing"
    final = updates[-1]
    return final, client


def test_profile_runs_to_success_and_stores_conforming_samples(
    suite: Suite, profiled: tuple[Profile, ProfilerClient]
) -> None:
    final, _ = profiled
    assert final.state == ProfileState.SUCCEEDED, final.error
    store = StoreClient(suite.store)
    samples = store.all_samples(final.id)
    measured = [s for s in samples if s.flag != SampleFlag.WARMUP]
    # 3x3 fit grid + 2x1 held-out grid, 2 repeats each; a repeat judged contended is
    # re-measured (and, after 3 tries, abandoned), so count configurations, not samples
    assert len(measured) >= (9 + 2) * 2
    ok_configs = {(s.prompt_tokens, s.output_tokens) for s in measured if s.flag == SampleFlag.OK}
    assert len(ok_configs) == 9 + 2
    for s in measured:
        assert len(s.decode_ns) == s.output_tokens - 1
        assert s.total_ns == s.prefill_ns + sum(s.decode_ns)
        assert s.rpc_ns >= s.total_ns  # RPC time is measured around, never inside
    assert {s.prompt_tokens for s in measured if s.heldout} == {8, 32}
    assert final.provenance.entries  # environment fingerprint stored
    assert final.model_spec is not None and final.model_spec.layers == 2


def test_fit_and_estimate_over_grpc(suite: Suite, profiled: tuple[Profile, ProfilerClient]) -> None:
    final, _ = profiled
    metrics = MetricsClient(suite.metrics)
    rid = uuid.uuid4().hex
    cm = metrics.fit(final.id, request_id=rid, bootstrap=50)
    assert cm.profile_id == final.id
    assert cm.alpha_knots_p[0] == 1 and cm.alpha_knots_p[-1] == 48
    assert cm.beta0_s > 0
    assert cm.quality.method == "heldout" and cm.quality.points == 2
    assert cm.fit_options["bootstrap"] == "50"  # stored with the model, through every hop
    assert metrics.fit(final.id, request_id=rid, bootstrap=50).id == cm.id  # idempotent retry
    est = metrics.estimate(cm.id, [1, 16, 100], [1, 4, 8])
    assert est.runtime_s.shape == (3,)
    alpha16 = float(alpha_at(cm, 16))
    assert est.runtime_s[1] == pytest.approx(
        alpha16 + 3 * cm.beta0_s + cm.beta1_s * (3 * 16 + 6), rel=1e-9
    )
    assert list(est.out_of_domain) == [False, False, True]
    assert est.summary.count == 3
    assert est.summary.sum_s == pytest.approx(float(est.runtime_s.sum()))
    streamed = metrics.stream_estimate(cm.id, [([1, 16], [1, 4]), ([100], [8])])
    assert streamed.sum_s == pytest.approx(est.summary.sum_s)
    listed, _ = metrics.list_cost_models(profile_id=final.id)
    assert cm.id in {c.id for c in listed}


def _reason(err: IdealrtError) -> tuple[grpc.StatusCode, str, str]:
    return err.code, err.reason, err.field


@pytest.mark.parametrize(
    ("plan_kw", "field"),
    [
        ({"prompt_tokens": (0, 16)}, "plan.prompt_tokens"),
        ({"output_tokens": (-1,)}, "plan.output_tokens"),
        ({"prompt_tokens": (200,), "output_tokens": (100,)}, "plan"),
    ],
)
def test_bad_plans_are_invalid_argument(
    suite: Suite, plan_kw: dict[str, object], field: str
) -> None:
    kw: dict[str, object] = {"prompt_tokens": (1,), "output_tokens": (1,), "repeats": 1}
    kw.update(plan_kw)
    client = ProfilerClient(suite.profiler)
    with pytest.raises(IdealrtError) as exc:
        client.create_profile(_profile(ProfilePlan(**kw)))  # type: ignore[arg-type]
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in exc.value.field


def test_unknown_model_is_invalid_argument(suite: Suite) -> None:
    with pytest.raises(IdealrtError) as exc:
        ServingClient(suite.serving).load(ModelRef(name="no-such-model"), StackSpec())
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.reason == "UNKNOWN_MODEL"
    assert exc.value.field == "model.name"


def test_unknown_ids_are_not_found(suite: Suite) -> None:
    with pytest.raises(IdealrtError) as exc:
        ProfilerClient(suite.profiler).get_profile("prof_000000000000")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(IdealrtError) as exc:
        MetricsClient(suite.metrics).fit("prof_000000000000")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(IdealrtError) as exc:
        MetricsClient(suite.metrics).estimate("cm_000000000000", [1], [1])
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_generate_validation_names_fields(suite: Suite) -> None:
    serving = ServingClient(suite.serving)
    m = serving.load(ModelRef(name="tiny-gpt2"), StackSpec())
    try:
        for kwargs, field in [
            ({"prompt_length": 0, "output_tokens": 1}, "prompt"),
            ({"prompt_length": 4, "output_tokens": 0}, "output_tokens"),
            ({"prompt_length": 200, "output_tokens": 100}, "output_tokens"),
        ]:
            with pytest.raises(IdealrtError) as exc:
                serving.generate(m.model_id, **kwargs)  # type: ignore[arg-type]
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in exc.value.field
        res = serving.generate(m.model_id, prompt_length=5, output_tokens=3)
        assert (res.prompt_tokens, res.output_tokens, len(res.decode_ns)) == (5, 3, 2)
    finally:
        serving.unload(m.model_id)
    with pytest.raises(IdealrtError) as exc:
        serving.generate(m.model_id, prompt_length=5, output_tokens=3)
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_unspecified_enum_is_invalid_argument_with_error_info(suite: Suite) -> None:
    """A raw client (no idealrt client library) sees google.rpc.Status with ErrorInfo."""
    from idealrt.common.v1 import common_pb2
    from idealrt.serving.v1 import serving_service_pb2 as pb
    from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

    with grpc.insecure_channel(suite.serving) as ch:
        stub = pbg.ServingServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.LoadModel(
                pb.LoadModelRequest(
                    model=common_pb2.ModelRef(name="tiny-gpt2"),
                    stack=common_pb2.StackSpec(device="cpu", dtype=common_pb2.D_TYPE_FP32),
                ),
                timeout=30,
            )
    err = exc.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "ENUM_UNSPECIFIED"
    assert info.domain == "idealrt"
    assert info.metadata["field"] == "stack.backend"


def test_health_and_reflection_are_served(suite: Suite) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for address in suite.addresses().values():
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_store_pagination_over_grpc(suite: Suite) -> None:
    store = StoreClient(suite.store)
    ids = set()
    for _ in range(5):
        p, _created = store.create_profile(_profile())
        ids.add(p.id)
    seen: set[str] = set()
    token = ""
    while True:
        page, token = store.list_profiles(2, token)
        assert len(page) <= 2
        seen.update(p.id for p in page)
        if not token:
            break
    assert ids <= seen
    with pytest.raises(IdealrtError) as exc:
        store.list_profiles(2, "garbage!")
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.field == "page_token"
