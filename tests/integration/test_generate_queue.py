"""Concurrent Generate calls on one model over a real serving server (build_server on
127.0.0.1:0, a real channel): one timed region at a time (from the server-reported
start_time and total_ns), exact lengths, the queue bound as RESOURCE_EXHAUSTED with its
reason, and a call whose deadline passes (or that its client cancels) while queued never
reaching the backend.

The server's registry is captured (build_server's ModelRegistry is replaced by a subclass
that keeps its instances) only to read its queue and to shrink its bound; the backend is
the real pytorch one behind a wrapper that can hold the first generation until the test
has queued calls behind it.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.common.v1 import common_pb2 as cpb
from idealrt.core.config import ServingConfig
from idealrt.core.domain import Backend
from idealrt.core.serving_contract import GenerationResult
from idealrt.services.serving import registry as registry_mod
from idealrt.services.serving import server as server_mod
from idealrt.services.serving.backends.pytorch_backend import PytorchBackend
from idealrt.services.serving.registry import BackendTable, ModelRegistry
from idealrt.serving.v1 import serving_service_pb2 as pb
from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

TIMEOUT_S = 120.0
WAIT_S = 30.0
CONCURRENT = 8
PROMPT, OUT = 16, 12


class HeldBackend:
    """The pytorch backend; `hold` (when set) runs before the next generation starts."""

    name = "pytorch"

    def __init__(self, ran: list[int]) -> None:
        self.inner = PytorchBackend()
        self.ran = ran
        self.hold: Callable[[], object] | None = None

    def load(self, *args: Any) -> Any:
        return self.inner.load(*args)

    def generate(
        self, prompt_ids: Sequence[int], output_tokens: int, batch_size: int = 1
    ) -> GenerationResult:
        if self.hold is not None:
            hold, self.hold = self.hold, None
            hold()
        self.ran.append(len(prompt_ids))
        result: GenerationResult = self.inner.generate(prompt_ids, output_tokens, batch_size)
        return result

    def unload(self) -> None:
        self.inner.unload()


@dataclasses.dataclass
class Served:
    stub: pbg.ServingServiceStub
    registry: ModelRegistry
    backends: list[HeldBackend]
    ran: list[int]  # prompt lengths of the generations that reached the backend

    def load(self) -> str:
        stack = cpb.StackSpec(
            backend=cpb.BACKEND_PYTORCH,
            device="cpu",
            dtype=cpb.D_TYPE_FP32,
            options={"threads": "1"},
        )
        r = self.stub.LoadModel(
            pb.LoadModelRequest(
                model=cpb.ModelRef(name="tiny-gpt2", seed=3), stack=stack, max_context=64
            ),
            timeout=TIMEOUT_S,
        )
        self.ran.clear()  # the load's warm-up
        return r.model.model_id


def _serve(
    monkeypatch: pytest.MonkeyPatch, max_queued: int | None, server_model: str = "sync"
) -> Iterator[Served]:
    ran: list[int] = []
    backends: list[HeldBackend] = []
    registries: list[ModelRegistry] = []

    def factory() -> HeldBackend:
        backends.append(HeldBackend(ran))
        return backends[-1]

    class Captured(ModelRegistry):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            limits = kwargs.get("limits")
            if max_queued is not None and limits is not None:
                kwargs["limits"] = dataclasses.replace(limits, max_queued_generations=max_queued)
            super().__init__(*args, **kwargs)
            registries.append(self)

    table = BackendTable()
    table.register(Backend.PYTORCH, factory)
    monkeypatch.setattr(registry_mod, "_DEFAULT", table)
    monkeypatch.setattr(server_mod, "ModelRegistry", Captured)
    before = torch.get_num_threads()
    server, port = server_mod.build_server(ServingConfig(server_model=server_model))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(pbg.ServingServiceStub(channel), registries[0], backends, ran)
    finally:
        channel.close()
        server.stop(0)
        torch.set_num_threads(before)


@pytest.fixture(params=["sync", "aio"])
def served(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A serving server of each gRPC server model (IDEALRT_SERVER_MODEL)."""
    yield from _serve(monkeypatch, None, request.param)


@pytest.fixture
def served_small_queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    yield from _serve(monkeypatch, 1)


def _request(model_id: str, seed: int, p: int = PROMPT) -> pb.GenerateRequest:
    req = pb.GenerateRequest(model_id=model_id, output_tokens=OUT, return_token_ids=True)
    req.synthetic.length, req.synthetic.seed = p, seed
    return req


def _wait_until(pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def _span(r: pb.GenerateResponse) -> tuple[int, int]:
    start = r.start_time.seconds * 1_000_000_000 + r.start_time.nanos
    return start, start + r.total_ns


def test_concurrent_generate_calls_are_serialized_with_exact_lengths(served: Served) -> None:
    mid = served.load()
    alone = {
        s: list(served.stub.Generate(_request(mid, s), timeout=TIMEOUT_S).output_token_ids)
        for s in range(CONCURRENT)
    }
    served.ran.clear()
    # the first call holds the device until calls are queued behind it (at least 3: the
    # server's pool may hand fewer than 8 calls to the handler at once)
    served.backends[0].hold = lambda: _wait_until(
        lambda: served.registry.queue_stats(mid).waiting >= 3
    )
    futures = [
        served.stub.Generate.future(_request(mid, s), timeout=TIMEOUT_S) for s in range(CONCURRENT)
    ]
    responses = [f.result() for f in futures]
    for seed, r in enumerate(responses):
        assert (r.prompt_tokens, r.output_tokens, r.batch_size) == (PROMPT, OUT, 1)
        assert len(r.decode_ns) == OUT - 1 and len(r.output_token_ids) == OUT
        assert r.total_ns == r.prefill_ns + sum(r.decode_ns)
        assert list(r.output_token_ids) == alone[seed]
    spans = sorted(_span(r) for r in responses)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
    assert len(served.ran) == CONCURRENT
    stats = served.registry.queue_stats(mid)
    assert (stats.waiting, stats.refused, stats.left) == (0, 0, 0)


def test_a_call_past_its_deadline_or_cancelled_while_queued_never_runs(served: Served) -> None:
    mid = served.load()
    go = threading.Event()
    served.backends[0].hold = lambda: go.wait(WAIT_S)
    first = served.stub.Generate.future(_request(mid, 1, p=5), timeout=TIMEOUT_S)
    _wait_until(lambda: served.registry.queue_stats(mid).held)
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Generate(_request(mid, 2, p=6), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_until(lambda: served.registry.queue_stats(mid).left == 1)
    cancelled = served.stub.Generate.future(_request(mid, 3, p=7), timeout=TIMEOUT_S)
    _wait_until(lambda: served.registry.queue_stats(mid).waiting == 1)
    assert cancelled.cancel()
    _wait_until(lambda: served.registry.queue_stats(mid).left == 2)
    go.set()
    assert first.result().output_tokens == OUT
    after = served.stub.Generate(_request(mid, 4, p=8), timeout=TIMEOUT_S)
    assert after.output_tokens == OUT
    assert served.ran == [5, 8]  # the expired and the cancelled call never ran


def test_a_full_queue_is_resource_exhausted_with_its_reason(served_small_queue: Served) -> None:
    served = served_small_queue
    mid = served.load()
    go = threading.Event()
    served.backends[0].hold = lambda: go.wait(WAIT_S)
    first = served.stub.Generate.future(_request(mid, 1), timeout=TIMEOUT_S)
    _wait_until(lambda: served.registry.queue_stats(mid).held)
    queued = served.stub.Generate.future(_request(mid, 2), timeout=TIMEOUT_S)
    _wait_until(lambda: served.registry.queue_stats(mid).waiting == 1)
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Generate(_request(mid, 3), timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(e.value) == "GENERATION_QUEUE_FULL"
    go.set()
    assert first.result().output_tokens == queued.result().output_tokens == OUT
