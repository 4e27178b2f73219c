"""Issue 13's authorization matrix: every RPC of the four services x every kind of caller.

Everything is real: the four services' own `build_server` on 127.0.0.1 port 0, each
listening with TLS (one server certificate from a CA generated here with `cryptography`;
every client, the services' channels to one another included, verifies it against that
CA), a static tokens file read by each server's authenticator, a real SQLite store, a
real serving process holding a real tiny-gpt2 (PyTorch, CPU), a real metrics service and
a real profiler that call the store over TLS with their service token (ops). The test
calls raw stubs over `grpc.secure_channel` with per-call metadata, so it can send no
token or a bad one, and reads the status code, the ErrorInfo reason and field and the
message that came over the wire. Nothing is mocked. (No profile here reaches a serving:
the profiler's serving-side calls are covered by the pipeline tests.)

Callers (one static token each):
    ops       {"*": admin}       also the profiler's and the metrics' service token
    a_writer  {"team-a": writer}
    a_reader  {"team-a": reader}
    b_writer  {"team-b": writer}  "a token of another namespace"
plus no token and an unknown token. Seeded in team-a before the matrix: a SUCCEEDED
profile with synthetic samples (store, as ops), a cost model fitted from it (metrics
FitCostModel, as a_writer), an open (QUEUED, never run) profile in the store, a profile
QUEUED in the profiler (behind a "blocker" profile that RUNs against a serving address
nothing listens on, holding the profiler's one worker, so nothing here measures), and a
tiny-gpt2 loaded in serving (as ops).

`ROWS` holds one row per RPC (`test_every_rpc_has_a_row` compares them with the generated
descriptors, so a new RPC without a row fails) with its kind and the object it names;
`test_authz` runs each row for each caller. No token and a bad token are UNAUTHENTICATED
for every RPC; ops (admin of "*") is OK for every RPC; the others by kind:
    read      b_writer NOT_FOUND, identical (code, reason, field, message) to what the
              same caller gets for a missing id; a_reader, a_writer OK. A read has no
              "reader calling a write RPC" case: the reader's call is an allowed one.
    list      b_writer OK but none of team-a's objects listed; a_reader, a_writer list them.
    write     a_reader PERMISSION_DENIED; b_writer PERMISSION_DENIED for a create naming
              team-a, NOT_FOUND (as for a missing id) for a write to a team-a object;
              a_writer OK (ImportHelm names the namespace it stores into: team-a).
    operator  only ops (store UpdateProfile/AppendSamples: the profiler's write path;
              serving LoadModel/UnloadModel/Generate: devices every namespace shares).
    any       every authenticated caller OK (serving ListModels, GetEnvironment).
A refused call changes nothing: each write row snapshots (as ops) what it would change
before and after every refusal. The allowed call of a write that uses up its object
(cancel, unload, update, append) gets a fresh one.

One module because it is one idea: the table, the servers it runs against and the test
that walks it; split, each part would be read only with the others.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from idealrt.core import convert as cv
from idealrt.core.auth import AuthConfig, token_sha256
from idealrt.core.catalog import resolve
from idealrt.core.config import MetricsConfig, ProfilerConfig, ServingConfig, StoreConfig
from idealrt.core.domain import (
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Sample,
    StackSpec,
    Target,
)
from idealrt.core.grpc_server import GrpcServer
from idealrt.core.reasons import NAMESPACE_FORBIDDEN, UNAUTHENTICATED
from idealrt.core.tls import TlsConfig
from idealrt.metrics.v1 import metrics_service_pb2 as mpb
from idealrt.metrics.v1 import metrics_service_pb2_grpc as mpbg
from idealrt.profiler.v1 import profiler_service_pb2 as ppb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as ppbg
from idealrt.services.metrics.server import build_server as build_metrics
from idealrt.services.profiler.server import build_server as build_profiler
from idealrt.services.serving.server import build_server as build_serving
from idealrt.services.store.server import build_server as build_store
from idealrt.serving.v1 import serving_service_pb2 as spb
from idealrt.serving.v1 import serving_service_pb2_grpc as spbg
from idealrt.store.v1 import store_service_pb2 as stpb
from idealrt.store.v1 import store_service_pb2_grpc as stpbg
from tests._pki import server_pki

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 30.0  # per RPC
TEAM_A, TEAM_B, DEFAULT = "team-a", "team-b", "default"
TINY = ModelRef(name="tiny-gpt2")
CPU = StackSpec(device="cpu", options={"threads": "1"})
PROMPTS, OUTPUTS, REPEATS = (1, 16, 64, 128), (2, 8, 32), 3


# ------------------------------------------------------------------ callers


class Case(enum.StrEnum):
    """Who calls: no token, an unknown token, or one of the tokens of the tokens file."""

    NO_TOKEN = "no_token"
    BAD_TOKEN = "bad_token"
    OTHER_NAMESPACE = "b_writer"
    READER = "a_reader"
    WRITER = "a_writer"
    OPERATOR = "ops"


TOKENS: dict[Case, str] = {
    Case.OPERATOR: "ops-token-5b1f0c2e9d7a4c83",
    Case.WRITER: "a-writer-token-8e2d61f0b3c94a57",
    Case.READER: "a-reader-token-0f9c3b7e21d64a88",
    Case.OTHER_NAMESPACE: "b-writer-token-6a4e2d9c0b1f7e35",
}
ROLES: dict[Case, dict[str, str]] = {
    Case.OPERATOR: {"*": "admin"},
    Case.WRITER: {TEAM_A: "writer"},
    Case.READER: {TEAM_A: "reader"},
    Case.OTHER_NAMESPACE: {TEAM_B: "writer"},
}
BAD_TOKEN = "not-a-token-of-the-file-3c8e1a"


def metadata_of(case: Case) -> list[tuple[str, str]] | None:
    if case == Case.NO_TOKEN:
        return None
    token = BAD_TOKEN if case == Case.BAD_TOKEN else TOKENS[case]
    return [("authorization", f"Bearer {token}")]


# ------------------------------------------------------------------ outcomes and rows


class Outcome(enum.StrEnum):
    OK = "OK"  # lists: team-a's seeded objects are listed
    OK_FILTERED = "OK, none of team-a's listed"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND, as for a missing id"


class Kind(enum.StrEnum):
    READ = "read"
    LIST = "list"
    WRITE = "write"
    OPERATOR = "operator"
    ANY = "any authenticated"


UNAUTH = {Case.NO_TOKEN: Outcome.UNAUTHENTICATED, Case.BAD_TOKEN: Outcome.UNAUTHENTICATED}
OK, DENIED, HIDDEN = Outcome.OK, Outcome.PERMISSION_DENIED, Outcome.NOT_FOUND


def expected(kind: Kind, *, other: Outcome = DENIED) -> dict[Case, Outcome]:
    """What each caller gets from an RPC of `kind`; `other`: b_writer's answer to a write
    (PERMISSION_DENIED for a create naming team-a, NOT_FOUND for a team-a object)."""
    by_kind: dict[Kind, dict[Case, Outcome]] = {
        Kind.READ: {Case.OTHER_NAMESPACE: HIDDEN, Case.READER: OK, Case.WRITER: OK},
        Kind.LIST: {Case.OTHER_NAMESPACE: Outcome.OK_FILTERED, Case.READER: OK, Case.WRITER: OK},
        Kind.WRITE: {Case.OTHER_NAMESPACE: other, Case.READER: DENIED, Case.WRITER: OK},
        Kind.OPERATOR: {Case.OTHER_NAMESPACE: DENIED, Case.READER: DENIED, Case.WRITER: DENIED},
        Kind.ANY: {Case.OTHER_NAMESPACE: OK, Case.READER: OK, Case.WRITER: OK},
    }
    return {**UNAUTH, **by_kind[kind], Case.OPERATOR: OK}


@dataclasses.dataclass(frozen=True)
class Refs:
    """The objects a request names (ids), all in team-a but `model` (serving has no
    namespaces)."""

    profile: str  # SUCCEEDED, with samples (store)
    open_profile: str  # QUEUED in the store, never run: UpdateProfile / AppendSamples
    cost_model: str  # fitted from `profile`
    queued: str  # QUEUED in the profiler
    model: str  # loaded in serving
    cost_model_template: Any = None  # the fitted cost model's message (CreateCostModel)


# ids of the same shape that name nothing: a hidden object's error must be theirs
MISSING = Refs(
    profile="prof_00000000000a",
    open_profile="prof_00000000000b",
    cost_model="cm_00000000000c",
    queued="prof_00000000000d",
    model="m-00000000000e",
)
ID_FIELDS = ("profile", "open_profile", "cost_model", "queued", "model")

# Product bug: services/metrics/engine.py `_fit_samples` answers a profile the caller may
# not read with `visible_profile(..., field="profile_id")`, but a missing id with the
# store's own GetProfile error passed through, whose ErrorInfo field is "id". Code, reason
# (PROFILE_NOT_FOUND) and message ("no profile with id '...'") agree; the field does not,
# so a caller of another namespace learns that the profile exists.


@dataclasses.dataclass(frozen=True)
class Row:
    service: str  # store, serving, profiler, metrics
    method: str
    kind: Kind
    names: str  # the object (or namespace) the request names, for the table
    build: Callable[[Refs], Message]
    expect: Mapping[Case, Outcome]
    # the allowed call uses its object up: it gets a fresh one (a Refs field's name)
    fresh: str = ""
    # lists: (id, namespace) of each listed object, and the seeded team-a ids to find
    listed: Callable[[Any], list[tuple[str, str]]] | None = None
    seeded: Callable[[Refs], set[str]] | None = None
    # what a refused call must leave as it was (read as ops before and after it)
    snapshot: Callable[[Env], object] | None = None
    # more checks of an allowed call's response
    check: Callable[[Any, Refs], None] | None = None
    # known product bugs: case -> the exact wrong behaviour (xfail, strict)
    bugs: Mapping[Case, str] = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.service}.{self.method}"


# ------------------------------------------------------------------ builders


def _uid() -> str:
    return uuid.uuid4().hex


def new_profile(namespace: str, target_address: str = "") -> Profile:
    return Profile(
        id="",
        model=TINY,
        stack=CPU,
        plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,), repeats=1, warmups=0),
        target=Target(address=target_address),
        namespace=namespace,
    )


def unreachable() -> str:
    """A loopback address nothing listens on: a profile aimed at it rides out the outage
    (RUNNING, measuring nothing) until it is cancelled."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def synthetic_samples() -> list[Sample]:
    """Samples of a grid as a linear alpha / beta model would give them (fittable)."""
    now = datetime.now(UTC)
    out = []
    for p in PROMPTS:
        for o in OUTPUTS:
            for r in range(REPEATS):
                decode = tuple(2_000_000 + 1_000 * (p + k + 1) + 1_000 * r for k in range(o - 1))
                prefill = 1_000_000 + 10_000 * p
                out.append(
                    Sample(
                        prompt_tokens=p,
                        output_tokens=o,
                        prefill_ns=prefill,
                        decode_ns=decode,
                        total_ns=prefill + sum(decode),
                        repeat=r,
                        start_time=now,
                    )
                )
    return out


def _queries(n: int = 3) -> list[mpb.Query]:
    return [mpb.Query(prompt_tokens=16 * (i + 1), output_tokens=8) for i in range(n)]


def open_profile_update(refs: Refs) -> stpb.UpdateProfileRequest:
    changed = dataclasses.replace(
        new_profile(TEAM_A), id=refs.open_profile, state=ProfileState.RUNNING
    )
    return stpb.UpdateProfileRequest(profile=cv.profile_to_pb(changed))


def forged_append(refs: Refs) -> stpb.AppendSamplesRequest:
    forged = Sample(
        prompt_tokens=4,
        output_tokens=2,
        prefill_ns=1_000_000_000,
        decode_ns=(1_000_000_000,),
        total_ns=2_000_000_000,
        start_time=datetime.now(UTC),
    )
    return stpb.AppendSamplesRequest(
        profile_id=refs.open_profile, batch_id=_uid(), samples=[cv.sample_to_pb(forged)]
    )


def store_cost_model(refs: Refs) -> stpb.CreateCostModelRequest:
    cm = stpb.CreateCostModelRequest(request_id=_uid())
    cm.cost_model.CopyFrom(refs.cost_model_template)
    cm.cost_model.id = ""
    cm.cost_model.request_id = ""
    cm.cost_model.namespace = TEAM_A
    return cm


HELM_DOC = json.dumps(
    {
        "imported-tiny": {
            "runtime_per_output_token": 0.002,
            "runtime_for_prompt_tokens": {"1": 0.001, "16": 0.0012, "128": 0.0025},
        }
    }
)


def profiles_of(resp: Any) -> list[tuple[str, str]]:
    return [(p.id, p.namespace) for p in resp.profiles]


def cost_models_of(resp: Any) -> list[tuple[str, str]]:
    return [(c.id, c.namespace) for c in resp.cost_models]


# ------------------------------------------------------------------ snapshots (as ops)


def _ops(env: Env, service: str, method: str, request: Message) -> Any:
    return env.invoke(service, method, request, metadata_of(Case.OPERATOR))


def snap_profiles(ns: str) -> Callable[[Env], object]:
    def snap(env: Env) -> object:
        r = _ops(
            env, "store", "ListProfiles", stpb.ListProfilesRequest(page_size=1000, namespaces=[ns])
        )
        return sorted(p.id for p in r.profiles)

    return snap


def snap_cost_models(ns: str, profile: bool = False) -> Callable[[Env], object]:
    def snap(env: Env) -> object:
        req = stpb.ListCostModelsRequest(page_size=1000, namespaces=[ns])
        if profile:
            req.profile_id = env.refs.profile
        return sorted(c.id for c in _ops(env, "store", "ListCostModels", req).cost_models)

    return snap


def snap_open_profile(env: Env) -> object:
    pid = env.refs.open_profile
    prof = _ops(env, "store", "GetProfile", stpb.GetProfileRequest(id=pid)).profile
    samples = _ops(env, "store", "ListSamples", stpb.ListSamplesRequest(profile_id=pid)).samples
    return prof.state, prof.completed_samples, len(samples)


def snap_queued(env: Env) -> object:
    req = ppb.GetProfileRequest(id=env.refs.queued)
    return _ops(env, "profiler", "GetProfile", req).profile.state


def snap_models(env: Env) -> object:
    return sorted(
        m.model_id for m in _ops(env, "serving", "ListModels", spb.ListModelsRequest()).models
    )


# ------------------------------------------------------------------ checks of allowed calls


def check_profile_is(field: str) -> Callable[[Any, Refs], None]:
    def check(resp: Any, refs: Refs) -> None:
        assert resp.profile.id == getattr(refs, field)

    return check


def check_cost_model_is(resp: Any, refs: Refs) -> None:
    assert resp.cost_model.id == refs.cost_model and resp.cost_model.namespace == TEAM_A


def check_new_cost_model(resp: Any, refs: Refs) -> None:
    assert resp.cost_model.id and resp.cost_model.id != refs.cost_model
    assert (resp.cost_model.namespace, resp.cost_model.profile_id) == (TEAM_A, refs.profile)


def check_created_in_team_a(resp: Any, refs: Refs) -> None:
    assert resp.profile.id and resp.profile.namespace == TEAM_A


def check_estimate(resp: Any, refs: Refs) -> None:
    assert resp.summary.count == 3 and resp.summary.sum_seconds > 0


def check_watch(resp: Any, refs: Refs) -> None:
    assert [r.profile.id for r in resp] == [refs.profile]
    assert resp[-1].profile.state == cv.profile_state_to_pb(ProfileState.SUCCEEDED)


def check_cancelled(resp: Any, refs: Refs) -> None:
    assert resp.profile.id == refs.queued
    assert resp.profile.state == cv.profile_state_to_pb(ProfileState.CANCELLED)


def check_model_listed(resp: Any, refs: Refs) -> None:
    assert refs.model in {m.model_id for m in resp.models}


# ------------------------------------------------------------------ the table


def _rows() -> list[Row]:
    read, write, op = Kind.READ, Kind.WRITE, Kind.OPERATOR
    cm_ids = lambda r: {r.cost_model}  # noqa: E731
    tiny_spec = cv.spec_to_pb(resolve("tiny-gpt2"))
    return [
        # ---- store
        Row("store", "CreateProfile", write, "namespace team-a",
            lambda r: stpb.CreateProfileRequest(
                request_id=_uid(), profile=cv.profile_to_pb(new_profile(TEAM_A))),
            expected(write), snapshot=snap_profiles(TEAM_A), check=check_created_in_team_a),
        Row("store", "GetProfile", read, "team-a profile",
            lambda r: stpb.GetProfileRequest(id=r.profile), expected(read),
            check=check_profile_is("profile")),
        Row("store", "UpdateProfile", op, "team-a open profile", open_profile_update,
            expected(op), fresh="open_profile", snapshot=snap_open_profile,
            check=check_profile_is("open_profile")),
        Row("store", "ListProfiles", Kind.LIST, "namespaces (all readable)",
            lambda r: stpb.ListProfilesRequest(page_size=1000), expected(Kind.LIST),
            listed=profiles_of, seeded=lambda r: {r.profile, r.open_profile}),
        Row("store", "AppendSamples", op, "team-a open profile", forged_append,
            expected(op), fresh="open_profile", snapshot=snap_open_profile),
        Row("store", "ListSamples", read, "team-a profile's samples",
            lambda r: stpb.ListSamplesRequest(profile_id=r.profile), expected(read),
            check=lambda resp, r: _eq(len(resp.samples), len(PROMPTS) * len(OUTPUTS) * REPEATS)),
        Row("store", "CreateCostModel", write, "namespace team-a (team-a profile)",
            store_cost_model, expected(write), snapshot=snap_cost_models(TEAM_A),
            check=check_new_cost_model),
        Row("store", "GetCostModel", read, "team-a cost model",
            lambda r: stpb.GetCostModelRequest(id=r.cost_model), expected(read),
            check=check_cost_model_is),
        Row("store", "ListCostModels", Kind.LIST, "namespaces (all readable)",
            lambda r: stpb.ListCostModelsRequest(page_size=1000), expected(Kind.LIST),
            listed=cost_models_of, seeded=cm_ids),
        # ---- profiler
        Row("profiler", "CreateProfile", write, "namespace team-a",
            lambda r: ppb.CreateProfileRequest(
                request_id=_uid(), profile=cv.profile_to_pb(new_profile(TEAM_A, unreachable()))),
            expected(write), snapshot=snap_profiles(TEAM_A), check=check_created_in_team_a),
        Row("profiler", "GetProfile", read, "team-a profile",
            lambda r: ppb.GetProfileRequest(id=r.profile), expected(read),
            check=check_profile_is("profile")),
        Row("profiler", "ListProfiles", Kind.LIST, "namespaces (all readable)",
            lambda r: ppb.ListProfilesRequest(page_size=1000), expected(Kind.LIST),
            listed=profiles_of, seeded=lambda r: {r.profile, r.queued}),
        Row("profiler", "WatchProfile", read, "team-a profile",
            lambda r: ppb.WatchProfileRequest(id=r.profile), expected(read), check=check_watch),
        Row("profiler", "CancelProfile", write, "team-a queued profile",
            lambda r: ppb.CancelProfileRequest(id=r.queued), expected(write, other=HIDDEN),
            fresh="queued", snapshot=snap_queued, check=check_cancelled),
        # ---- metrics
        Row("metrics", "FitCostModel", write, "team-a profile",
            lambda r: mpb.FitCostModelRequest(
                request_id=_uid(), profile_id=r.profile, options=mpb.FitOptions(bootstrap=8)),
            expected(write, other=HIDDEN), snapshot=snap_cost_models(TEAM_A, profile=True),
            check=check_new_cost_model),
        Row("metrics", "GetCostModel", read, "team-a cost model",
            lambda r: mpb.GetCostModelRequest(id=r.cost_model), expected(read),
            check=check_cost_model_is),
        Row("metrics", "ListCostModels", Kind.LIST, "namespaces (all readable)",
            lambda r: mpb.ListCostModelsRequest(page_size=1000), expected(Kind.LIST),
            listed=cost_models_of, seeded=cm_ids),
        Row("metrics", "EstimateRuntime", read, "team-a cost model",
            lambda r: mpb.EstimateRuntimeRequest(cost_model_id=r.cost_model, queries=_queries()),
            expected(read), check=check_estimate),
        Row("metrics", "StreamEstimateRuntime", read, "team-a cost model",
            lambda r: mpb.StreamEstimateRuntimeRequest(
                cost_model_id=r.cost_model, prompt_tokens=[16, 32, 48], output_tokens=[8, 8, 8]),
            expected(read), check=check_estimate),
        Row("metrics", "DenoiseCostModel", write, "team-a profile",
            lambda r: mpb.DenoiseCostModelRequest(
                request_id=_uid(), profile_id=r.profile, method=mpb.DENOISE_METHOD_MIN),
            expected(write, other=HIDDEN), snapshot=snap_cost_models(TEAM_A, profile=True),
            check=check_new_cost_model),
        Row("metrics", "ComputeCost", read, "team-a cost model",
            lambda r: mpb.ComputeCostRequest(
                cost_model_id=r.cost_model, queries=_queries(), accelerator="cpu"),
            expected(read), check=lambda resp, r: _eq(resp.accelerators >= 1, True)),
        Row("metrics", "ComputeRoofline", read, "team-a cost model",
            lambda r: mpb.ComputeRooflineRequest(
                model_spec=tiny_spec, dtype=cv.dtype_to_pb("fp32"), accelerator="cpu",
                cost_model_id=r.cost_model),
            expected(read), check=lambda resp, r: _eq(bool(resp.prefill and resp.decode), True)),
        Row("metrics", "CompareCostModels", read, "team-a profile (as A and B)",
            lambda r: mpb.CompareCostModelsRequest(
                profile_id_a=r.profile, profile_id_b=r.profile, queries=_queries(), bootstrap=20),
            expected(read), check=lambda resp, r: _eq(resp.a_total_seconds > 0, True)),
        Row("metrics", "ComputePareto", read, "team-a cost model",
            lambda r: mpb.ComputeParetoRequest(
                cost_model_ids={"tiny": r.cost_model}, queries=_queries(),
                accuracy_csv="model,accuracy\ntiny,0.5\n"),
            expected(read), check=lambda resp, r: _eq([x.model for x in resp.rows], ["tiny"])),
        Row("metrics", "ExportHelm", read, "team-a cost model",
            lambda r: mpb.ExportHelmRequest(cost_model_ids={"tiny": r.cost_model}),
            expected(read), check=lambda resp, r: _eq(list(json.loads(resp.json)), ["tiny"])),
        Row("metrics", "ImportHelm", write, "namespace team-a",
            lambda r: mpb.ImportHelmRequest(request_id=_uid(), json=HELM_DOC, namespace=TEAM_A),
            expected(write), snapshot=snap_cost_models(TEAM_A),
            check=lambda resp, r: _eq([c.namespace for c in resp.cost_models], [TEAM_A])),
        # ---- serving
        Row("serving", "LoadModel", op, "tiny-gpt2 (shared device)",
            lambda r: spb.LoadModelRequest(
                request_id=_uid(), model=cv.model_ref_to_pb(TINY), stack=cv.stack_to_pb(CPU)),
            expected(op), snapshot=snap_models,
            check=lambda resp, r: _eq(resp.model.name, "tiny-gpt2")),
        Row("serving", "UnloadModel", op, "loaded model",
            lambda r: spb.UnloadModelRequest(model_id=r.model), expected(op), fresh="model",
            snapshot=snap_models),
        Row("serving", "ListModels", Kind.ANY, "-",
            lambda r: spb.ListModelsRequest(), expected(Kind.ANY), check=check_model_listed),
        Row("serving", "Generate", op, "loaded model",
            lambda r: spb.GenerateRequest(
                model_id=r.model, synthetic=spb.SyntheticPrompt(length=4, seed=1), output_tokens=2),
            expected(op), snapshot=snap_models,
            check=lambda resp, r: _eq((resp.prompt_tokens, resp.output_tokens), (4, 2))),
        Row("serving", "GetEnvironment", Kind.ANY, "-",
            lambda r: spb.GetEnvironmentRequest(), expected(Kind.ANY),
            check=lambda resp, r: _eq(bool(resp.entries), True)),
    ]  # fmt: skip


def _eq(got: object, want: object) -> None:
    assert got == want, (got, want)


ROWS = _rows()

SERVICES = {
    "store": (stpb.DESCRIPTOR.services_by_name["StoreService"], stpbg.StoreServiceStub),
    "serving": (spb.DESCRIPTOR.services_by_name["ServingService"], spbg.ServingServiceStub),
    "profiler": (ppb.DESCRIPTOR.services_by_name["ProfilerService"], ppbg.ProfilerServiceStub),
    "metrics": (mpb.DESCRIPTOR.services_by_name["MetricsService"], mpbg.MetricsServiceStub),
}


# ------------------------------------------------------------------ certificates


def _write_pki(dest: Path) -> tuple[TlsConfig, Path]:
    """(server side TLS config, the CA certificate): one CA, one server certificate for
    localhost / 127.0.0.1 that every server presents."""
    server, client = server_pki(dest)
    assert client.ca_file is not None
    return server, client.ca_file


def _write_tokens(dest: Path) -> AuthConfig:
    lines = []
    for case, token in TOKENS.items():
        roles = ", ".join(f'"{ns}" = "{role}"' for ns, role in ROLES[case].items())
        lines += ["[[token]]", f'sha256 = "{token_sha256(token)}"', f'subject = "{case}"']
        lines.append(f"roles = {{ {roles} }}")
    (dest / "tokens.toml").write_text("\n".join(lines) + "\n")
    (dest / "ops.token").write_text(TOKENS[Case.OPERATOR] + "\n")
    return AuthConfig(tokens_file=dest / "tokens.toml")


# ------------------------------------------------------------------ the servers


@dataclasses.dataclass
class Env:
    channels: dict[str, grpc.Channel]
    refs: Refs
    tmp: Path

    def invoke(
        self,
        service: str,
        method: str,
        request: Message,
        metadata: list[tuple[str, str]] | None,
    ) -> Any:
        """One real RPC: a unary response, a server stream's responses as a list."""
        descriptor, stub_class = SERVICES[service]
        m = descriptor.methods_by_name[method]
        fn = getattr(stub_class(self.channels[service]), method)
        if m.client_streaming:
            return fn(iter([request]), timeout=TIMEOUT_S, metadata=metadata)
        if m.server_streaming:
            return list(fn(request, timeout=TIMEOUT_S, metadata=metadata))
        return fn(request, timeout=TIMEOUT_S, metadata=metadata)

    def as_(self, case: Case, service: str, method: str, request: Message) -> Any:
        return self.invoke(service, method, request, metadata_of(case))

    def fresh(self, field: str) -> Refs:
        """`refs` with `field` naming a new object of the same kind (for an allowed call
        that uses its object up)."""
        if field == "open_profile":
            req = stpb.CreateProfileRequest(
                request_id=_uid(), profile=cv.profile_to_pb(new_profile(TEAM_A))
            )
            new = self.as_(Case.OPERATOR, "store", "CreateProfile", req).profile.id
        elif field == "queued":
            new = self.create_queued()
        elif field == "model":
            new = self.load_model()
        else:  # pragma: no cover - a row naming an unknown field
            raise AssertionError(field)
        return dataclasses.replace(self.refs, **{field: new})

    def create_queued(self) -> str:
        """A profile of a_writer's in team-a, QUEUED in the profiler behind the blocker
        (one worker, which the blocker holds until it is cancelled)."""
        req = ppb.CreateProfileRequest(
            request_id=_uid(), profile=cv.profile_to_pb(new_profile(TEAM_A, unreachable()))
        )
        prof = self.as_(Case.WRITER, "profiler", "CreateProfile", req).profile
        assert prof.state == cv.profile_state_to_pb(ProfileState.QUEUED)
        return str(prof.id)

    def load_model(self) -> str:
        req = spb.LoadModelRequest(
            request_id=_uid(), model=cv.model_ref_to_pb(TINY), stack=cv.stack_to_pb(CPU)
        )
        return str(self.as_(Case.OPERATOR, "serving", "LoadModel", req).model.model_id)


def _secure_channel(port: int, ca: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def _wait_for_state(env: Env, profile_id: str, state: ProfileState, within_s: float) -> None:
    """A bounded poll of the profiler's GetProfile (as ops)."""
    want = cv.profile_state_to_pb(state)
    deadline = time.monotonic() + within_s
    while True:
        got = env.as_(Case.OPERATOR, "profiler", "GetProfile", ppb.GetProfileRequest(id=profile_id))
        if got.profile.state == want:
            return
        assert time.monotonic() < deadline, (profile_id, got.profile.state, state)
        time.sleep(0.05)


def _seed(env: Env) -> tuple[Refs, str]:
    """The team-a objects the matrix names; returns them and the blocker's id."""
    ops, writer = Case.OPERATOR, Case.WRITER
    # a SUCCEEDED profile with samples, written as the profiler would (as ops)
    created = env.as_(
        ops,
        "store",
        "CreateProfile",
        stpb.CreateProfileRequest(
            request_id=_uid(),
            profile=cv.profile_to_pb(
                dataclasses.replace(
                    new_profile(TEAM_A),
                    plan=ProfilePlan(prompt_tokens=PROMPTS, output_tokens=OUTPUTS, repeats=REPEATS),
                )
            ),
        ),
    ).profile
    samples = [cv.sample_to_pb(s) for s in synthetic_samples()]
    env.as_(
        ops,
        "store",
        "AppendSamples",
        stpb.AppendSamplesRequest(profile_id=created.id, batch_id="b0", samples=samples),
    )
    done = cv.profile_from_pb(created)
    done = dataclasses.replace(
        done,
        state=ProfileState.SUCCEEDED,
        completed_samples=len(samples),
        end_time=datetime.now(UTC),
    )
    env.as_(
        ops, "store", "UpdateProfile", stpb.UpdateProfileRequest(profile=cv.profile_to_pb(done))
    )
    open_id = env.as_(
        ops,
        "store",
        "CreateProfile",
        stpb.CreateProfileRequest(request_id=_uid(), profile=cv.profile_to_pb(new_profile(TEAM_A))),
    ).profile.id
    # a cost model fitted by the metrics service, for a_writer
    fitted = env.as_(
        writer,
        "metrics",
        "FitCostModel",
        mpb.FitCostModelRequest(
            request_id=_uid(), profile_id=created.id, options=mpb.FitOptions(bootstrap=8)
        ),
    ).cost_model
    assert fitted.namespace == TEAM_A
    # the profiler's one worker held by a profile that never reaches a serving; one queued
    blocker = env.create_queued()
    _wait_for_state(env, blocker, ProfileState.RUNNING, within_s=30)
    queued = env.create_queued()
    model = env.load_model()
    refs = Refs(
        profile=created.id,
        open_profile=open_id,
        cost_model=fitted.id,
        queued=queued,
        model=model,
        cost_model_template=fitted,
    )
    return refs, blocker


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The four services over TLS with the tokens file, seeded (module docstring)."""
    tmp = tmp_path_factory.mktemp("authz")
    server_tls, ca = _write_pki(tmp)
    auth = _write_tokens(tmp)
    # the services that call others: the server side, the CA to verify the others and
    # the ops token to present to them
    both = dataclasses.replace(server_tls, ca_file=ca)
    service_auth = dataclasses.replace(auth, service_token_file=tmp / "ops.token")
    servers: list[GrpcServer] = []
    channels: dict[str, grpc.Channel] = {}
    try:
        store, store_port = build_store(
            StoreConfig(data_dir=tmp / "store", tls=server_tls, auth=auth)
        )
        servers.append(store)
        serving, serving_port = build_serving(ServingConfig(tls=server_tls, auth=auth))
        servers.append(serving)
        metrics, metrics_port = build_metrics(
            MetricsConfig(store_target=f"127.0.0.1:{store_port}", tls=both, auth=service_auth)
        )
        servers.append(metrics)
        profiler, profiler_port = build_profiler(
            ProfilerConfig(
                store_target=f"127.0.0.1:{store_port}",
                serving_target=f"127.0.0.1:{serving_port}",
                data_dir=tmp / "profiler",
                resume=False,
                contention_monitors=False,
                contention_checks=False,
                tls=both,
                auth=service_auth,
            )
        )
        servers.append(profiler)
        ports = {
            "store": store_port,
            "serving": serving_port,
            "metrics": metrics_port,
            "profiler": profiler_port,
        }
        channels = {name: _secure_channel(port, ca) for name, port in ports.items()}
        bootstrap = Env(channels, MISSING, tmp)
        refs, blocker = _seed(bootstrap)
        e = Env(channels, refs, tmp)
        yield e
        e.as_(Case.WRITER, "profiler", "CancelProfile", ppb.CancelProfileRequest(id=blocker))
        _wait_for_state(e, blocker, ProfileState.CANCELLED, within_s=60)
    finally:
        for ch in channels.values():
            ch.close()
        for s in reversed(servers):
            s.stop(5.0)


# ------------------------------------------------------------------ the tests


def test_every_rpc_has_a_row() -> None:
    """The table is complete: one row per RPC of the generated descriptors, no more."""
    generated = {(service, m.name) for service, (desc, _) in SERVICES.items() for m in desc.methods}
    rows = [(r.service, r.method) for r in ROWS]
    assert len(rows) == len(set(rows)), "a row appears twice"
    assert set(rows) == generated, (generated - set(rows), set(rows) - generated)
    assert len(generated) == 31
    for r in ROWS:
        assert set(r.expect) == set(Case), r.id
        assert (r.listed is None) == (r.kind != Kind.LIST), r.id
        if r.kind in (Kind.WRITE, Kind.OPERATOR):
            assert r.snapshot is not None, f"{r.id}: a write needs a snapshot"


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, str, str]:
    """(code, ErrorInfo reason, ErrorInfo field, message) of a failed RPC, from the wire."""
    call: Any = err
    reason = field = ""
    status = rpc_status.from_call(call)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, field = info.reason, info.metadata.get("field", "")
    return call.code(), reason, field, call.details() or ""


def _failure(env: Env, row: Row, case: Case, refs: Refs) -> tuple[grpc.StatusCode, str, str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        env.as_(case, row.service, row.method, row.build(refs))
    return _status(caught.value)


def _params() -> Iterator[Any]:
    for row in ROWS:
        for case in Case:
            marks = []
            if case in row.bugs:
                marks.append(pytest.mark.xfail(strict=True, reason=row.bugs[case]))
            yield pytest.param(row, case, id=f"{row.id}-{case}", marks=marks)


@pytest.mark.parametrize(("row", "case"), list(_params()))
def test_authz(env: Env, row: Row, case: Case) -> None:
    want = row.expect[case]
    refs = env.refs
    if want in (Outcome.OK, Outcome.OK_FILTERED):
        if want == Outcome.OK and row.fresh:
            refs = env.fresh(row.fresh)
        resp = env.as_(case, row.service, row.method, row.build(refs))
        if row.listed is not None:
            assert row.seeded is not None
            listed = row.listed(resp)
            if want == Outcome.OK_FILTERED:
                assert [x for x in listed if x[1] == TEAM_A] == []
            else:
                assert row.seeded(refs) <= {i for i, _ in listed}
        if row.check is not None:
            row.check(resp, refs)
        return

    before = row.snapshot(env) if row.snapshot is not None else None
    code, reason, field, message = _failure(env, row, case, refs)
    if want == Outcome.UNAUTHENTICATED:
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED), message
        assert BAD_TOKEN not in message
    elif want == Outcome.PERMISSION_DENIED:
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, NAMESPACE_FORBIDDEN), message
    else:
        assert want == Outcome.NOT_FOUND
        # exactly what the same caller hears about an id that names nothing
        missing = _failure(env, row, case, MISSING)
        assert missing[0] == grpc.StatusCode.NOT_FOUND, missing
        shown = message
        for name in ID_FIELDS:
            shown = shown.replace(getattr(refs, name), getattr(MISSING, name))
        assert (code, reason, field, shown) == missing
    if row.snapshot is not None:
        assert row.snapshot(env) == before, "a refused call changed what it named"


def test_health_needs_no_token_on_any_server(env: Env) -> None:
    """Health is the one service without a token (Kubernetes' probes), over the same TLS."""
    for name, channel in env.channels.items():
        r = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
        )
        assert r.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_needs_no_token_on_any_server(env: Env) -> None:
    """Reflection is the other service without a token (grpcurl-style discovery)."""
    for name, channel in env.channels.items():
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S))
        names = {s.name for s in answer.list_services_response.service}
        assert SERVICES[name][0].full_name in names, (name, names)


def test_a_cost_model_in_its_own_namespace_cannot_name_another_namespaces_profile(
    env: Env,
) -> None:
    """b_writer may write in team-b, but a cost model there naming team-a's profile is
    NOT_FOUND exactly as for a missing profile (and nothing is stored)."""

    def create(profile_id: str) -> tuple[grpc.StatusCode, str, str, str]:
        req = store_cost_model(env.refs)
        req.cost_model.namespace = TEAM_B
        req.cost_model.profile_id = profile_id
        with pytest.raises(grpc.RpcError) as caught:
            env.as_(Case.OTHER_NAMESPACE, "store", "CreateCostModel", req)
        return _status(caught.value)

    before = snap_cost_models(TEAM_B)(env)
    code, reason, field, message = create(env.refs.profile)
    missing = create(MISSING.profile)
    assert missing[:3] == (grpc.StatusCode.NOT_FOUND, "PROFILE_NOT_FOUND", "profile_id")
    assert (code, reason, field, message.replace(env.refs.profile, MISSING.profile)) == missing
    assert snap_cost_models(TEAM_B)(env) == before == []
