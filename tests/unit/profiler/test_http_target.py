"""HttpTarget, exact-length prompts, the SSE parser and the spread schedule.

The API side is tests/fixtures/openai_server.py: a real HTTP server on 127.0.0.1 whose
behaviour (timing, usage, rejected fields, early stops, errors) is set per test, because
these tests are about the protocol under conditions a real server cannot be told to produce
on cue. tests/integration/test_http_api.py runs the same target against `transformers serve`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from idealrt.core.domain import (
    ModelRef,
    Profile,
    ProfilePlan,
    SampleFlag,
    SampleTiming,
    StackSpec,
    Target,
)
from idealrt.core.domain import TargetKind as Kind
from idealrt.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from idealrt.services.profiler import _openai_stream as sse
from idealrt.services.profiler import http_target, prompts, schedule
from idealrt.services.profiler.http_target import HttpOptions, HttpTarget
from idealrt.services.profiler.outbound import Credential, OutboundPolicy
from idealrt.services.profiler.prompts import PromptBuilder, load_tokenizer
from idealrt.services.profiler.schedule import SpreadSchedule, sleep_until, spread_offsets
from tests._fixtures import load_fixture

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
# The error tests below are about what one failed attempt maps to; retries (on by default
# for 408, 429, 5xx, connection errors, timeouts and broken streams) are test_http_retries.py's.
ONE_ATTEMPT = HttpOptions(max_attempts=1)


fake = load_fixture("openai_server")
make = load_fixture("make_hf_model")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make.train_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def bos_tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make.train_tokenizer(tmp_path_factory.mktemp("bos"), bos=True))


@pytest.fixture(scope="module")
def tok(tok_path: Path) -> prompts.PromptTokenizer:
    return load_tokenizer(str(tok_path))


def _api(tok: prompts.PromptTokenizer, **kw: Any) -> Any:
    cfg = fake.FakeConfig(count_tokens=lambda text: len(tok.encode(text)), **kw)
    return fake.FakeOpenAI(cfg)


@pytest.fixture
def api_factory(tok: prompts.PromptTokenizer) -> Iterator[Any]:
    started: list[Any] = []

    def start(**kw: Any) -> Any:
        srv = _api(tok, **kw).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def targets() -> Iterator[list[HttpTarget]]:
    made: list[HttpTarget] = []
    yield made
    for t in made:
        t.close()


def _target(targets: list[HttpTarget], base_url: str, tok_path: Path, **kw: Any) -> HttpTarget:
    t = HttpTarget(base_url, "fake-model", str(tok_path), **kw)
    targets.append(t)
    return t


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------- prompts


def test_prompts_have_exactly_p_tokens_and_are_deterministic(tok: prompts.PromptTokenizer) -> None:
    b = PromptBuilder(tok)
    for p in (1, 2, 3, 7, 64, 300, 1000):
        for seed in range(4):
            pr = b.build(p, seed)
            assert len(tok.encode(pr.text)) == p
            assert list(pr.ids) == tok.encode(pr.text)
    assert PromptBuilder(tok).build(50, 3) == b.build(50, 3)
    assert b.build(50, 3).text != b.build(50, 4).text


def test_prompts_count_the_special_tokens_a_tokenizer_adds(bos_tok_path: Path) -> None:
    t = load_tokenizer(str(bos_tok_path))
    b = PromptBuilder(t)
    assert b.specials == 1
    pr = b.build(10, 0)
    assert len(t.encode(pr.text)) == 10 and pr.ids[0] == 0
    with pytest.raises(InvalidArgument) as e:
        b.build(1, 0)
    assert e.value.reason == "PROMPT_TOO_SHORT"


def test_pool_excludes_special_tokens(tok: prompts.PromptTokenizer) -> None:
    pool = PromptBuilder(tok).pool
    assert 0 not in pool and len(pool) > 100


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as e:
        load_tokenizer("")
    assert e.value.reason == "TOKENIZER_REQUIRED"
    with pytest.raises(InvalidArgument) as e:
        load_tokenizer(str(tmp_path / "missing"))
    assert e.value.reason == "TOKENIZER_NOT_FOUND"


# ---------------------------------------------------------------- SSE parsing


def test_sse_events_fields_comments_multiline_and_unterminated() -> None:
    ticks = iter(range(100, 200))
    lines = [": ping", "", "data: a", "data:b", "", "event: error", "data: {}", "", "data: tail"]
    events = list(sse.iter_sse(lines, lambda: next(ticks)))
    assert [(e.data, e.event) for e in events] == [("a\nb", ""), ("{}", "error"), ("tail", "")]
    assert [e.t_ns for e in events] == [100, 101, 102]  # stamped at the first data line


def test_parse_stream_openai_and_transformers_usage_styles() -> None:
    ev = sse.SseEvent
    openai = [
        ev(1, '{"choices":[{"text":"a"}]}'),
        ev(2, '{"choices":[{"text":""}]}'),  # an empty-text chunk is not a token chunk
        ev(3, '{"choices":[{"text":"b","finish_reason":"length"}]}'),
        ev(4, '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'),
        ev(5, "[DONE]"),
    ]
    c = sse.parse_stream(openai)
    assert (c.chunk_times_ns, c.text, c.prompt_tokens, c.completion_tokens) == ((1, 3), "ab", 5, 2)
    assert c.done and c.finish_reason == "length" and c.error is None
    hf = [
        ev(1, '{"choices":[{"text":"x"}]}'),
        ev(
            2,
            '{"choices":[{"text":"","finish_reason":"stop"}],'
            '"usage":{"prompt_tokens":3,"completion_tokens":1}}',
        ),
    ]
    c = sse.parse_stream(hf)
    assert (c.chunk_times_ns, c.completion_tokens, c.finish_reason, c.done) == (
        (1,),
        1,
        "stop",
        False,
    )
    assert sse.parse_stream([ev(1, '{"error": {"message": "boom"}}')]).error == "boom"
    assert sse.parse_stream([ev(1, "not json")]).error is not None


def test_error_message_shapes() -> None:
    assert sse.error_message(b'{"error": {"message": "bad key"}}') == "bad key"
    assert sse.error_message(b'{"detail": "Unexpected fields"}') == "Unexpected fields"
    assert sse.error_message(b'{"detail": [{"msg": "field required"}]}') == "field required"
    assert sse.error_message(b'{"error": "plain"}') == "plain"
    assert sse.error_message(b"<html>gateway</html>") == "<html>gateway</html>"


# ---------------------------------------------------------------- HttpTarget: streaming


def test_streaming_exact_counts_and_timing_fields(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(prefill_s=0.02, decode_s=0.005)
    t = _target(targets, api.base_url, tok_path)
    assert t.prepare() is None
    for p, o in ((1, 1), (5, 2), (37, 6)):
        s = t.generate(p, o, seed=p)
        assert s.flag == SampleFlag.OK
        assert (s.prompt_tokens, s.output_tokens, len(s.decode_ns)) == (p, o, o - 1)
        assert s.prefill_ns >= 20_000_000  # the server waited prefill_s before token 1
        assert s.total_ns >= 20_000_000 + (o - 1) * 5_000_000
        assert s.total_ns >= s.prefill_ns + sum(s.decode_ns)
        assert min(s.decode_ns, default=0) >= 0 and s.rpc_ns == s.total_ns
        assert s.start_time is not None
    body = api.completions()[-1].body
    assert body["max_tokens"] == 6 and body["temperature"] == 0 and body["model"] == "fake-model"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 6  # accepted: kept
    assert len(PromptBuilder(load_tokenizer(str(tok_path))).tokenizer.encode(body["prompt"])) == 37
    env = t.environment()
    assert env["http.request_shape"] == "sse+usage/vllm" and env["kind"] == "http"
    assert env["http.tokenizer_sha256"] and env["http.library"].startswith("httpx ")


def test_one_connection_is_kept_alive(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(prefill_s=0.0, decode_s=0.0)
    t = _target(targets, api.base_url, tok_path)
    t.prepare()
    for i in range(4):
        t.generate(8, 3, seed=i)
    assert len({r.client_port for r in api.completions()}) == 1
    assert api.requests[0].headers["Connection"] == "close"  # the probe keeps nothing


def test_422_on_unknown_fields_falls_back_and_remembers(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    # transformers-serve-like: rejects ignore_eos/min_tokens with 422, honours generation_config
    api = api_factory(accept_fields=fake.TRANSFORMERS_FIELDS, early_stop_after=2)
    t = _target(targets, api.base_url, tok_path)
    s = t.generate(10, 5, seed=0)
    assert s.flag == SampleFlag.OK and s.output_tokens == 5  # EOS disabled the second way
    first, second = api.completions()
    assert "ignore_eos" in first.body and "ignore_eos" not in second.body
    assert '"min_new_tokens": 5' in second.body["generation_config"]
    t.generate(10, 4, seed=1)
    assert len(api.completions()) == 3  # remembered: no new probing
    assert t.environment()["http.request_shape"] == "sse+usage/transformers"
    assert t.fallbacks == 1


def test_api_without_eos_control_stops_early_nonconforming(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    # OpenAI-like: rejects every extension with 400; the "model" stops after 3 tokens
    api = api_factory(accept_fields=fake.OPENAI_FIELDS, reject_status=400, early_stop_after=3)
    t = _target(targets, api.base_url, tok_path)
    s = t.generate(12, 8, seed=0)
    assert s.flag == SampleFlag.NONCONFORMING
    assert (s.prompt_tokens, s.output_tokens) == (12, 3)
    assert len(s.decode_ns) == 2  # kept as evidence: one token per chunk still holds
    assert t.environment()["http.request_shape"] == "sse+usage/none"
    assert t.generate(12, 3, seed=1).flag == SampleFlag.OK


def test_multi_token_chunks_keep_the_total_only(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(tokens_per_chunk=2, prefill_s=0.01)
    t = _target(targets, api.base_url, tok_path)
    s = t.generate(6, 5, seed=0)
    assert s.flag == SampleFlag.OK and s.output_tokens == 5
    assert s.timing == SampleTiming.STREAM_CHUNKS and s.chunks == 3
    assert s.decode_ns == ()  # 3 chunks for 5 tokens cannot be split into steps
    # the first chunk carried two tokens: its arrival is not the first token's (unknown: 0);
    # test_timing_evidence.py has the cases where it is
    assert s.prefill_ns == 0 and s.total_ns >= 10_000_000


def test_stream_without_usage_is_nonconforming(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(usage_in_stream=False, usage_style="transformers")
    t = _target(targets, api.base_url, tok_path)
    s = t.generate(6, 4, seed=0)
    assert s.flag == SampleFlag.NONCONFORMING  # counts unverifiable
    assert (s.prompt_tokens, s.output_tokens) == (6, 4)  # 4 chunks
    # without usage, one token a chunk must be the tokenizer's count, and it counts two in
    # the fake's " t<i>": no per-step times claimed
    assert s.timing == SampleTiming.STREAM_CHUNKS and s.decode_ns == ()


def test_non_streaming_records_total_only(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(prefill_s=0.01, decode_s=0.002)
    t = _target(targets, api.base_url, tok_path, options=HttpOptions(stream=False))
    s = t.generate(9, 4, seed=0)
    assert s.flag == SampleFlag.OK and (s.prompt_tokens, s.output_tokens) == (9, 4)
    assert s.prefill_ns == 0 and s.decode_ns == () and s.timing == SampleTiming.TOTALS_ONLY
    assert s.total_ns >= 10_000_000 + 3 * 2_000_000
    assert "stream" not in api.completions()[0].body
    assert t.environment()["http.request_shape"] == "json/vllm"


def test_server_answering_json_to_a_stream_request(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(ignore_stream=True)
    t = _target(targets, api.base_url, tok_path)
    s = t.generate(5, 3, seed=0)
    assert s.flag == SampleFlag.OK and s.prefill_ns == 0 and s.decode_ns == ()


def test_token_id_prompts(api_factory: Any, targets: list[HttpTarget], tok_path: Path) -> None:
    api = api_factory()
    t = _target(targets, api.base_url, tok_path, options=HttpOptions(prompt_format="token_ids"))
    assert t.generate(17, 2, seed=5).flag == SampleFlag.OK
    prompt = api.completions()[0].body["prompt"]
    assert isinstance(prompt, list) and len(prompt) == 17
    assert all(isinstance(i, int) for i in prompt)


# ---------------------------------------------------------------- keys and errors


def _credential(key_file: Path, base_url: str) -> Credential:
    return Credential(
        id="test-api", namespaces=frozenset({"default"}), base_urls=(base_url,), key_file=key_file
    )


def test_api_key_is_sent_as_bearer_and_never_leaks(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path, tmp_path: Path
) -> None:
    secret = "sk-test-0123456789abcdef"
    key_file = tmp_path / "api-key"
    key_file.write_text(secret + "\n")
    api = api_factory(api_key=secret)
    t = _target(targets, api.base_url, tok_path, credential=_credential(key_file, api.base_url))
    t.prepare()
    assert t.generate(4, 2, seed=0).flag == SampleFlag.OK
    assert api.completions()[0].headers["Authorization"] == f"Bearer {secret}"
    env = t.environment()
    assert secret not in repr(env) and env["http.credential"] == "test-api"
    # a rotated key file (a Secret updated in place) takes effect at the next request;
    # a wrong key: the API's 401 echoes it; the error must not
    wrong = "sk-wrong-fedcba9876543210"
    key_file.write_text(wrong)
    with pytest.raises(InvalidArgument) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_AUTH_FAILED" and e.value.field == "profile.target.credential"
    assert wrong not in str(e.value) and "[redacted]" in str(e.value)
    key_file.unlink()
    with pytest.raises(FailedPrecondition) as e2:
        t.generate(4, 2, seed=0)
    assert e2.value.reason == "CREDENTIAL_UNREADABLE"
    assert str(key_file) not in str(e2.value)  # the path is the operator's, in the log only


def test_unreadable_credential_fails_in_prepare(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path, tmp_path: Path
) -> None:
    api = api_factory()
    missing = tmp_path / "no-such-key"
    t = _target(targets, api.base_url, tok_path, credential=_credential(missing, api.base_url))
    with pytest.raises(FailedPrecondition) as e:
        t.prepare()
    assert (
        e.value.reason == "CREDENTIAL_UNREADABLE" and e.value.field == "profile.target.credential"
    )
    assert str(missing) not in str(e.value)


def test_connection_refused_is_unavailable(targets: list[HttpTarget], tok_path: Path) -> None:
    t = _target(targets, _refused_url(), tok_path, options=ONE_ATTEMPT)
    with pytest.raises(Unavailable) as e:
        t.prepare()
    assert e.value.reason == "API_UNREACHABLE"
    with pytest.raises(Unavailable) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_UNREACHABLE"


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (500, Unavailable, "API_SERVER_ERROR"),
        (503, Unavailable, "API_SERVER_ERROR"),
        (429, ResourceExhausted, "API_RATE_LIMITED"),
        (404, InvalidArgument, "API_REJECTED_REQUEST"),
    ],
)
def test_http_status_errors(
    api_factory: Any,
    targets: list[HttpTarget],
    tok_path: Path,
    status: int,
    error: type[Exception],
    reason: str,
) -> None:
    api = api_factory(fail_statuses=[status])
    t = _target(targets, api.base_url, tok_path, options=ONE_ATTEMPT)
    with pytest.raises(error) as e:
        t.generate(4, 2, seed=0)
    assert getattr(e.value, "reason", None) == reason
    assert f"injected failure {status}" in str(e.value)  # the API's own message
    assert t.generate(4, 2, seed=0).flag == SampleFlag.OK  # the next request is served


def test_rejection_after_negotiation_is_invalid_argument(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory()
    t = _target(targets, api.base_url, tok_path)
    t.generate(4, 2, seed=0)
    api.config.fail_statuses.append(400)
    with pytest.raises(InvalidArgument) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_REJECTED_REQUEST"
    assert len(api.completions()) == 2 and t.fallbacks == 0  # no silent downgrade


def test_rejected_by_every_shape(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(fail_statuses=[422] * 6)
    t = _target(targets, api.base_url, tok_path)
    with pytest.raises(InvalidArgument) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_REJECTED_REQUEST"
    assert len(api.completions()) == len(t.shapes) == 6


def test_connection_dropped_before_a_response_is_resent_once(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(drop_requests=1)
    t = _target(targets, api.base_url, tok_path, options=ONE_ATTEMPT)
    assert t.generate(4, 2, seed=0).flag == SampleFlag.OK
    assert t.resends == 1 and len(api.completions()) == 2
    api.config.drop_requests = 2
    with pytest.raises(Unavailable) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_TRANSPORT_ERROR"
    assert t.environment()["http.resends"] == "2"


def test_error_event_inside_the_stream(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(stream_error_after=1)
    t = _target(targets, api.base_url, tok_path, options=ONE_ATTEMPT)
    with pytest.raises(Unavailable) as e:
        t.generate(4, 3, seed=0)
    assert e.value.reason == "API_STREAM_ERROR" and "generation failed" in str(e.value)


def test_read_timeout_is_unavailable(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    api = api_factory(prefill_s=1.0)
    opts = HttpOptions(read_timeout_s=0.1, max_attempts=1)
    t = _target(targets, api.base_url, tok_path, options=opts)
    with pytest.raises(Unavailable) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_TIMEOUT"


def test_environment_proxies_never_apply_to_loopback(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", _refused_url().removesuffix("/v1"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    api = api_factory()
    t = _target(targets, api.base_url, tok_path)
    assert t.generate(4, 2, seed=0).flag == SampleFlag.OK


def test_mock_transport_and_url_redaction(tok_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "choices": [{"text": "x y"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            },
        )

    t = HttpTarget(
        "https://api.example/v1?k=secret",
        "m",
        str(tok_path),
        transport=httpx.MockTransport(handler),
    )
    try:
        s = t.generate(3, 2, seed=0)
    finally:
        t.close()
    assert s.flag == SampleFlag.OK and s.prefill_ns == 0  # not an event stream: total only
    assert "secret" not in t.environment()["http.base_url"]
    # userinfo never gets this far: refused, and not echoed
    with pytest.raises(InvalidArgument) as e:
        HttpTarget("https://user:pw@api.example/v1", "m", str(tok_path))
    assert e.value.reason == "BASE_URL_USERINFO" and "pw" not in str(e.value)


# ---------------------------------------------------------------- through the runner


def _run_profile(kit: Any, store: Any, lease_dir: Path, target: HttpTarget) -> tuple[Any, Any]:
    from idealrt.services.profiler.contention import ContentionPolicy
    from idealrt.services.profiler.runner import run_profile

    profile = kit.make_profile(store, prompt_tokens=(4, 16), output_tokens=(2, 5), repeats=2)
    final = run_profile(
        profile,
        target,
        store,
        cancel=threading.Event(),
        on_progress=lambda p: None,
        # the subject is the target's wiring, not contention verdicts on a shared CI machine
        options=kit.quiet_options(lease_dir, contention=ContentionPolicy(enabled=False)),
    )
    return final, store.all_samples(profile.id)


def test_runner_profiles_an_http_api(
    kit: Any, store: Any, lease_dir: Path, api_factory: Any, tok_path: Path
) -> None:
    from idealrt.core.domain import ProfileState

    api = api_factory(accept_fields=fake.TRANSFORMERS_FIELDS, early_stop_after=1)
    target = HttpTarget(api.base_url, "fake-model", str(tok_path))
    final, samples = _run_profile(kit, store, lease_dir, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    measured = [s for s in samples if s.flag != SampleFlag.WARMUP]
    assert measured and all(s.flag == SampleFlag.OK for s in measured)
    assert all(len(s.decode_ns) == s.output_tokens - 1 for s in measured)
    env = final.provenance.entries
    assert env["target.http.request_shape"] == "sse+usage/transformers"  # set in prepare()
    assert env["target.http.tokenizer_sha256"] == target.environment()["http.tokenizer_sha256"]


def test_runner_keeps_totals_only_samples(
    kit: Any, store: Any, lease_dir: Path, api_factory: Any, tok_path: Path
) -> None:
    from idealrt.core.domain import ProfileState

    api = api_factory()
    target = HttpTarget(
        api.base_url, "fake-model", str(tok_path), options=HttpOptions(stream=False)
    )
    final, samples = _run_profile(kit, store, lease_dir, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    measured = [s for s in samples if s.flag != SampleFlag.WARMUP]
    assert measured and all(s.flag == SampleFlag.OK for s in measured)
    # totals only: kept (metrics.fit accepts decode_ns == () and prefill_ns == 0)
    assert all(s.decode_ns == () and s.prefill_ns == 0 and s.total_ns > 0 for s in measured)


# ---------------------------------------------------------------- from_profile


def _profile(**target: Any) -> Profile:
    return Profile(
        id="p1",
        model=ModelRef(name="api"),
        stack=StackSpec(),
        plan=ProfilePlan(prompt_tokens=(8,), output_tokens=(2,)),
        target=Target(**target),
    )


def test_from_profile(tok_path: Path) -> None:
    t = HttpTarget.from_profile(
        _profile(
            kind=Kind.HTTP,
            base_url="http://127.0.0.1:1/v1/",
            api_model="m",
            tokenizer=str(tok_path),
        ),
        OutboundPolicy.loopback(),
    )
    try:
        assert (t.base_url, t.api_model, t.credential) == ("http://127.0.0.1:1/v1", "m", None)
    finally:
        t.close()
    cases = [
        ({"kind": Kind.SERVING}, "TARGET_KIND_MISMATCH"),
        ({"kind": Kind.HTTP, "api_model": "m", "tokenizer": "x"}, "BASE_URL_REQUIRED"),
        (
            {"kind": Kind.HTTP, "base_url": "ftp://x", "api_model": "m", "tokenizer": "x"},
            "BASE_URL_INVALID",
        ),
        ({"kind": Kind.HTTP, "base_url": "http://x/v1", "tokenizer": "x"}, "API_MODEL_REQUIRED"),
        ({"kind": Kind.HTTP, "base_url": "http://x/v1", "api_model": "m"}, "TOKENIZER_REQUIRED"),
    ]
    for target, reason in cases:
        with pytest.raises(InvalidArgument) as e:
            HttpTarget.from_profile(_profile(**target), OutboundPolicy.loopback())
        assert e.value.reason == reason, target


def test_options_validation() -> None:
    with pytest.raises(InvalidArgument) as e:
        HttpOptions(eos_dialects=("tgi",))
    assert e.value.reason == "UNKNOWN_EOS_DIALECT"
    with pytest.raises(InvalidArgument) as e:
        HttpOptions(prompt_format="ids")
    assert e.value.reason == "PROMPT_FORMAT_INVALID"


@pytest.mark.parametrize("module", [http_target, prompts, schedule, sse])
def test_exported_members(module: ModuleType) -> None:
    for name in module.__all__:
        assert hasattr(module, name), name
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    }
    assert public <= set(module.__all__)


# ---------------------------------------------------------------- spread schedule


def test_spread_offsets_stratified_and_seeded() -> None:
    offs = spread_offsets(6, 3600.0, seed=1)
    assert len(offs) == 6
    for r, x in enumerate(offs):
        assert r * 600.0 <= x < (r + 1) * 600.0  # one round per slot
    assert offs == spread_offsets(6, 3600.0, seed=1)
    assert offs != spread_offsets(6, 3600.0, seed=2)
    assert spread_offsets(4, 100.0, jitter=0.0) == (0.0, 25.0, 50.0, 75.0)
    assert all(x < 10.0 for x in spread_offsets(3, 60.0, seed=3, jitter=0.5)[:1])
    assert spread_offsets(3, 0.0) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((0, 10.0, 1.0), "ROUNDS_INVALID"),
        ((2, -1.0, 1.0), "SPREAD_INVALID"),
        ((2, float("nan"), 1.0), "SPREAD_INVALID"),
        ((2, 10.0, 1.5), "JITTER_INVALID"),
    ],
)
def test_spread_offsets_validation(args: tuple[int, float, float], reason: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        spread_offsets(args[0], args[1], jitter=args[2])
    assert e.value.reason == reason


class _FakeClockEvent(threading.Event):
    """wait(t) advances a fake clock by t instead of sleeping; counts the waits."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        self.clock[0] += timeout
        return self.is_set()


def test_schedule_waits_once_per_round_without_polling() -> None:
    now = [1000.0]
    sched = SpreadSchedule(3, 90.0, seed=0, jitter=0.0, clock=lambda: now[0])
    sched.begin()
    ev = _FakeClockEvent(now)
    assert sched.wait_for(0, ev) and ev.waits == []  # due at once
    assert sched.wait_for(1, ev) and ev.waits == [30.0] and now[0] == 1030.0
    now[0] = 1075.0  # round 1 overran into round 2's slot: round 2 starts at 1060, i.e. now
    assert sched.wait_for(2, ev) and ev.waits == [30.0]


def test_sleep_until_is_cancellable_from_another_thread() -> None:
    cancel = threading.Event()
    timer = threading.Timer(0.05, cancel.set)
    t0 = time.monotonic()
    timer.start()
    try:
        assert sleep_until(time.monotonic() + 30.0, cancel) is False
    finally:
        timer.cancel()
        timer.join()
    assert time.monotonic() - t0 < 10.0
    assert sleep_until(time.monotonic() + 0.01, threading.Event()) is True


def test_target_options_map_to_http_options() -> None:
    from idealrt.core.errors import InvalidArgument
    from idealrt.services.profiler.http_target import http_options

    opts = http_options(
        {
            "stream": "0",
            "prompt_format": "token_ids",
            "eos_dialects": "vllm,none",
            "read_timeout_s": "30",
        }
    )
    assert (opts.stream, opts.prompt_format, opts.eos_dialects, opts.read_timeout_s) == (
        False,
        "token_ids",
        ("vllm", "none"),
        30.0,
    )
    for bad, field in [
        ({"nope": "1"}, "profile.target.options"),
        ({"stream": "maybe"}, "profile.target.options"),
        ({"read_timeout_s": "-1"}, "profile.target.options"),
        ({"prompt_format": "xml"}, "profile.target.options.prompt_format"),
    ]:
        with pytest.raises(InvalidArgument) as exc:
            http_options(bad)
        assert exc.value.field == field
