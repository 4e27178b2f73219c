"""Graceful shutdown of each service as a real process (`python -m idealrt.services.NAME`):
on SIGTERM it says NOT_SERVING on its health Watch, lets the RPC in flight finish, exits 0;
the profiler leaves its running profile resumable in the store and a restarted profiler
finishes it, while a client's watch rides out the restart.

"In flight" is known without timing: the test waits until the process has burnt CPU on the
call (/proc/PID/stat) before it sends SIGTERM. Every process is killed in a finally.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from idealrt.clients.metrics import MetricsClient
from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.serving import ServingClient
from idealrt.clients.store import StoreClient
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, ProfileState, Sample, StackSpec
from idealrt.core.grpc_client import open_channel

from ._procs import START_S, Background, Service, free_port, services, wait_busy

__all__ = ["services"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(600)


class HealthWatch:
    """An open grpc.health.v1 Watch on the overall status ("")."""

    def __init__(self, target: str) -> None:
        self.channel = open_channel(target)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
        assert next(self.call).status == health_pb2.HealthCheckResponse.SERVING

    def next_status(self) -> int:
        status: int = next(self.call).status
        return status

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def test_store_stops_gracefully_and_keeps_its_data(
    services: Callable[..., Service],
) -> None:
    store = services("store")
    client = StoreClient(store.target, timeout=30)
    try:
        created, _ = client.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(device="cpu"),
                plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,)),
            )
        )
    finally:
        client.close()
    health = HealthWatch(store.target)
    try:
        store.proc.send_signal(signal.SIGTERM)
        assert health.next_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        health.close()
    assert store.proc.wait(timeout=120) == 0, store.stderr()[-3000:]
    again = services("store")
    client = StoreClient(again.target, timeout=30)
    try:
        assert client.get_profile(created.id).id == created.id
    finally:
        client.close()
    assert again.terminate() == 0


def test_serving_lets_an_inflight_generate_finish(services: Callable[..., Service]) -> None:
    serving = services("serving")
    client = ServingClient(serving.target, timeout=300)
    try:
        model = client.load(ModelRef(name="tiny-gpt2"), StackSpec(device="cpu"))
        health = HealthWatch(serving.target)
        try:
            since = serving.cpu_s()
            job = Background(
                lambda: client.generate(
                    model.model_id, prompt_length=8, output_tokens=240, batch_size=64
                )
            )
            wait_busy(serving, since, job)
            serving.proc.send_signal(signal.SIGTERM)
            assert health.next_status() == health_pb2.HealthCheckResponse.NOT_SERVING
            result = job.result()
        finally:
            health.close()
        assert result.output_tokens == 240 and result.batch_size == 64
    finally:
        client.close()
    assert serving.proc.wait(timeout=120) == 0, serving.stderr()[-3000:]


def _samples(prompts: tuple[int, ...], outputs: tuple[int, ...], repeats: int) -> list[Sample]:
    out = []
    for p in prompts:
        for o in outputs:
            for r in range(repeats):
                prefill = 1_000_000 + 10_000 * p
                steps = tuple(2_000_000 + 1_000 * (p + k + 1) + 1_000 * r for k in range(o - 1))
                out.append(
                    Sample(
                        prompt_tokens=p,
                        output_tokens=o,
                        prefill_ns=prefill,
                        decode_ns=steps,
                        total_ns=prefill + sum(steps),
                        start_time=datetime.now(UTC),
                    )
                )
    return out


def test_metrics_lets_an_inflight_fit_finish(services: Callable[..., Service]) -> None:
    store = services("store")
    metrics = services("metrics", {"IDEALRT_STORE_TARGET": store.target})
    st = StoreClient(store.target, timeout=30)
    mc = MetricsClient(metrics.target, timeout=300)
    try:
        prompts, outputs = (1, 16, 64, 128), (2, 8, 32)
        prof, _ = st.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(device="cpu"),
                plan=ProfilePlan(prompt_tokens=prompts, output_tokens=outputs, repeats=3),
            )
        )
        samples = _samples(prompts, outputs, 3)
        st.append_samples(prof.id, "b0", samples)
        st.update_profile(
            dataclasses.replace(prof, state=ProfileState.SUCCEEDED, completed_samples=len(samples))
        )
        health = HealthWatch(metrics.target)
        try:
            mc.list_cost_models()  # connected: the fit below is sent at once
            since = metrics.cpu_s()
            job = Background(lambda: mc.fit(prof.id, bootstrap=600, request_id="fit-1"))
            wait_busy(metrics, since, job, cpu_s=0.3)
            metrics.proc.send_signal(signal.SIGTERM)
            assert health.next_status() == health_pb2.HealthCheckResponse.NOT_SERVING
            cm = job.result()
        finally:
            health.close()
        assert cm.profile_id == prof.id
        assert st.get_cost_model(cm.id).id == cm.id  # it reached the store before the exit
    finally:
        st.close()
        mc.close()
    assert metrics.proc.wait(timeout=120) == 0, metrics.stderr()[-3000:]
    assert store.terminate() == 0


def test_profiler_checkpoints_its_profile_and_a_restart_finishes_it(
    services: Callable[..., Service],
) -> None:
    store = services("store")
    serving = services("serving")
    port = free_port()  # the restarted profiler comes back on the same address
    env = {
        "IDEALRT_STORE_TARGET": store.target,
        "IDEALRT_SERVING_TARGET": serving.target,
        "IDEALRT_CONTENTION_MONITORS": "0",  # a shared machine (see tests/conftest.py `suite`)
        "IDEALRT_CONTENTION_CHECKS": "0",
    }
    profiler = services("profiler", env, address=f"127.0.0.1:{port}")
    client = ProfilerClient(f"127.0.0.1:{port}", timeout=30)
    st = StoreClient(store.target, timeout=30)
    try:
        profile = client.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(device="cpu", options={"threads": "1"}),
                plan=ProfilePlan(
                    prompt_tokens=(8, 64), output_tokens=(2, 128), repeats=60, batch_size=8
                ),
            )
        )
        deadline = time.monotonic() + START_S
        while client.get_profile(profile.id).completed_samples < 2:
            assert time.monotonic() < deadline, "the profile never started"
            time.sleep(0.05)
        seen: list[Profile] = []
        first = threading.Event()

        def follow() -> list[Profile]:
            for p in client.watch(profile.id, timeout=500):
                seen.append(p)
                first.set()
            return seen

        watch = Background(follow)
        assert first.wait(60)
        assert profiler.terminate() == 0, profiler.stderr()[-3000:]
        stored = st.get_profile(profile.id)
        # checkpointed, not lost and not failed: unfinished, with what it had measured
        assert not stored.state.terminal, stored
        assert stored.state in (ProfileState.QUEUED, ProfileState.RUNNING)
        checkpointed = st.count_samples(profile.id)
        assert 0 < checkpointed < stored.total_samples
        services("profiler", env, address=f"127.0.0.1:{port}")  # resumes it
        updates = watch.result(500)
    finally:
        client.close()
        st.close()
    final = updates[-1]
    assert final.state in (ProfileState.SUCCEEDED, ProfileState.INVALID), final.error
    assert checkpointed < final.completed_samples <= final.total_samples
    keys = [(p.state, p.completed_samples, p.start_time, p.end_time, p.error) for p in updates]
    assert all(a != b for a, b in itertools.pairwise(keys))  # nothing repeated
    assert [p for p in updates if p.state.terminal] == [final]
    assert st_count(store.target, profile.id) >= final.completed_samples


def st_count(target: str, profile_id: str) -> int:
    st = StoreClient(target, timeout=30)
    try:
        return st.count_samples(profile_id)
    finally:
        st.close()
