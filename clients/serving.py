"""Client of the ServingService with the domain-level methods the profiler expects."""

from __future__ import annotations

from collections.abc import Sequence

from idealrt.clients._channel import ClientChannel
from idealrt.core import convert as cv
from idealrt.core.clock import utcnow
from idealrt.core.domain import ModelRef, StackSpec
from idealrt.core.grpc_client import (
    call,
    request_id_or_new,
)
from idealrt.core.serving_contract import GenerationResult, LoadedModel, MemoryReport
from idealrt.serving.v1 import serving_service_pb2 as pb
from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

__all__ = ["ServingClient"]


def _loaded_from_pb(m: pb.LoadedModel) -> LoadedModel:
    return LoadedModel(
        model_id=m.model_id,
        name=m.name,
        spec=cv.spec_from_pb(m.spec),
        stack=cv.stack_from_pb(m.stack),
        memory=MemoryReport(
            weights_bytes=m.memory.weights_bytes,
            kv_cache_bytes=m.memory.kv_cache_bytes,
            device_total_bytes=m.memory.device_total_bytes,
            device_free_bytes=m.memory.device_free_bytes,
        ),
        load_ns=m.load_ns,
        max_context=m.max_context,
        create_time=cv.ts_from_pb(m, "create_time") or utcnow(),
    )


class ServingClient(ClientChannel):
    """ClientChannel(target, timeout, tls=, token=) on the ServingService."""

    _STUB = pbg.ServingServiceStub
    _stub: pbg.ServingServiceStub

    def load(
        self, model: ModelRef, stack: StackSpec, max_context: int = 0, request_id: str = ""
    ) -> LoadedModel:
        r = call(
            self._stub.LoadModel,
            pb.LoadModelRequest(
                request_id=request_id_or_new(request_id),
                model=cv.model_ref_to_pb(model),
                stack=cv.stack_to_pb(stack),
                max_context=max_context,
            ),
            timeout=max(self.timeout, 600.0),
        )
        return _loaded_from_pb(r.model)

    def unload(self, model_id: str) -> None:
        call(self._stub.UnloadModel, pb.UnloadModelRequest(model_id=model_id), self.timeout)

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[LoadedModel], str]:
        r = call(
            self._stub.ListModels,
            pb.ListModelsRequest(page_size=page_size, page_token=page_token),
            self.timeout,
        )
        return [_loaded_from_pb(m) for m in r.models], r.next_page_token

    def generate(
        self,
        model_id: str,
        *,
        prompt_ids: Sequence[int] | None = None,
        prompt_length: int = 0,
        prompt_seed: int = 0,
        output_tokens: int,
        batch_size: int = 1,
    ) -> GenerationResult:
        req = pb.GenerateRequest(
            model_id=model_id,
            output_tokens=output_tokens,
            batch_size=batch_size,
            return_token_ids=True,
        )
        if prompt_ids is not None:
            req.token_ids.ids.extend(prompt_ids)
        else:
            req.synthetic.length = prompt_length
            req.synthetic.seed = prompt_seed
        r = call(self._stub.Generate, req, self.timeout)
        start = cv.ts_from_pb(r, "start_time")
        assert start is not None
        return GenerationResult(
            prompt_tokens=r.prompt_tokens,
            output_tokens=r.output_tokens,
            output_ids=tuple(r.output_token_ids),
            prefill_ns=r.prefill_ns,
            decode_ns=tuple(r.decode_ns),
            total_ns=r.total_ns,
            start_time=start,
            batch_size=r.batch_size,
        )

    def environment(self) -> dict[str, str]:
        r = call(self._stub.GetEnvironment, pb.GetEnvironmentRequest(), self.timeout)
        return dict(r.entries)
