"""GenerationTarget over an idealrt serving API (in-process registry or its gRPC client).

`ServingApi` is the structural type both `idealrt.services.serving.registry.ModelRegistry`
and the lead's gRPC serving client satisfy: load / generate / unload with the same names.

- prepare(): loads the profile's ModelRef on its StackSpec with max_context = the largest
  p + o of the plan, request id "<profile_id>-load-<n>" (idempotent per attempt).
- generate(p, o, seed): a synthetic prompt of exactly p tokens (prompt_length=p,
  prompt_seed=seed) and exactly o output tokens. rpc_ns is measured around the call and
  kept apart from the server-side prefill/decode/total. Token counts that differ from the
  request (or a decode list that is not o - 1 long) give a Sample flagged NONCONFORMING.
- NotFound (the serving process came back without our model): reload at once and retry.
  UNAVAILABLE or DEADLINE_EXCEEDED (it died, restarts, or the connection broke): reload
  and retry, sleeping `retry_backoff_s` x attempt between tries (a blip). After
  `max_reconnects` consecutive failures the error is raised, as `TargetUnavailable` when it
  is transient: the runner then rides the outage out (backoff within its outage window,
  waiting on the cancel event) and calls generate again with the same configuration,
  repeat and seed, which reloads the model. A reload loads the same ModelRef on the same
  StackSpec with the same max_context and uses the model id it returns; the model id of
  the lost load is unloaded (best effort: gone with a restarted server). prepare() raises
  `TargetUnavailable` too when serving is unreachable. FailedPrecondition (e.g.
  DEVICE_UNAVAILABLE: no such device) and InvalidArgument are answers, never retried.
- close() unloads the model, and closes the serving client too when `owns_serving` (a
  client made for this one target); never for a shared in-process registry.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

import structlog

from idealrt.core.domain import ModelRef, Profile, Sample, SampleFlag, SampleTiming, StackSpec
from idealrt.core.errors import IdealrtError, NotFound, Unavailable
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler._outage import is_transient
from idealrt.services.profiler.plan import configurations
from idealrt.services.profiler.target import TargetUnavailable

__all__ = ["GenerationResultLike", "LoadedModelLike", "ServingApi", "ServingTarget"]

log = structlog.get_logger(__name__)


class LoadedModelLike(Protocol):
    @property
    def model_id(self) -> str: ...

    @property
    def spec(self) -> ModelSpec: ...


class GenerationResultLike(Protocol):
    @property
    def prompt_tokens(self) -> int: ...

    @property
    def output_tokens(self) -> int: ...

    @property
    def prefill_ns(self) -> int: ...

    @property
    def decode_ns(self) -> Sequence[int]: ...

    @property
    def total_ns(self) -> int: ...

    @property
    def start_time(self) -> datetime | None: ...

    @property
    def batch_size(self) -> int: ...


class ServingApi(Protocol):
    def load(
        self, model: ModelRef, stack: StackSpec, max_context: int = 0, request_id: str = ""
    ) -> Any: ...

    def generate(
        self,
        model_id: str,
        *,
        prompt_ids: Any = None,
        prompt_length: int,
        prompt_seed: int,
        output_tokens: int,
        batch_size: int = 1,
    ) -> Any: ...

    def unload(self, model_id: str) -> Any: ...


class ServingTarget:
    """One profile's model on an idealrt serving API."""

    def __init__(
        self,
        serving: ServingApi,
        profile: Profile,
        *,
        max_reconnects: int = 3,
        retry_backoff_s: float = 0.5,
        serving_pid: int | None = None,
        unload_on_close: bool = True,
        owns_serving: bool = False,
    ) -> None:
        self.serving = serving
        self.profile = profile
        self.max_reconnects = max_reconnects
        self.retry_backoff_s = retry_backoff_s
        self.serving_pid = serving_pid
        self.unload_on_close = unload_on_close
        self.owns_serving = owns_serving  # close() also closes a client made for this target
        self.loaded: LoadedModelLike | None = None
        self.loads = 0
        self.server_env: dict[str, str] | None = None
        self.reconnects = 0
        self._lost: list[str] = []  # model ids of loads a reload replaced
        plan_configs = configurations(profile.plan)
        self.max_context = max(c.prompt_tokens + c.output_tokens for c in plan_configs)

    def prepare(self) -> ModelSpec | None:
        self.loads += 1
        try:
            loaded: LoadedModelLike = self.serving.load(
                self.profile.model,
                self.profile.stack,
                max_context=self.max_context,
                request_id=f"{self.profile.id}-load-{self.loads}",
            )
        except IdealrtError as exc:
            if is_transient(exc):
                raise TargetUnavailable.wrap(exc) from exc
            raise
        self.loaded = loaded
        self._unload_lost()
        if self.server_env is None:
            self.server_env = self._server_environment()
        return loaded.spec

    def _lose_model(self) -> None:
        """The model may be gone (or unreachable): the next call reloads it."""
        if self.loaded is not None:
            self._lost.append(self.loaded.model_id)
        self.loaded = None

    def _unload_lost(self) -> None:
        """Unload the models of earlier loads that a reload replaced (a server that only
        lost the connection still holds them; a restarted one answers NotFound)."""
        lost, self._lost = self._lost, []
        for model_id in lost:
            try:
                self.serving.unload(model_id)
            except NotFound:
                pass  # gone with the process that held it
            except IdealrtError as exc:  # cleanup only: measuring goes on without it
                log.warning(
                    "lost_model_not_unloaded", model_id=model_id, reason=exc.reason, error=str(exc)
                )

    def _server_environment(self) -> dict[str, str]:
        fetch = getattr(self.serving, "environment", None)
        if not callable(fetch):
            return {}
        try:
            return {str(k): str(v) for k, v in dict(fetch()).items()}
        except Exception:  # provenance is best effort; measuring must not depend on it
            return {}

    def _model_id(self) -> str:
        if self.loaded is None:
            self.prepare()
        assert self.loaded is not None
        return self.loaded.model_id

    def generate(self, prompt_tokens: int, output_tokens: int, seed: int) -> Sample:
        failures = 0
        while True:
            try:
                model_id = self._model_id()
                t0 = time.perf_counter_ns()
                result: GenerationResultLike = self.serving.generate(
                    model_id,
                    prompt_length=prompt_tokens,
                    prompt_seed=seed,
                    output_tokens=output_tokens,
                    batch_size=self.profile.plan.batch_size,
                )
                rpc_ns = time.perf_counter_ns() - t0
                return self._to_sample(result, prompt_tokens, output_tokens, rpc_ns)
            except NotFound:
                failures += 1
                self._lose_model()
                if failures > self.max_reconnects:
                    raise
                self.reconnects += 1
            except IdealrtError as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                self._lose_model()
                if failures > self.max_reconnects:
                    if isinstance(exc, TargetUnavailable):
                        raise
                    raise TargetUnavailable.wrap(exc) from exc
                self.reconnects += 1
                time.sleep(self.retry_backoff_s * failures)

    def _to_sample(self, r: GenerationResultLike, p: int, o: int, rpc_ns: int) -> Sample:
        decode = tuple(int(x) for x in r.decode_ns)
        conforming = r.prompt_tokens == p and r.output_tokens == o and len(decode) == o - 1
        return Sample(
            prompt_tokens=int(r.prompt_tokens),
            output_tokens=int(r.output_tokens),
            prefill_ns=int(r.prefill_ns),
            decode_ns=decode,
            total_ns=int(r.total_ns),
            batch_size=int(r.batch_size),
            start_time=r.start_time,
            rpc_ns=rpc_ns,
            flag=SampleFlag.OK if conforming else SampleFlag.NONCONFORMING,
            timing=SampleTiming.SERVER_STEPS,  # the serving process timed every step
        )

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {
            "kind": "serving",
            "loads": str(self.loads),
            "reconnects": str(self.reconnects),
        }
        if self.loaded is not None:
            env["model_id"] = self.loaded.model_id
            extra = getattr(self.loaded, "environment", None)
            if isinstance(extra, dict):
                env.update({str(k): str(v) for k, v in extra.items()})
        server = self.server_env or {}
        env.update({f"server.{k}": v for k, v in server.items()})
        pid = self.serving_pid
        if (
            pid is None
            and server.get("process.pid", "").isdigit()
            and server.get("host.name") == socket.gethostname()
        ):
            pid = int(server["process.pid"])
        if pid is not None:
            # Lets the runner's CPU monitor count the serving process as ours.
            env["serving.pid"] = str(pid)
            env["serving.host"] = socket.gethostname()
        return env

    def close(self) -> None:
        loaded, self.loaded = self.loaded, None
        if loaded is not None and self.unload_on_close:
            # NotFound/Unavailable: the serving process already dropped it, or is gone.
            with contextlib.suppress(Unavailable, NotFound):
                self.serving.unload(loaded.model_id)
        if self.unload_on_close:
            self._unload_lost()
        closer = getattr(self.serving, "close", None)
        if self.owns_serving and callable(closer):
            closer()

    @classmethod
    def in_process(cls, serving: ServingApi, profile: Profile, **kw: Any) -> ServingTarget:
        """A target over a registry living in this process (its CPU time is ours)."""
        return cls(serving, profile, serving_pid=os.getpid(), **kw)
