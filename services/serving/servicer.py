"""ServingService: converts, calls the ModelRegistry, converts back."""

from __future__ import annotations

import math
import time

import grpc

from idealrt.core import convert as cv
from idealrt.core.errors import InvalidArgument
from idealrt.core.serving_contract import LoadedModel
from idealrt.services.serving.device_queue import Call
from idealrt.services.serving.reasons import PROMPT_REQUIRED, STACK_REQUIRED
from idealrt.services.serving.registry import ModelRegistry
from idealrt.serving.v1 import serving_service_pb2 as pb
from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

__all__ = ["DEADLINE_BACKSTOP_S", "ServingServicer", "call_of", "loaded_model_to_pb"]

# grpc reports "no deadline" as a huge time remaining
_NO_DEADLINE_S = 10.0 * 365 * 86400
DEADLINE_BACKSTOP_S = 1.0


def loaded_model_to_pb(m: LoadedModel) -> pb.LoadedModel:
    from idealrt.common.v1 import common_pb2 as cpb

    spec = m.spec
    return pb.LoadedModel(
        model_id=m.model_id,
        name=m.name,
        spec=cv.spec_to_pb(spec),
        stack=cv.stack_to_pb(m.stack),
        memory=pb.MemoryReport(
            weights_bytes=m.memory.weights_bytes,
            kv_cache_bytes=m.memory.kv_cache_bytes,
            device_total_bytes=m.memory.device_total_bytes,
            device_free_bytes=m.memory.device_free_bytes,
        ),
        load_ns=m.load_ns,
        max_context=m.max_context,
        create_time=cv.ts_to_pb(m.create_time),
        facts=cpb.ModelFacts(
            param_count=spec.param_count(),
            weight_bytes=spec.weight_bytes(m.stack.dtype),
            kv_cache_bytes_per_token=spec.kv_cache_bytes_per_token(m.stack.dtype),
            spec_hash=spec.spec_hash(),
        ),
    )


def call_of(context: grpc.ServicerContext) -> Call:
    """The RPC as a `device_queue.Call`: its termination (cancelled, past its deadline, or
    answered: grpc runs the callback once the status is sent) is the call's end, so that a
    queued call whose client is gone never runs and the device is handed on only once this
    call's answer has gone out (`hold`). At its deadline grpc cancels the RPC itself (the
    client sees DEADLINE_EXCEEDED, the callback takes the call out of the queue); the
    Call's own deadline, DEADLINE_BACKSTOP_S later, only backs that up."""
    remaining = context.time_remaining()
    deadline = None
    if remaining is not None and math.isfinite(remaining) and remaining < _NO_DEADLINE_S:
        deadline = time.monotonic() + remaining + DEADLINE_BACKSTOP_S
    call = Call(deadline, hold=True, alive=context.is_active)
    if not context.add_callback(call.terminated):  # already over
        call.terminated()
    return call


class ServingServicer(pbg.ServingServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.ServicerContext
    ) -> pb.LoadModelResponse:
        if not request.HasField("stack"):
            raise InvalidArgument(
                STACK_REQUIRED, "stack is required (backend, device, dtype)", field="stack"
            )
        loaded = self.registry.load(
            cv.model_ref_from_pb(request.model),
            cv.stack_from_pb(request.stack),
            max_context=request.max_context,
            request_id=request.request_id,
        )
        return pb.LoadModelResponse(model=loaded_model_to_pb(loaded))

    def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.ServicerContext
    ) -> pb.UnloadModelResponse:
        self.registry.unload(request.model_id)
        return pb.UnloadModelResponse()

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        items, token = self.registry.list(request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[loaded_model_to_pb(m) for m in items], next_page_token=token
        )

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        which = request.WhichOneof("prompt")
        if which is None:
            raise InvalidArgument(
                PROMPT_REQUIRED, "prompt: give token_ids or synthetic", field="prompt"
            )
        ids = list(request.token_ids.ids) if which == "token_ids" else None
        res = self.registry.generate(
            request.model_id,
            prompt_ids=ids,
            prompt_length=request.synthetic.length if which == "synthetic" else len(ids or ()),
            prompt_seed=request.synthetic.seed,
            output_tokens=request.output_tokens,
            batch_size=request.batch_size or 1,
            call=call_of(context),
        )
        return pb.GenerateResponse(
            prompt_tokens=res.prompt_tokens,
            output_tokens=res.output_tokens,
            batch_size=res.batch_size,
            prefill_ns=res.prefill_ns,
            decode_ns=list(res.decode_ns),
            total_ns=res.total_ns,
            start_time=cv.ts_to_pb(res.start_time),
            output_token_ids=list(res.output_ids) if request.return_token_ids else [],
        )

    def GetEnvironment(
        self, request: pb.GetEnvironmentRequest, context: grpc.ServicerContext
    ) -> pb.GetEnvironmentResponse:
        from idealrt.core.fingerprint import machine_environment

        return pb.GetEnvironmentResponse(entries=machine_environment())
