"""ServingTarget as an adapter. A stand-in serving API is used here because these tests are
about the adapter's contract under faults a real registry cannot be told to produce on cue
(Unavailable mid-run, wrong token counts). The real registry runs it in
test_real_serving.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from idealrt.core.domain import ModelRef, SampleFlag, StackSpec
from idealrt.core.errors import NotFound, Unavailable
from idealrt.core.model_spec import ModelSpec
from idealrt.core.serving_contract import GenerationResult


@dataclasses.dataclass(frozen=True)
class Loaded:
    model_id: str
    spec: ModelSpec


class StandInServing:
    def __init__(
        self, spec: ModelSpec, faults: list[BaseException | None] | None = None, short: bool = False
    ) -> None:
        self.spec = spec
        self.faults = faults or []
        self.short = short
        self.loads: list[tuple[ModelRef, StackSpec, int, str]] = []
        self.generates: list[dict[str, Any]] = []
        self.unloaded: list[str] = []
        self.closed = False

    def load(
        self, model: ModelRef, stack: StackSpec, max_context: int = 0, request_id: str = ""
    ) -> Loaded:
        self.loads.append((model, stack, max_context, request_id))
        return Loaded(f"m{len(self.loads)}", self.spec)

    def generate(
        self,
        model_id: str,
        *,
        prompt_ids: Any = None,
        prompt_length: int,
        prompt_seed: int,
        output_tokens: int,
        batch_size: int = 1,
    ) -> GenerationResult:
        self.generates.append(
            dict(
                model_id=model_id,
                prompt_length=prompt_length,
                prompt_seed=prompt_seed,
                output_tokens=output_tokens,
                batch_size=batch_size,
            )
        )
        if self.faults:
            fault = self.faults.pop(0)
            if fault is not None:
                raise fault
        o = output_tokens - 1 if self.short else output_tokens
        decode = tuple(100 + i for i in range(o - 1))
        return GenerationResult(
            prompt_length,
            o,
            tuple(range(o)),
            1000,
            decode,
            1000 + sum(decode),
            datetime.now(UTC),
            batch_size,
        )

    def unload(self, model_id: str) -> None:
        self.unloaded.append(model_id)

    def environment(self) -> dict[str, str]:
        return {"torch.version": "x", "process.pid": "1", "host.name": "elsewhere"}

    def close(self) -> None:
        self.closed = True


def make_target(kit, serving: StandInServing, **kw: Any):  # type: ignore[no-untyped-def]
    from idealrt.services.profiler.serving_target import ServingTarget

    profile = dataclasses.replace(kit.make_profile(batch_size=2), id="prof-1")
    return ServingTarget(serving, profile, retry_backoff_s=0.0, **kw)


def test_prepare_and_generate(kit) -> None:  # type: ignore[no-untyped-def]
    serving = StandInServing(kit.TINY_SPEC)
    target = make_target(kit, serving)
    assert target.prepare() == kit.TINY_SPEC
    _model, _stack, max_context, request_id = serving.loads[0]
    assert max_context == 32 + 6 and request_id == "prof-1-load-1"
    s = target.generate(16, 5, seed=99)
    assert serving.generates[-1] == dict(
        model_id="m1", prompt_length=16, prompt_seed=99, output_tokens=5, batch_size=2
    )
    assert (s.prompt_tokens, s.output_tokens, s.flag) == (16, 5, SampleFlag.OK)
    assert s.decode_ns == (100, 101, 102, 103) and s.total_ns == 1000 + 406
    assert s.rpc_ns > 0 and s.batch_size == 2
    env = target.environment()
    assert env["model_id"] == "m1" and env["server.torch.version"] == "x"
    assert "serving.pid" not in env  # the server is on another host: not ours
    target.close()
    assert serving.unloaded == ["m1"] and not serving.closed  # not ours to close


def test_a_client_made_for_the_target_is_closed_with_it(kit) -> None:  # type: ignore[no-untyped-def]
    serving = StandInServing(kit.TINY_SPEC)
    target = make_target(kit, serving, owns_serving=True)
    target.prepare()
    target.close()
    assert serving.unloaded == ["m1"] and serving.closed


def test_wrong_token_counts_are_flagged(kit) -> None:  # type: ignore[no-untyped-def]
    target = make_target(kit, StandInServing(kit.TINY_SPEC, short=True))
    target.prepare()
    assert target.generate(8, 4, 1).flag == SampleFlag.NONCONFORMING


def test_reprepares_on_unavailable_and_not_found(kit) -> None:  # type: ignore[no-untyped-def]
    serving = StandInServing(
        kit.TINY_SPEC,
        faults=[Unavailable("SERVING_DOWN", "x"), NotFound("MODEL_NOT_FOUND", "y"), None],
    )
    target = make_target(kit, serving)
    target.prepare()
    s = target.generate(8, 4, 1)
    assert s.flag == SampleFlag.OK
    assert [load[3] for load in serving.loads] == [
        "prof-1-load-1",
        "prof-1-load-2",
        "prof-1-load-3",
    ]
    assert serving.generates[-1]["model_id"] == "m3"
    assert target.reconnects == 2


def test_gives_up_after_max_reconnects(kit) -> None:  # type: ignore[no-untyped-def]
    serving = StandInServing(kit.TINY_SPEC, faults=[Unavailable("SERVING_DOWN", "x")] * 10)
    target = make_target(kit, serving, max_reconnects=2)
    target.prepare()
    with pytest.raises(Unavailable):
        target.generate(8, 4, 1)
    assert len(serving.generates) == 3


def test_in_process_target_reports_our_pid(kit) -> None:  # type: ignore[no-untyped-def]
    import os

    from idealrt.services.profiler.serving_target import ServingTarget

    target = ServingTarget.in_process(StandInServing(kit.TINY_SPEC), kit.make_profile())
    assert target.environment()["serving.pid"] == str(os.getpid())
