"""The serving server refuses hostile input before doing any work on it (issue 12): stack
options beyond the machine, prompts beyond the limits, weights paths that are no
checkpoint, and the odd values a fuzz of the RPCs found reaching INTERNAL. Each case runs
over a real server (`build_server(cfg)` on 127.0.0.1:0) and checks that it still answers."""

from __future__ import annotations

import os
import shutil
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.common.v1 import common_pb2 as cpb
from idealrt.core import catalog
from idealrt.core import convert as cv
from idealrt.core.config import ServingConfig
from idealrt.core.domain import StackSpec
from idealrt.core.fingerprint import format_cores
from idealrt.services.serving.decoder import build_decoder
from idealrt.services.serving.server import build_server
from idealrt.services.serving.validate import (
    MAX_LAYERS,
    ServingLimits,
    check_stack_options,
    shown,
)
from idealrt.serving.v1 import serving_service_pb2 as pb
from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TIMEOUT_S = 120.0
CPUS = frozenset(os.sched_getaffinity(0))
PYTORCH, ONNXRUNTIME, TRANSFORMERS = (
    cpb.BACKEND_PYTORCH,
    cpb.BACKEND_ONNXRUNTIME,
    cpb.BACKEND_TRANSFORMERS,
)

Stub = pbg.ServingServiceStub


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """Loads with a `threads` option set torch's process-wide thread count."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _serve(cfg: ServingConfig) -> Iterator[Stub]:
    server, port = build_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pbg.ServingServiceStub(channel)
    finally:
        channel.close()
        server.stop(0)


@pytest.fixture(scope="module")
def stub() -> Iterator[Stub]:
    """A serving server with the default limits (threads: this process' CPUs)."""
    yield from _serve(ServingConfig())


@pytest.fixture(scope="module")
def strict_stub() -> Iterator[Stub]:
    """A serving server with tight limits from its config."""
    yield from _serve(ServingConfig(max_threads=1, max_prompt_tokens=16))


@pytest.fixture(scope="module")
def model_id(stub: Stub) -> str:
    """tiny-gpt2 loaded at max_context 64 on the default server."""
    r = stub.LoadModel(_load(max_context=64), timeout=TIMEOUT_S)
    return r.model.model_id


def _stack(backend: int = PYTORCH, device: str = "cpu", **options: str) -> cpb.StackSpec:
    return cpb.StackSpec(backend=backend, device=device, dtype=cpb.D_TYPE_FP32, options=options)


def _load(
    model: cpb.ModelRef | None = None, stack: cpb.StackSpec | None = None, **kw: Any
) -> pb.LoadModelRequest:
    return pb.LoadModelRequest(
        model=model or cpb.ModelRef(name="tiny-gpt2"), stack=stack or _stack(), **kw
    )


def _weights(path: str | Path, name: str = "tiny-gpt2") -> cpb.ModelRef:
    return cpb.ModelRef(name=name, weights_path=str(path))


def _refused(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo.reason, ErrorInfo field) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=TIMEOUT_S)
    err: Any = exc.value
    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    if status is not None and status.details:
        assert status.details[0].Unpack(info)
    return err.code(), info.reason, info.metadata.get("field", "")


def _generate(model_id: str, length: int = 4, **kw: Any) -> pb.GenerateRequest:
    kw.setdefault("output_tokens", 2)
    return pb.GenerateRequest(model_id=model_id, synthetic=pb.SyntheticPrompt(length=length), **kw)


def _still_answers(stub: Stub, model_id: str) -> None:
    r = stub.Generate(_generate(model_id, 5, output_tokens=3), timeout=TIMEOUT_S)
    assert (r.prompt_tokens, r.output_tokens) == (5, 3)


# ---- 1. threads and cores ----
@pytest.mark.parametrize("backend", [PYTORCH, ONNXRUNTIME, TRANSFORMERS])
@pytest.mark.parametrize("threads", [str(len(CPUS) + 1), "100000", "9" * 30, "0", "-1"])
def test_threads_beyond_the_cpus_are_refused(
    stub: Stub, model_id: str, backend: int, threads: str
) -> None:
    got = _refused(stub.LoadModel, _load(stack=_stack(backend, threads=threads)))
    assert got == (INVALID, "OPTION_INVALID", "stack.options.threads")
    _still_answers(stub, model_id)


@pytest.mark.parametrize("threads", ["1_0", "\u0663", "+1", "1.0", "2e1", " "])
def test_threads_must_be_plain_decimal(stub: Stub, threads: str) -> None:
    if not threads.strip():  # blank is absent: the backend's default
        stub.LoadModel(_load(stack=_stack(threads=threads)), timeout=TIMEOUT_S)
        return
    got = _refused(stub.LoadModel, _load(stack=_stack(threads=threads)))
    assert got == (INVALID, "OPTION_INVALID", "stack.options.threads")


def test_threads_limit_comes_from_the_config(strict_stub: Stub) -> None:
    got = _refused(strict_stub.LoadModel, _load(stack=_stack(threads="2")))
    assert got == (INVALID, "OPTION_INVALID", "stack.options.threads")
    r = strict_stub.LoadModel(_load(stack=_stack(threads="1")), timeout=TIMEOUT_S)
    assert r.model.stack.options["threads"] == "1"
    strict_stub.UnloadModel(pb.UnloadModelRequest(model_id=r.model.model_id), timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    "cores",
    [
        str(max(CPUS) + 1),
        f"0-{max(CPUS) + 1}",
        "0-999999999999",  # parse_cores would expand this range without end
        "9" * 40,
        "0," * 5000,
        "abc",
        "3-1",
        "-1",
    ],
)
def test_cores_outside_the_affinity_are_refused(stub: Stub, model_id: str, cores: str) -> None:
    got = _refused(stub.LoadModel, _load(stack=_stack(cores=cores)))
    assert got == (INVALID, "CPU_CORES_INVALID", "stack.options.cores")
    _still_answers(stub, model_id)


def test_cores_are_checked_against_the_affinity_at_start() -> None:
    """Pinning one model narrows the live affinity; the next load may still name any CPU
    the server started with (the check uses the set read at start-up)."""
    limits = ServingLimits.from_config(ServingConfig(), cpus=frozenset({0, 1, 2, 5}))
    assert limits.max_threads == 4
    assert check_stack_options(StackSpec(options={"cores": "5,0-1"}), limits) == {0, 1, 5}
    assert check_stack_options(StackSpec(), limits) is None
    assert format_cores(limits.cpus) == "0-2,5"
    assert ServingLimits.from_config(ServingConfig(max_threads=64), cpus=CPUS).max_threads == 64


@pytest.mark.parametrize(
    ("backend", "option", "value"),
    [
        (ONNXRUNTIME, "kv_bucket", "9" * 20),
        (ONNXRUNTIME, "kv_bucket", "0"),
        (ONNXRUNTIME, "kv_bucket", "257"),  # tiny-gpt2 has 256 positions
        (cpb.BACKEND_TENSORRT, "max_batch", "65"),
        (cpb.BACKEND_TENSORRT, "max_prompt", "65"),  # max_context 64
        (cpb.BACKEND_TENSORRT, "workspace_mib", "9" * 20),
    ],
)
def test_numeric_options_out_of_range_are_refused(
    stub: Stub, backend: int, option: str, value: str
) -> None:
    got = _refused(stub.LoadModel, _load(stack=_stack(backend, **{option: value}), max_context=64))
    assert got == (INVALID, "OPTION_INVALID", f"stack.options.{option}")


def test_unknown_option_names_are_refused(stub: Stub) -> None:
    for options in ({"fast": "1"}, {"": "1"}, {"threads ": "1"}):
        got = _refused(stub.LoadModel, _load(stack=_stack(**options)))
        assert got == (INVALID, "OPTION_UNKNOWN", "stack.options")


# ---- 2. prompts, outputs and batches ----
@pytest.mark.parametrize("length", [2147483647, 10**7, (1 << 20) + 1])
def test_huge_synthetic_prompt_is_refused_before_it_is_built(
    stub: Stub, model_id: str, length: int
) -> None:
    tracemalloc.start()
    try:
        got = _refused(stub.Generate, _generate(model_id, length))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == (INVALID, "PROMPT_TOO_LONG", "prompt.length")
    assert peak < 16 << 20  # drawing 10**7 tokens kept 218 MiB
    _still_answers(stub, model_id)


def test_prompt_longer_than_max_context_names_the_prompt(stub: Stub, model_id: str) -> None:
    assert _refused(stub.Generate, _generate(model_id, 64)) == (
        INVALID,
        "CONTEXT_EXCEEDED",
        "prompt.length",
    )
    ids = pb.GenerateRequest(
        model_id=model_id, token_ids=pb.TokenIds(ids=[1] * 500_000), output_tokens=2
    )
    assert _refused(stub.Generate, ids) == (INVALID, "CONTEXT_EXCEEDED", "prompt.token_ids")
    # room for the prompt, not for the output: the output is what is too long
    assert _refused(stub.Generate, _generate(model_id, 60, output_tokens=5)) == (
        INVALID,
        "CONTEXT_EXCEEDED",
        "output_tokens",
    )
    _still_answers(stub, model_id)


def test_prompt_limit_comes_from_the_config(strict_stub: Stub) -> None:
    m = strict_stub.LoadModel(_load(max_context=64), timeout=TIMEOUT_S).model
    try:
        assert _refused(strict_stub.Generate, _generate(m.model_id, 17)) == (
            INVALID,
            "PROMPT_TOO_LONG",
            "prompt.length",
        )
        ids = pb.GenerateRequest(
            model_id=m.model_id, token_ids=pb.TokenIds(ids=[1] * 17), output_tokens=2
        )
        assert _refused(strict_stub.Generate, ids) == (
            INVALID,
            "PROMPT_TOO_LONG",
            "prompt.token_ids",
        )
        r = strict_stub.Generate(_generate(m.model_id, 16), timeout=TIMEOUT_S)
        assert r.prompt_tokens == 16
    finally:
        strict_stub.UnloadModel(pb.UnloadModelRequest(model_id=m.model_id), timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    ("kw", "reason", "field"),
    [
        ({"output_tokens": 2147483647}, "CONTEXT_EXCEEDED", "output_tokens"),
        ({"output_tokens": -5}, "OUTPUT_TOKENS_INVALID", "output_tokens"),
        ({"batch_size": 2147483647}, "BATCH_SIZE_INVALID", "batch_size"),
        ({"batch_size": -1}, "BATCH_SIZE_INVALID", "batch_size"),
        ({"batch_size": 65}, "BATCH_SIZE_INVALID", "batch_size"),
    ],
)
def test_absurd_outputs_and_batches_are_refused(
    stub: Stub, model_id: str, kw: dict[str, int], reason: str, field: str
) -> None:
    assert _refused(stub.Generate, _generate(model_id, 4, **kw)) == (INVALID, reason, field)
    _still_answers(stub, model_id)


# ---- 3. weights that are not a checkpoint ----
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> a path that is no usable checkpoint of tiny-gpt2 (and "ok*", two that are)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("checkpoints")
    sd = {
        k: v.contiguous()
        for k, v in build_decoder(catalog.resolve("tiny-gpt2"), seed=1).state_dict().items()
    }
    save_file(sd, str(d / "ok.safetensors"))
    torch.save(sd, d / "ok.pt")
    st, pt = (d / "ok.safetensors").read_bytes(), (d / "ok.pt").read_bytes()
    (d / "text.txt").write_text("hello, not weights\n")
    (d / "empty.bin").write_bytes(b"")
    (d / "truncated.safetensors").write_bytes(st[: len(st) // 2])
    (d / "truncated.pt").write_bytes(pt[: len(pt) // 2])
    (d / "garbage.safetensors").write_bytes(os.urandom(256))
    (d / "header-too-long.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (d / "header-not-json.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{")
    torch.save([1, 2, 3], d / "list.pt")
    (d / "no-weights").mkdir()
    (d / "no-weights" / "config.json").write_text("{}")
    bad_index = d / "bad-index"
    bad_index.mkdir()
    (bad_index / "model.safetensors.index.json").write_text("not json")
    escaping = d / "escaping-index"
    escaping.mkdir()
    (escaping / "model.safetensors.index.json").write_text(
        '{"weight_map": {"embed": "../ok.safetensors"}}'
    )
    missing = d / "missing-shard"
    missing.mkdir()
    (missing / "model.safetensors.index.json").write_text(
        '{"weight_map": {"embed": "model-00001.safetensors"}}'
    )
    os.mkfifo(d / "fifo.safetensors")
    return {p.name: p for p in d.iterdir()}


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("text.txt", "WEIGHTS_INVALID"),
        ("empty.bin", "WEIGHTS_INVALID"),
        ("truncated.safetensors", "WEIGHTS_INVALID"),
        ("truncated.pt", "WEIGHTS_INVALID"),
        ("garbage.safetensors", "WEIGHTS_INVALID"),
        ("header-too-long.safetensors", "WEIGHTS_INVALID"),
        ("header-not-json.safetensors", "WEIGHTS_INVALID"),
        ("list.pt", "WEIGHTS_INVALID"),
        ("fifo.safetensors", "WEIGHTS_INVALID"),  # reading it would block the load for good
        ("bad-index", "WEIGHTS_INVALID"),
        ("escaping-index", "WEIGHTS_INVALID"),
        ("missing-shard", "WEIGHTS_NOT_FOUND"),
        ("no-weights", "WEIGHTS_NOT_FOUND"),
    ],
)
def test_weights_that_are_no_checkpoint_are_invalid(
    stub: Stub, model_id: str, checkpoints: dict[str, Path], name: str, reason: str
) -> None:
    got = _refused(stub.LoadModel, _load(_weights(checkpoints[name])))
    assert got == (INVALID, reason, "model.weights_path")
    _still_answers(stub, model_id)


@pytest.mark.parametrize("backend", [ONNXRUNTIME, TRANSFORMERS, cpb.BACKEND_TENSORRT])
@pytest.mark.parametrize("name", ["text.txt", "truncated.safetensors", "truncated.pt"])
def test_every_backend_refuses_a_non_checkpoint(
    stub: Stub, checkpoints: dict[str, Path], backend: int, name: str
) -> None:
    device = "cuda" if backend == cpb.BACKEND_TENSORRT else "cpu"
    req = _load(_weights(checkpoints[name]), _stack(backend, device))
    assert _refused(stub.LoadModel, req) == (INVALID, "WEIGHTS_INVALID", "model.weights_path")


def test_good_checkpoints_still_load(stub: Stub, checkpoints: dict[str, Path]) -> None:
    for name in ("ok.safetensors", "ok.pt"):
        m = stub.LoadModel(_load(_weights(checkpoints[name]), max_context=16), timeout=TIMEOUT_S)
        stub.UnloadModel(pb.UnloadModelRequest(model_id=m.model.model_id), timeout=TIMEOUT_S)


def test_transformers_refuses_a_directory_it_cannot_read(
    stub: Stub, hf_dir: Any, tiny: dict[str, Any], tmp_path: Path
) -> None:
    _, good = hf_dir("gpt2")
    spec = cv.spec_to_pb(tiny["gpt2"])
    for config in ("{not json", '{"model_type": "nonesuch"}'):
        bad = tmp_path / f"hf-{len(config)}"
        shutil.copytree(good, bad)
        (bad / "config.json").write_text(config)
        req = _load(cpb.ModelRef(spec=spec, weights_path=str(bad)), _stack(TRANSFORMERS))
        assert _refused(stub.LoadModel, req) == (INVALID, "WEIGHTS_INVALID", "model.weights_path")


# ---- 4. odd values found by fuzzing ----
@pytest.mark.parametrize(
    ("request_", "reason", "field"),
    [
        (_load(cpb.ModelRef(name="x" * 1_000_000)), "VALUE_TOO_LONG", "model.name"),
        (_load(stack=_stack(device="x" * 100_000)), "VALUE_TOO_LONG", "stack.device"),
        (_load(_weights("/" + "x" * 10_000)), "VALUE_TOO_LONG", "model.weights_path"),
        (_load(_weights("/tmp/a\x00b")), "WEIGHTS_INVALID", "model.weights_path"),
        (_load(_weights("/dev/null")), "WEIGHTS_INVALID", "model.weights_path"),
        (_load(stack=_stack(backend=99)), "ENUM_INVALID", "stack.backend"),
        (_load(stack=cpb.StackSpec(backend=PYTORCH, dtype=99)), "ENUM_INVALID", "stack.dtype"),
        (
            _load(
                cpb.ModelRef(
                    spec=cv.spec_to_pb(catalog.resolve("tiny-gpt2").replace(layers=2**31 - 1))
                )
            ),
            "MODEL_SPEC_INVALID",
            "model.spec.layers",
        ),
        (
            _load(
                cpb.ModelRef(
                    spec=cv.spec_to_pb(catalog.resolve("tiny-gpt2").replace(layers=MAX_LAYERS + 1))
                )
            ),
            "MODEL_SPEC_INVALID",
            "model.spec.layers",
        ),
    ],
)
def test_odd_load_requests_are_invalid(
    stub: Stub, model_id: str, request_: pb.LoadModelRequest, reason: str, field: str
) -> None:
    assert _refused(stub.LoadModel, request_) == (INVALID, reason, field)
    _still_answers(stub, model_id)


def test_huge_model_ids_are_not_found(stub: Stub, model_id: str) -> None:
    """The error message used to echo the whole id: a status too large to send."""
    huge = "m" * 1_000_000
    not_found = (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_LOADED", "model_id")
    assert _refused(stub.Generate, _generate(huge)) == not_found
    assert _refused(stub.UnloadModel, pb.UnloadModelRequest(model_id=huge)) == not_found
    _still_answers(stub, model_id)


def test_odd_list_requests_are_invalid(stub: Stub) -> None:
    for req, reason, field in [
        (pb.ListModelsRequest(page_size=-1), "PAGE_SIZE_INVALID", "page_size"),
        (pb.ListModelsRequest(page_token="x" * 100_000), "PAGE_TOKEN_INVALID", "page_token"),
        (pb.ListModelsRequest(page_token="\x00"), "PAGE_TOKEN_INVALID", "page_token"),
    ]:
        assert _refused(stub.ListModels, req) == (INVALID, reason, field)
    assert stub.ListModels(pb.ListModelsRequest(page_size=2**31 - 1), timeout=TIMEOUT_S)


def test_shown_cuts_long_values() -> None:
    assert shown("abc") == "'abc'"
    assert len(shown("x" * 10_000)) < 100
