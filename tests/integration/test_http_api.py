"""HttpTarget against a real third-party OpenAI-compatible server: `transformers serve`.

The model is built offline (tests/fixtures/make_hf_model.py): a seeded random GPT-2 and a
byte-level BPE trained on stdlib sources, with 90% of the vocabulary listed as extra EOS ids
so that the greedy random model stops early unless the request disables EOS. The server is

    HF_HUB_OFFLINE=1 transformers serve --host 127.0.0.1 --port PORT --device cpu

(models load on demand: the request's `model` is the model directory). It rejects
`ignore_eos` / `min_tokens` with 422; the target then falls back to a `generation_config`
with `min_new_tokens`, which this server honours, so generations have exactly o tokens.
With EOS control switched off the early stops must come back flagged NONCONFORMING.

Needs `transformers[serving]` (fastapi, uvicorn, openai); skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from idealrt.core.domain import SampleFlag, SampleTiming
from idealrt.services.profiler.http_target import HttpOptions, HttpTarget
from tests._fixtures import load_fixture

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
STARTUP_TIMEOUT_S = 120.0

_MISSING = [
    m
    for m in ("fastapi", "uvicorn", "openai", "transformers")
    if importlib.util.find_spec(m) is None
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_command(port: int) -> list[str]:
    script = Path(sys.executable).parent / "transformers"
    prefix = (
        [str(script)]
        if script.is_file()
        else [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
    )
    return [
        *prefix,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"transformers serve exited with {proc.returncode}:\n"
                    f"{log.read_text(errors='replace')[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.25)  # test set-up, not a measurement
    pytest.fail(
        f"transformers serve not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n"
        f"{log.read_text(errors='replace')[-3000:]}"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _MISSING:
        pytest.skip(f"transformers serve needs {_MISSING}: pip install 'transformers[serving]'")
    make = load_fixture("make_hf_model")
    return Path(
        make.make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", eos_fraction=0.9)
    )


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "NO_COLOR": "1",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _serve_command(port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(model_dir.parent),
        )
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture
def target(server: str, model_dir: Path) -> Iterator[HttpTarget]:
    t = HttpTarget(
        server,
        str(model_dir),
        str(model_dir),
        options=HttpOptions(read_timeout_s=120.0),
    )
    try:
        yield t
    finally:
        t.close()


def test_exact_lengths_streamed(target: HttpTarget) -> None:
    assert target.prepare() is None
    for p, o, seed in ((4, 1, 0), (16, 4, 1), (48, 8, 2), (48, 8, 3)):
        s = target.generate(p, o, seed)
        assert s.flag == SampleFlag.OK, (p, o, seed, s)
        assert (s.prompt_tokens, s.output_tokens) == (p, o)
        # every token of the test tokenizer decodes to text, so one chunk per token
        assert len(s.decode_ns) == o - 1
        assert s.timing == SampleTiming.STREAM_TOKENS and s.chunks == o
        assert s.prefill_ns > 0 and min(s.decode_ns, default=0) >= 0
        assert s.total_ns >= s.prefill_ns + sum(s.decode_ns)
    env = target.environment()
    assert env["http.request_shape"] == "sse+usage/transformers"  # after one 422
    assert target.fallbacks == 1
    assert env["http.server"] == "uvicorn"


def test_early_eos_without_eos_control_is_nonconforming(server: str, model_dir: Path) -> None:
    opts = HttpOptions(eos_dialects=("none",), read_timeout_s=120.0)
    with HttpTarget(server, str(model_dir), str(model_dir), options=opts) as t:
        samples = [t.generate(12, 8, seed) for seed in range(6)]
    short = [s for s in samples if s.output_tokens < 8]
    assert short, "the random model with 90% EOS ids never stopped early"
    for s in samples:
        assert s.prompt_tokens == 12
        expected = SampleFlag.OK if s.output_tokens == 8 else SampleFlag.NONCONFORMING
        assert s.flag == expected


def test_tokens_beyond_the_tokenizer_stream_as_chunks(
    server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The model's vocabulary is larger than its tokenizer's: the server streams the ids
    beyond it as empty text, so chunks do not carry one token each. The sample says so
    (STREAM_CHUNKS), keeps no per-step times and no first-chunk "prefill"."""
    make = load_fixture("make_hf_model")
    wide = Path(
        make.make_tiny_gpt2(tmp_path_factory.mktemp("wide") / "wide-gpt2", extra_model_vocab=4000)
    )
    opts = HttpOptions(read_timeout_s=120.0)
    with HttpTarget(server, str(wide), str(wide), options=opts) as t:
        samples = [t.generate(16, 12, seed) for seed in range(3)]
    for s in samples:
        assert s.flag == SampleFlag.OK and (s.prompt_tokens, s.output_tokens) == (16, 12)
        assert s.timing == SampleTiming.STREAM_CHUNKS, s
        assert s.chunks < 12 and s.decode_ns == () and s.prefill_ns == 0
        assert s.total_ns > 0


def test_non_streaming_totals(server: str, model_dir: Path) -> None:
    opts = HttpOptions(stream=False, read_timeout_s=120.0)
    with HttpTarget(server, str(model_dir), str(model_dir), options=opts) as t:
        s = t.generate(20, 5, seed=0)
        assert t.environment()["http.request_shape"] == "json/transformers"
    assert s.flag == SampleFlag.OK and (s.prompt_tokens, s.output_tokens) == (20, 5)
    assert s.prefill_ns == 0 and s.decode_ns == () and s.total_ns > 0
    assert s.timing == SampleTiming.TOTALS_ONLY and s.chunks == 0
