"""Property-based fuzzing of every request message of every RPC against the real suite
(issue 12): the four services in-process on 127.0.0.1 port 0, seeded with a SUCCEEDED
profile with samples, a cost model fitted from it and a loaded tiny-gpt2. Every RPC of every
service, enumerated from the generated descriptors (a new RPC is fuzzed without an edit
here), gets requests generated from its message descriptor: edge numbers (0, -1, extremes,
NaN, +-Inf), empty, long and odd strings, unknown enum numbers, bounded repeats and maps,
and the ids and page tokens of the seeded objects mixed in, or a valid request with some
fields replaced, so that requests reach the deep code paths.

Asserted for every example: the status is never INTERNAL or UNKNOWN, nor
DEADLINE_EXCEEDED (except for WatchProfile, which blocks by contract until its profile is
terminal); every error carries a google.rpc ErrorInfo with a reason; every service still
answers its health check SERVING; a refused mutating request leaves the seeded profile, its
samples, the seeded cost model and the counts of profiles, cost models and loaded models as
they were. Over the module: the process RSS grows by less than RSS_BOUND_MIB.

Profiles: hypothesis profile "ci" (fixed seed, a few examples per RPC) by default, the one
`make test` runs; "fuzz" (IDEALRT_FUZZ_EXAMPLES per RPC, default 1000) with
HYPOTHESIS_PROFILE=fuzz or IDEALRT_FUZZ_EXAMPLES set. IDEALRT_FUZZ_REPORT=path writes the
counts (examples and status codes per RPC, RSS growth, duration, machine) as JSON."""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message as pbmessage
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idealrt.clients.store import StoreClient
from idealrt.common.v1 import common_pb2 as cpb
from idealrt.core import catalog
from idealrt.core.domain import (
    Backend,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Sample,
    StackSpec,
)
from idealrt.core.hardware import ACCELERATORS
from idealrt.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from idealrt.profiler.v1 import profiler_service_pb2, profiler_service_pb2_grpc
from idealrt.services.suite import Suite, start_suite
from idealrt.serving.v1 import serving_service_pb2, serving_service_pb2_grpc
from idealrt.store.v1 import store_service_pb2, store_service_pb2_grpc

pytestmark = pytest.mark.fuzz

# ---- which RPCs, and how hard -----------------------------------------------------------

# service key (Suite address name) -> (messages module, grpc module)
MODULES: dict[str, tuple[ModuleType, ModuleType]] = {
    "serving": (serving_service_pb2, serving_service_pb2_grpc),
    "profiler": (profiler_service_pb2, profiler_service_pb2_grpc),
    "metrics": (metrics_service_pb2, metrics_service_pb2_grpc),
    "store": (store_service_pb2, store_service_pb2_grpc),
}
GEN_DIR = Path(__file__).resolve().parents[2] / "gen" / "idealrt"


def descriptor_rpcs() -> dict[str, tuple[str, MethodDescriptor]]:
    """`Service/Method` -> (service key, method) for every RPC the generated descriptors
    declare."""
    out: dict[str, tuple[str, MethodDescriptor]] = {}
    for key, (mod, _) in MODULES.items():
        for service in mod.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out[f"{service.full_name}/{method.name}"] = (key, method)
    return out


RPCS = descriptor_rpcs()
# RPCs documented to block: WatchProfile streams until its profile is terminal.
BLOCKING = {"idealrt.profiler.v1.ProfilerService/WatchProfile"}
# Each call's deadline; measurements and fits get longer ones.
DEADLINE_S = 30.0
SLOW_DEADLINE_S = 120.0
SLOW = {"Generate", "LoadModel", "FitCostModel", "DenoiseCostModel", "CompareCostModels"}
WATCH_DEADLINE_S = 2.0
# Mutating RPCs: a refused one must leave the stored data as it was.
MUTATING = {
    "CreateProfile",
    "UpdateProfile",
    "AppendSamples",
    "CreateCostModel",
    "FitCostModel",
    "DenoiseCostModel",
    "ImportHelm",
    "CancelProfile",
    "LoadModel",
    "UnloadModel",
}
RSS_BOUND_MIB = 500.0
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

CI_EXAMPLES = 25
FUZZ_EXAMPLES = int(os.environ.get("IDEALRT_FUZZ_EXAMPLES") or 1000)
_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, **_COMMON)


def _profile_name() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE", "")
    if name in ("ci", "fuzz"):
        return name
    return "fuzz" if os.environ.get("IDEALRT_FUZZ_EXAMPLES") else "ci"


def _examples(rpc: str) -> int:
    """Generate measures (slow): a fifth of the examples; WatchProfile waits its deadline
    on running profiles: a fifth too."""
    n = settings.get_profile(_profile_name()).max_examples
    return max(5, n // 5) if rpc.endswith(("/Generate", "/WatchProfile")) else n


# ---- seeded world -----------------------------------------------------------------------

ACCEL = "A100-80GB"


def _samples(seed: int, scale: float = 1.0) -> list[Sample]:
    """A small grid of plausible samples (alpha linear in the prompt, beta in the context)."""
    rng = np.random.default_rng(seed)
    out = []
    for p in (1, 64, 256):
        for o in (2, 16):
            for r in range(3):
                a = scale * (1e-3 + 2e-6 * p) * (1 + 0.01 * rng.standard_normal())
                d = [
                    scale * (5e-4 + 1e-8 * (p + i)) * (1 + 0.01 * rng.standard_normal())
                    for i in range(1, o)
                ]
                a_ns, d_ns = round(a * 1e9), tuple(round(x * 1e9) for x in d)
                out.append(
                    Sample(
                        prompt_tokens=p,
                        output_tokens=o,
                        prefill_ns=a_ns,
                        decode_ns=d_ns,
                        total_ns=a_ns + sum(d_ns),
                        repeat=r,
                    )
                )
    return out


@dataclass
class World:
    suite: Suite
    channels: dict[str, grpc.Channel]
    stubs: dict[str, Any]
    store: StoreClient
    profile_ids: list[str]
    cost_model_ids: list[str]
    model_ids: list[str]
    page_tokens: list[str]
    helm_json: list[str]
    load_request: serving_service_pb2.LoadModelRequest
    rss_start_kib: int = 0
    started: float = 0.0
    examples: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    created_ids: list[str] = field(default_factory=list)  # profiles fuzzed calls created

    def stub(self, rpc: str) -> Any:
        return self.stubs[RPCS[rpc][0]]

    def seeded_model_loaded(self) -> bool:
        r = self.stubs["serving"].ListModels(
            serving_service_pb2.ListModelsRequest(page_size=1000), timeout=DEADLINE_S
        )
        return self.model_ids[0] in {m.model_id for m in r.models}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _seed_profile(store: StoreClient, seed: int, scale: float) -> str:
    prof, _ = store.create_profile(
        Profile(
            id="",
            model=ModelRef(name="tiny-gpt2"),
            stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
            plan=ProfilePlan(prompt_tokens=(1, 64, 256), output_tokens=(2, 16)),
        )
    )
    store.append_samples(prof.id, "b0", _samples(seed, scale))
    store.update_profile(replace(prof, state=ProfileState.SUCCEEDED))
    return prof.id


def _pending_profile(store: StoreClient) -> str:
    return store.create_profile(
        Profile(
            id="",
            model=ModelRef(name="tiny-gpt2"),
            stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
            plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,)),
        )
    )[0].id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    suite = start_suite(
        data_dir=tmp_path_factory.mktemp("fuzz"), contention_monitors=False, contention_checks=False
    )
    channels = {k: grpc.insecure_channel(a) for k, a in suite.addresses().items()}
    stubs = {}
    for key, (mod, grpc_mod) in MODULES.items():
        (service,) = mod.DESCRIPTOR.services_by_name.values()
        stubs[key] = getattr(grpc_mod, f"{service.name}Stub")(channels[key])
    store = StoreClient(suite.store)
    try:
        a = _seed_profile(store, 1, 1.0)
        b = _seed_profile(store, 2, 1.2)
        # a profile the store holds as PENDING (no profiler runs it): it takes samples and
        # its WatchProfile blocks
        pending = _pending_profile(store)
        mpb = metrics_service_pb2
        fitted = stubs["metrics"].FitCostModel(
            mpb.FitCostModelRequest(profile_id=a, options=mpb.FitOptions(bootstrap=20)),
            timeout=SLOW_DEADLINE_S,
        )
        cm_id = fitted.cost_model.id
        load = serving_service_pb2.LoadModelRequest(
            model=cpb.ModelRef(name="tiny-gpt2"),
            stack=cpb.StackSpec(
                backend=cpb.BACKEND_PYTORCH,
                device="cpu",
                dtype=cpb.D_TYPE_FP32,
                options={"threads": "1"},
            ),
            max_context=64,
        )
        model_id = stubs["serving"].LoadModel(load, timeout=SLOW_DEADLINE_S).model.model_id
        helm = stubs["metrics"].ExportHelm(
            mpb.ExportHelmRequest(cost_model_ids={"tiny": cm_id}, prompt_tokens=[1, 64]),
            timeout=DEADLINE_S,
        )
        tokens = [
            store_list.next_page_token
            for store_list in (
                stubs["store"].ListProfiles(
                    store_service_pb2.ListProfilesRequest(page_size=1), timeout=DEADLINE_S
                ),
                stubs["store"].ListSamples(
                    store_service_pb2.ListSamplesRequest(profile_id=a, page_size=1),
                    timeout=DEADLINE_S,
                ),
                stubs["profiler"].ListProfiles(
                    profiler_service_pb2.ListProfilesRequest(page_size=1), timeout=DEADLINE_S
                ),
            )
        ]
        w = World(
            suite=suite,
            channels=channels,
            stubs=stubs,
            store=store,
            profile_ids=[a, b, pending],
            cost_model_ids=[cm_id],
            model_ids=[model_id],
            page_tokens=[t for t in tokens if t],
            helm_json=[helm.json] if helm.json else [],
            load_request=load,
        )
        w.rss_start_kib = rss_kib()
        w.started = time.monotonic()
        yield w
        _report(w)
    finally:
        store.close()
        for c in channels.values():
            c.close()
        suite.stop(1.0)


def _report(w: World) -> None:
    path = os.environ.get("IDEALRT_FUZZ_REPORT")
    if not path:
        return
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        rev = ""
    doc = {
        "profile": _profile_name(),
        "examples_per_rpc_setting": settings.get_profile(_profile_name()).max_examples,
        "examples": dict(sorted(w.examples.items())),
        "status_codes": {k: dict(sorted(v.items())) for k, v in sorted(w.codes.items())},
        "rss_start_mib": round(w.rss_start_kib / 1024, 1),
        "rss_end_mib": round(rss_kib() / 1024, 1),
        "rss_growth_mib": round((rss_kib() - w.rss_start_kib) / 1024, 1),
        "rss_bound_mib": RSS_BOUND_MIB,
        "duration_s": round(time.monotonic() - w.started, 1),
        "machine": {
            "node": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)),
        },
        "revision": rev,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# ---- strategies from descriptors ----------------------------------------------------------

I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)
ODD_STRINGS = [
    "",
    " ",
    "a",
    "-1",
    "0",
    "NaN",
    "inf",
    "null",
    "\x00",
    "\t\n",
    "é",
    "\u202e",
    "💥" * 3,
    "../../etc/passwd",
    "x" * 300,
    "y" * 70_000,
    "%s%n",
    "' OR 1=1 --",
    "{}",
    "[]",
]
FLOAT_EDGES = [0.0, -0.0, -1.0, 1.0, 0.5, 1e-300, 5e-324, 1e308, math.nan, math.inf, -math.inf]


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted(
        {
            v
            for v in (
                0,
                1,
                -1,
                2,
                3,
                4,
                7,
                16,
                64,
                1000,
                2**15,
                2**31 - 1,
                -(2**31),
                2**32 - 1,
                2**63 - 1,
                -(2**63),
                lo,
                hi,
            )
            if lo <= v <= hi
        }
    )
    return st.one_of(
        st.sampled_from(edges), st.integers(max(lo, 0), min(hi, 300)), st.integers(lo, hi)
    )


SMALL_INTS = st.one_of(st.sampled_from([0, -1, 2**31 - 1, -(2**31)]), st.integers(1, 4))


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=20))


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
    )
    return st.recursive(
        scalars,
        lambda c: st.one_of(
            st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)
        ),
        max_leaves=20,
    )


class Strategies:
    """Request strategies from message descriptors, with the world's valid values mixed in
    (drawn when the example runs, so a reloaded model's id is seen)."""

    def __init__(self, w: World) -> None:
        self.w = w

    def pick(self, values: Callable[[], list[str]]) -> st.SearchStrategy[str]:
        return st.integers(0, 1000).map(lambda i: values()[i % len(values())] if values() else "")

    def hints(self, f: FieldDescriptor, desc: Descriptor) -> list[st.SearchStrategy[Any]]:
        """Valid values for fields whose name says what they reference."""
        w, n = self.w, f.name
        if f.type != FieldDescriptor.TYPE_STRING:
            return []
        out: list[st.SearchStrategy[Any]] = []
        if n in ("profile_id", "profile_id_a", "profile_id_b") or (
            n == "id" and "Profile" in desc.name
        ):
            out.append(self.pick(lambda: w.profile_ids + w.created_ids[-4:]))
        if n in ("cost_model_id", "value") or (n == "id" and "CostModel" in desc.name):
            out.append(self.pick(lambda: w.cost_model_ids))
        if n == "id" and desc.name in ("Profile",):
            out.append(self.pick(lambda: w.profile_ids + w.created_ids[-4:]))
        if n == "model_id":
            out.append(self.pick(lambda: w.model_ids))
        if n == "page_token":
            out.append(self.pick(lambda: w.page_tokens))
        if n == "name" and desc.name in ("ModelRef", "ModelSpec"):
            out.append(st.sampled_from(["tiny-gpt2", "gpt2", *catalog.names()[:8]]))
        if n == "device":
            out.append(st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:99", "mps"]))
        if n == "accelerator":
            out.append(st.sampled_from(sorted(ACCELERATORS)))
        if n == "json":
            out.append(self.pick(lambda: w.helm_json))
            out.append(_json_values().map(json.dumps))
        if n == "kind":
            out.append(st.sampled_from(["idealized", "denoised", "helm", "idealized_fit"]))
        if n == "dtype":
            out.append(st.sampled_from(["fp32", "fp16", "bf16", "int8"]))
        if n == "accuracy_csv":
            out.append(
                st.sampled_from(
                    [
                        "",
                        "name,accuracy\ntiny,0.5\n",
                        "name,accuracy\ntiny,nan\n",
                        "a,b\n",
                        "name,accuracy\n" + "tiny,0.5\n" * 3,
                    ]
                )
            )
        return out

    def scalar(self, f: FieldDescriptor, desc: Descriptor) -> st.SearchStrategy[Any]:
        T = FieldDescriptor
        t = f.type
        if desc.full_name == "idealrt.serving.v1.GenerateRequest" and f.name in (
            "output_tokens",
            "batch_size",
        ):
            return SMALL_INTS  # Generate measures: keep its work small
        if t in (T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32):
            base = _ints(*I32)
        elif t in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64):
            base = _ints(*I64)
        elif t in (T.TYPE_UINT32, T.TYPE_FIXED32):
            base = _ints(0, 2**32 - 1)
        elif t in (T.TYPE_UINT64, T.TYPE_FIXED64):
            base = _ints(0, 2**64 - 1)
        elif t == T.TYPE_DOUBLE:
            base = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(-10, 10), st.floats())
        elif t == T.TYPE_FLOAT:
            base = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))
        elif t == T.TYPE_BOOL:
            base = st.booleans()
        elif t == T.TYPE_STRING:
            base = _strings()
        elif t == T.TYPE_BYTES:
            base = st.one_of(st.just(b""), st.binary(max_size=64), st.just(b"\xff" * 70_000))
        elif t == T.TYPE_ENUM:
            known = [v.number for v in f.enum_type.values]
            base = st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1]))
        else:
            raise AssertionError(f"no strategy for field type {t} of {f.full_name}")
        hints = self.hints(f, desc)
        return st.one_of(*hints, base) if hints else base

    def field_value(
        self, f: FieldDescriptor, desc: Descriptor, depth: int
    ) -> st.SearchStrategy[Any]:
        """A strategy for one field's value (a list for repeated fields, a dict for maps,
        a message for messages)."""
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            return st.dictionaries(self.map_key(kf, desc), self.single(vf, desc, depth), max_size=3)
        one = self.single(f, desc, depth)
        if f.is_repeated:
            return st.one_of(st.lists(one, max_size=4), st.lists(one, min_size=40, max_size=60))
        return one

    def map_key(self, f: FieldDescriptor, desc: Descriptor) -> st.SearchStrategy[Any]:
        if f.type == FieldDescriptor.TYPE_STRING:
            return st.one_of(
                st.sampled_from(["threads", "tiny", "A100-80GB", "", "x" * 300]),
                st.text(max_size=10),
            )
        return self.scalar(f, desc)

    def single(self, f: FieldDescriptor, desc: Descriptor, depth: int) -> st.SearchStrategy[Any]:
        if f.message_type is not None:
            return self.message(f.message_type, depth + 1)
        return self.scalar(f, desc)

    def message(
        self, desc: Descriptor, depth: int = 0, template: pbmessage.Message | None = None
    ) -> st.SearchStrategy[pbmessage.Message]:
        """A message of `desc`: each field unset or generated; with a template, each field
        kept from it (the most likely), replaced, or mutated recursively."""
        cls = _message_class(desc)

        def start() -> pbmessage.Message:
            msg = cls()
            if template is not None:
                msg.CopyFrom(template)
            return msg

        if depth > 4 or not desc.fields:  # deep enough, or nothing to draw
            return st.builds(start)

        @st.composite
        def build(draw: st.DrawFn) -> pbmessage.Message:
            msg = start()
            for f in desc.fields:
                has = template is not None and _has(template, f)
                if template is not None:
                    mode = draw(st.sampled_from(["keep"] * 8 + ["new", "clear"]))
                else:
                    mode = draw(st.sampled_from(["unset", "new"]))
                if mode in ("keep", "unset"):
                    if (
                        mode == "keep"
                        and has
                        and f.message_type is not None
                        and not f.is_repeated
                        and draw(st.booleans())
                    ):
                        sub = self.message(f.message_type, depth + 1, getattr(template, f.name))
                        getattr(msg, f.name).CopyFrom(draw(sub))
                    continue
                msg.ClearField(f.name)
                if mode == "clear":
                    continue
                _set(msg, f, draw(self.field_value(f, desc, depth)))
            return msg

        return build()


def _message_class(desc: Descriptor) -> type[pbmessage.Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def _has(msg: pbmessage.Message, f: FieldDescriptor) -> bool:
    if f.is_repeated:
        return len(getattr(msg, f.name)) > 0
    if f.message_type is not None or f.has_presence:
        return msg.HasField(f.name)
    return bool(getattr(msg, f.name))


def _set(msg: pbmessage.Message, f: FieldDescriptor, value: Any) -> None:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        target = getattr(msg, f.name)
        for k, v in value.items():
            if isinstance(v, pbmessage.Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif f.is_repeated:
        target = getattr(msg, f.name)
        if f.message_type is not None:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif f.message_type is not None:
        getattr(msg, f.name).CopyFrom(value)
    else:
        setattr(msg, f.name, value)


def templates(w: World) -> dict[str, list[pbmessage.Message]]:
    """Valid requests per RPC method name (the generated ones mutate a copy)."""
    spb, ppb, mpb, stpb = (
        serving_service_pb2,
        profiler_service_pb2,
        metrics_service_pb2,
        store_service_pb2,
    )
    p, cm, mid = w.profile_ids[0], w.cost_model_ids[0], w.model_ids[0]
    queries = [
        mpb.Query(prompt_tokens=16, output_tokens=4),
        mpb.Query(prompt_tokens=64, output_tokens=2),
    ]
    prof = w.store.get_profile(p)
    from idealrt.core import convert as cv

    prof_pb = cv.profile_to_pb(prof)
    sample = cv.sample_to_pb(_samples(3)[0])
    cm_pb = (
        w.stubs["store"]
        .GetCostModel(stpb.GetCostModelRequest(id=cm), timeout=DEADLINE_S)
        .cost_model
    )
    new_prof = type(prof_pb)()
    new_prof.CopyFrom(prof_pb)
    for name in (
        "id",
        "state",
        "create_time",
        "start_time",
        "end_time",
        "request_id",
        "completed_samples",
        "total_samples",
    ):
        new_prof.ClearField(name)
    for name in ("prompt_tokens", "output_tokens"):
        new_prof.plan.ClearField(name)
    new_prof.plan.prompt_tokens.extend([4])
    new_prof.plan.output_tokens.extend([2])
    new_prof.plan.repeats = 1
    new_prof.plan.lease = (
        new_prof.plan.DESCRIPTOR.fields_by_name["lease"]
        .enum_type.values_by_name["LEASE_POLICY_WAIT"]
        .number
    )
    queued = type(new_prof)()
    queued.CopyFrom(new_prof)
    queued.state = (
        queued.DESCRIPTOR.fields_by_name["state"]
        .enum_type.values_by_name["PROFILE_STATE_QUEUED"]
        .number
    )
    spec = cv.spec_to_pb(catalog.resolve("tiny-gpt2"))
    return {
        "LoadModel": [w.load_request],
        "UnloadModel": [spb.UnloadModelRequest(model_id=mid)],
        "ListModels": [spb.ListModelsRequest(page_size=2)],
        "Generate": [
            spb.GenerateRequest(
                model_id=mid, synthetic=spb.SyntheticPrompt(length=4), output_tokens=2
            ),
            spb.GenerateRequest(
                model_id=mid, token_ids=spb.TokenIds(ids=[1, 2, 3]), output_tokens=2
            ),
        ],
        "GetEnvironment": [spb.GetEnvironmentRequest()],
        "CreateProfile": [
            ppb.CreateProfileRequest(profile=new_prof),
            stpb.CreateProfileRequest(profile=queued),
        ],
        "GetProfile": [ppb.GetProfileRequest(id=p), stpb.GetProfileRequest(id=p)],
        "ListProfiles": [
            ppb.ListProfilesRequest(page_size=1),
            stpb.ListProfilesRequest(page_size=1),
        ],
        "WatchProfile": [ppb.WatchProfileRequest(id=p)],
        "CancelProfile": [ppb.CancelProfileRequest(id=p)],
        "UpdateProfile": [stpb.UpdateProfileRequest(profile=prof_pb)],
        "AppendSamples": [
            stpb.AppendSamplesRequest(profile_id=pid, batch_id="fz", samples=[sample])
            for pid in (p, w.profile_ids[2])
        ],
        "ListSamples": [stpb.ListSamplesRequest(profile_id=p, page_size=2)],
        "CreateCostModel": [stpb.CreateCostModelRequest(cost_model=cm_pb)],
        "GetCostModel": [mpb.GetCostModelRequest(id=cm), stpb.GetCostModelRequest(id=cm)],
        "ListCostModels": [
            mpb.ListCostModelsRequest(page_size=1),
            stpb.ListCostModelsRequest(page_size=1),
        ],
        "FitCostModel": [
            mpb.FitCostModelRequest(profile_id=p, options=mpb.FitOptions(bootstrap=5))
        ],
        "EstimateRuntime": [
            mpb.EstimateRuntimeRequest(cost_model_id=cm, queries=queries, intervals=True)
        ],
        "StreamEstimateRuntime": [
            mpb.StreamEstimateRuntimeRequest(
                cost_model_id=cm, prompt_tokens=[16], output_tokens=[4]
            )
        ],
        "DenoiseCostModel": [
            mpb.DenoiseCostModelRequest(
                profile_id=p, method=mpb.DENOISE_METHOD_QUANTILE, quantile=0.25
            )
        ],
        "ComputeCost": [
            mpb.ComputeCostRequest(
                cost_model_id=cm, queries=queries, accelerator=ACCEL, model_spec=spec
            )
        ],
        "ComputeRoofline": [
            mpb.ComputeRooflineRequest(
                dtype=cpb.D_TYPE_FP32,
                model_spec=spec,
                accelerator=ACCEL,
                prompt_tokens=[16],
                contexts=[32],
                cost_model_id=cm,
            )
        ],
        "CompareCostModels": [
            mpb.CompareCostModelsRequest(
                profile_id_a=p, profile_id_b=w.profile_ids[1], queries=queries, bootstrap=20
            )
        ],
        "ComputePareto": [
            mpb.ComputeParetoRequest(
                cost_model_ids={"tiny": cm},
                queries=queries,
                accuracy_csv="name,accuracy\ntiny,0.5\n",
            )
        ],
        "ExportHelm": [mpb.ExportHelmRequest(cost_model_ids={"tiny": cm}, prompt_tokens=[1, 64])],
        "ImportHelm": [mpb.ImportHelmRequest(json=j) for j in w.helm_json],
    }


def request_strategy(rpc: str, w: World, strategies: Strategies) -> st.SearchStrategy[Any]:
    _, method = RPCS[rpc]
    desc = method.input_type
    own = [t for t in templates(w).get(method.name, []) if t.DESCRIPTOR is desc]
    one = st.one_of(strategies.message(desc), *(strategies.message(desc, 0, t) for t in own))
    if method.client_streaming:
        return st.lists(one, min_size=0, max_size=4)
    return one


# ---- one call and its checks ----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    profiles: tuple[bytes, ...]
    samples: tuple[int, ...]
    cost_models: tuple[bytes, ...]
    n_profiles: int
    n_cost_models: int
    n_models: int


def _count(list_call: Callable[[str], tuple[int, str]]) -> int:
    n, token = 0, ""
    while True:
        got, token = list_call(token)
        n += got
        if not token:
            return n


def snapshot(w: World) -> Snapshot:
    s, spb = w.stubs["store"], store_service_pb2

    def samples(pid: str) -> int:
        def page(t: str) -> tuple[int, str]:
            r = s.ListSamples(
                spb.ListSamplesRequest(profile_id=pid, page_size=1000, page_token=t),
                timeout=DEADLINE_S,
            )
            return len(r.samples), r.next_page_token

        return _count(page)

    def profiles(t: str) -> tuple[int, str]:
        r = s.ListProfiles(
            spb.ListProfilesRequest(page_size=1000, page_token=t), timeout=DEADLINE_S
        )
        return len(r.profiles), r.next_page_token

    def cost_models(t: str) -> tuple[int, str]:
        r = s.ListCostModels(
            spb.ListCostModelsRequest(page_size=1000, page_token=t), timeout=DEADLINE_S
        )
        return len(r.cost_models), r.next_page_token

    models = w.stubs["serving"].ListModels(
        serving_service_pb2.ListModelsRequest(page_size=1000), timeout=DEADLINE_S
    )
    return Snapshot(
        profiles=tuple(
            s.GetProfile(spb.GetProfileRequest(id=p), timeout=DEADLINE_S).profile.SerializeToString(
                deterministic=True
            )
            for p in w.profile_ids
        ),
        samples=tuple(samples(p) for p in w.profile_ids),
        cost_models=tuple(
            s.GetCostModel(
                spb.GetCostModelRequest(id=c), timeout=DEADLINE_S
            ).cost_model.SerializeToString(deterministic=True)
            for c in w.cost_model_ids
        ),
        n_profiles=_count(profiles),
        n_cost_models=_count(cost_models),
        n_models=len(models.models),
    )


def invoke(w: World, rpc: str, request: Any) -> tuple[grpc.StatusCode, Any, grpc.RpcError | None]:
    """Call `rpc` over the real channel: (code, response or None, error or None)."""
    _, method = RPCS[rpc]
    call = getattr(w.stub(rpc), method.name)
    timeout = (
        WATCH_DEADLINE_S
        if rpc in BLOCKING
        else SLOW_DEADLINE_S
        if method.name in SLOW
        else DEADLINE_S
    )
    try:
        if method.server_streaming:
            stream = call(request, timeout=timeout)
            got = []
            try:
                for resp in stream:
                    got.append(resp)
                    if len(got) >= 3:
                        break
            finally:
                stream.cancel()
            return grpc.StatusCode.OK, got, None
        if method.client_streaming:
            return grpc.StatusCode.OK, call(iter(request), timeout=timeout), None
        return grpc.StatusCode.OK, call(request, timeout=timeout), None
    except grpc.RpcError as err:
        return err.code(), None, err  # type: ignore[attr-defined]


def check_error(rpc: str, request: Any, code: grpc.StatusCode, err: grpc.RpcError) -> None:
    shown = _shown(request)
    assert code not in BAD_CODES, f"{rpc} -> {code.name}: {err.details()}\n{shown}"  # type: ignore[attr-defined]
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert rpc in BLOCKING, f"{rpc} ran past its deadline\n{shown}"
        return
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None and status.details, f"{rpc} -> {code.name} without details\n{shown}"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info), f"{rpc} -> {code.name}: detail is no ErrorInfo\n{shown}"
    assert info.reason, f"{rpc} -> {code.name}: ErrorInfo without a reason\n{shown}"


def _shown(request: Any) -> str:
    text = str(request)
    return text if len(text) < 4000 else text[:4000] + "..."


def check_health(w: World) -> None:
    for key, channel in w.channels.items():
        stub = health_pb2_grpc.HealthStub(channel)
        r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_S)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, key


def after_success(w: World, rpc: str, request: Any, response: Any) -> None:
    """Undo what a successful fuzzed call started: profiles it created are cancelled,
    models it loaded unloaded, an unloaded seeded model loaded again, a finished PENDING
    seed replaced."""
    name = RPCS[rpc][1].name
    if name == "CreateProfile":
        w.created_ids.append(response.profile.id)
    if rpc.startswith("idealrt.profiler.") and name == "CreateProfile":
        pid = response.profile.id
        try:
            w.stubs["profiler"].CancelProfile(
                profiler_service_pb2.CancelProfileRequest(id=pid), timeout=DEADLINE_S
            )
        except grpc.RpcError as err:  # already terminal: fine
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err  # type: ignore[attr-defined]
        # wait until it is terminal, so that nothing it does runs into later examples
        for _ in w.stubs["profiler"].WatchProfile(
            profiler_service_pb2.WatchProfileRequest(id=pid), timeout=SLOW_DEADLINE_S
        ):
            pass
    elif name == "LoadModel" and response.model.model_id not in w.model_ids:
        w.stubs["serving"].UnloadModel(
            serving_service_pb2.UnloadModelRequest(model_id=response.model.model_id),
            timeout=DEADLINE_S,
        )
    if name in ("CancelProfile", "UpdateProfile"):
        # the PENDING seed may be terminal now: a fresh one keeps AppendSamples and
        # WatchProfile reaching their open-profile paths
        w.profile_ids[2] = _pending_profile(w.store)
    if name == "UnloadModel" and not w.seeded_model_loaded():
        r = w.stubs["serving"].LoadModel(w.load_request, timeout=SLOW_DEADLINE_S)
        w.model_ids[0] = r.model.model_id


# ---- the tests ------------------------------------------------------------------------------


def test_fuzzed_set_is_every_rpc_of_the_descriptors() -> None:
    """The parametrization below is the descriptors' RPCs, and every generated service
    module under gen/ is one this module fuzzes (a new service must be added to MODULES)."""
    declared = set()
    for path in sorted(GEN_DIR.glob("*/v1/*_pb2.py")):
        mod = __import__(
            f"idealrt.{path.parent.parent.name}.v1.{path.stem}", fromlist=["DESCRIPTOR"]
        )
        for service in mod.DESCRIPTOR.services_by_name.values():
            declared |= {f"{service.full_name}/{m.name}" for m in service.methods}
    assert declared and set(RPCS) == declared
    assert declared >= BLOCKING


@pytest.mark.parametrize(
    "rpc", sorted(RPCS), ids=lambda r: r.split(".")[1] + "." + r.split("/")[-1]
)
def test_fuzz_rpc(rpc: str, world: World) -> None:
    strategies = Strategies(world)
    strategy = request_strategy(rpc, world, strategies)
    name = RPCS[rpc][1].name

    @settings(settings.get_profile(_profile_name()), max_examples=_examples(rpc))
    @given(request=strategy)
    def run(request: Any) -> None:
        before = snapshot(world) if name in MUTATING else None
        code, response, err = invoke(world, rpc, request)
        world.examples[rpc] += 1
        world.codes[rpc][code.name] += 1
        if err is not None:
            check_error(rpc, request, code, err)
        check_health(world)
        if before is not None and err is not None:
            assert snapshot(world) == before, (
                f"refused {rpc} changed stored data\n{_shown(request)}"
            )
        if err is None:
            after_success(world, rpc, request, response)

    run()


def test_rss_growth_is_bounded(world: World) -> None:
    """Runs after the fuzz (file order): the process (all four servers) grew by less than
    RSS_BOUND_MIB over every example."""
    growth_mib = (rss_kib() - world.rss_start_kib) / 1024
    print(f"fuzz: RSS growth {growth_mib:.1f} MiB over {sum(world.examples.values())} examples")
    assert growth_mib < RSS_BOUND_MIB
