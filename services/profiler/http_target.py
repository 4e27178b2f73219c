"""GenerationTarget over a black-box OpenAI-compatible completions API (denoised runtime).

One request per sample: `POST {base_url}/completions` with `model`, a prompt of exactly p
tokens for the user's local tokenizer (`idealrt.services.profiler.prompts`; text by default,
a list of token ids with `prompt_format="token_ids"`), `max_tokens=o`, `temperature=0`.

Request shape, negotiated in prepare() (or on first use). Candidates, best first:
  streaming (`"stream": true, "stream_options": {"include_usage": true}`), then not;
  within each, an EOS-control dialect: `vllm` (`ignore_eos`, `min_tokens`: vLLM, SGLang),
  `transformers` (`generation_config` JSON with `min_new_tokens`: `transformers serve`),
  `none` (a model may then stop early at EOS; such a sample is flagged, see below).
A 400 or 422 (an API rejecting fields it does not know: `transformers serve` answers 422 to
`ignore_eos`, OpenAI 400) moves to the next candidate and retries at once; the first
candidate that succeeds is kept for every later request, and from then on a 400/422 is an
InvalidArgument carrying the API's message. `environment()` records the shape in use.

What a Sample holds (all client-side, `time.perf_counter_ns`; the wire is in every number):
- t0: just before the request is sent (the body is already encoded, the prompt built).
- streaming: prefill_ns = t0 -> arrival of the first token chunk (an event whose first
  choice has non-empty text): time to first token. decode_ns = the gaps between consecutive
  token chunks, kept only when the chunks are exactly the completion tokens the API counted
  (one token per chunk); otherwise (a server that packs several tokens into one chunk, or
  sends no text for a token that is a partial UTF-8 sequence) the gaps cannot be split into
  per-token steps and decode_ns is empty: the metrics fit then uses (total - prefill).
- non-streaming: prefill_ns = 0 (unknown; the fit treats 0 as "no prefill time"),
  decode_ns = (), total only.
- total_ns = t0 -> the end of the response body (stream end). rpc_ns = total_ns: for a
  black-box API the round trip is the only time there is.
- prompt_tokens / output_tokens = the API's `usage` counts. The sample is NONCONFORMING
  (kept as evidence, never fitted) when usage is missing or differs from (p, o), e.g. a
  random-weight model stopping early at EOS where EOS cannot be disabled.

A kept-alive connection that the server closed meanwhile (its idle timeout; some servers
close after an error answer) fails before any response byte: such a request is sent once
more, timed afresh (`environment()["http.resends"]` counts them).

Errors: connection refused/reset, timeouts, 5xx and broken streams -> Unavailable; 429 ->
ResourceExhausted; other 4xx -> InvalidArgument with the API's own message. The API key is
read from `os.environ[api_key_env]` for each request and sent as `Authorization: Bearer`;
it is never stored on the target, logged, or put into errors (scrubbed from API messages
that echo it) or provenance.

httpx's sync client, one keep-alive connection, blocking reads: no busy-waiting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from idealrt.core.domain import Profile, Sample, TargetKind
from idealrt.core.errors import (
    FailedPrecondition,
    IdealrtError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler._openai_stream import (
    error_message,
    iter_sse,
    parse_body,
    parse_stream,
    redact_url,
    to_sample,
)
from idealrt.services.profiler.prompts import PromptBuilder, PromptTokenizer, load_tokenizer

__all__ = ["EOS_DIALECTS", "HttpOptions", "HttpTarget", "RequestShape", "http_options"]

EOS_DIALECTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "vllm": lambda o: {"ignore_eos": True, "min_tokens": o},
    "transformers": lambda o: {
        "generation_config": json.dumps(
            {"min_new_tokens": o, "max_new_tokens": o, "do_sample": False}
        )
    },
    "none": lambda o: {},
}


@dataclasses.dataclass(frozen=True)
class HttpOptions:
    stream: bool = True  # False: never ask for a stream (totals only)
    eos_dialects: tuple[str, ...] = ("vllm", "transformers", "none")
    prompt_format: Literal["text", "token_ids"] = "text"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0  # the longest silence tolerated between bytes
    probe: bool = True  # prepare(): GET {base_url}/models to fail fast when unreachable
    negotiate: bool = True  # prepare(): settle the request shape with a tiny generation
    trust_env: bool = True  # honour HTTP(S)_PROXY / NO_PROXY (never for a loopback URL)

    def __post_init__(self) -> None:
        if self.prompt_format not in ("text", "token_ids"):
            raise InvalidArgument(
                "PROMPT_FORMAT_INVALID",
                f"prompt_format={self.prompt_format!r}: must be 'text' or 'token_ids'",
                field="prompt_format",
            )
        unknown = [d for d in self.eos_dialects if d not in EOS_DIALECTS]
        if unknown or not self.eos_dialects:
            raise InvalidArgument(
                "UNKNOWN_EOS_DIALECT",
                f"eos_dialects {list(self.eos_dialects)}: each must be one of "
                f"{sorted(EOS_DIALECTS)}, at least one",
                field="eos_dialects",
            )


_OPTION_KEYS = ("stream", "prompt_format", "eos_dialects", "connect_timeout_s", "read_timeout_s")


def http_options(raw: Mapping[str, str]) -> HttpOptions:
    """HttpOptions from a profile's `target.options` (strings); unknown keys or bad values
    are INVALID_ARGUMENT naming `profile.target.options.<key>`."""
    unknown = sorted(set(raw) - set(_OPTION_KEYS))
    if unknown:
        raise InvalidArgument(
            "TARGET_OPTION_UNKNOWN",
            f"unknown target option(s) {unknown}; known: {', '.join(_OPTION_KEYS)}",
            field="profile.target.options",
        )
    kw: dict[str, Any] = {}
    try:
        if "stream" in raw:
            if raw["stream"] not in ("0", "1", "true", "false"):
                raise ValueError("stream must be 0 or 1")
            kw["stream"] = raw["stream"] in ("1", "true")
        if "prompt_format" in raw:
            kw["prompt_format"] = raw["prompt_format"]
        if "eos_dialects" in raw:
            kw["eos_dialects"] = tuple(x for x in raw["eos_dialects"].split(",") if x)
        for key in ("connect_timeout_s", "read_timeout_s"):
            if key in raw:
                value = float(raw[key])
                if not 0 < value <= 3600:
                    raise ValueError(f"{key} must be in (0, 3600]")
                kw[key] = value
    except ValueError as exc:
        raise InvalidArgument(
            "TARGET_OPTION_INVALID",
            f"profile.target.options: {exc}",
            field="profile.target.options",
        ) from None
    try:
        return HttpOptions(**kw)
    except InvalidArgument as err:
        raise InvalidArgument(
            err.reason, err.message, field=f"profile.target.options.{err.field}"
        ) from None


@dataclasses.dataclass(frozen=True)
class RequestShape:
    stream: bool
    eos: str

    def describe(self) -> str:
        return f"{'sse+usage' if self.stream else 'json'}/{self.eos}"


def _is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Rejected(Exception):
    """A 400/422 that may be the API refusing a field: try the next request shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpTarget:
    """One model behind an OpenAI-compatible completions API."""

    def __init__(
        self,
        base_url: str,
        api_model: str,
        tokenizer: str | PromptTokenizer,
        *,
        api_key_env: str = "",
        options: HttpOptions | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise InvalidArgument(
                "BASE_URL_INVALID",
                f"base_url {redact_url(base_url)!r} must start with http:// or https:// "
                "(e.g. http://127.0.0.1:8000/v1)",
                field="profile.target.base_url",
            )
        if not api_model:
            raise InvalidArgument(
                "API_MODEL_REQUIRED",
                "api_model (the model name sent to the API) is empty",
                field="profile.target.api_model",
            )
        self.base_url = base_url.rstrip("/")
        self.api_model = api_model
        self.api_key_env = api_key_env
        self.options = options or HttpOptions()
        self._tokenizer_ref = tokenizer
        self._transport = transport
        self._builder: PromptBuilder | None = None
        self._client: httpx.Client | None = None
        stream_modes = (True, False) if self.options.stream else (False,)
        self.shapes = tuple(
            RequestShape(s, e) for s in stream_modes for e in self.options.eos_dialects
        )
        self._shape = 0
        self._locked = False
        self._server_header = ""
        self._models_status = ""
        self.requests = 0
        self.fallbacks = 0
        self.resends = 0

    @classmethod
    def from_profile(cls, profile: Profile) -> HttpTarget:
        t = profile.target
        if t.kind != TargetKind.HTTP:
            raise InvalidArgument(
                "TARGET_KIND_MISMATCH",
                f"profile.target.kind is {t.kind.value!r}; an HTTP target needs 'http'",
                field="profile.target.kind",
            )
        if not t.base_url:
            raise InvalidArgument(
                "BASE_URL_REQUIRED",
                "profile.target.base_url is empty (e.g. http://127.0.0.1:8000/v1)",
                field="profile.target.base_url",
            )
        if not t.tokenizer:
            load_tokenizer("")  # raises TOKENIZER_REQUIRED
        return cls(
            t.base_url,
            t.api_model,
            t.tokenizer,
            api_key_env=t.api_key_env,
            options=http_options(t.options),
        )

    # ------------------------------------------------------------------ protocol

    def prepare(self) -> ModelSpec | None:
        """Load the tokenizer and its token pool, open the connection, check the key is set
        and (option `probe`) that the API answers; then (option `negotiate`) settle the
        request shape with one tiny generation (the shortest prompt, 2 tokens), so that
        environment() reports it from the start, rejected shapes never land in a measured
        or warm-up request, and a server that loads models on first use has loaded it.
        A black-box API has no spec: None."""
        builder = self._prompt_builder()
        _ = builder.pool
        self._headers()  # FailedPrecondition now, not mid-run, when the key is missing
        client = self._http()
        if self.options.probe:
            try:
                # Connection: close: servers may drop a connection after an error answer
                # (transformers serve's /models fails offline); keep none from the probe.
                resp = client.get(
                    f"{self.base_url}/models", headers={**self._headers(), "Connection": "close"}
                )
                resp.read()
                resp.close()
                self._models_status = str(resp.status_code)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from None
        if self.options.negotiate and not self._locked:
            self.generate(builder.min_prompt_tokens(), 2, seed=0)
        return None

    def generate(self, prompt_tokens: int, output_tokens: int, seed: int) -> Sample:
        if output_tokens < 1:
            raise InvalidArgument(
                "OUTPUT_TOKENS_INVALID",
                f"output_tokens={output_tokens}: must be at least 1",
                field="plan.output_tokens",
            )
        prompt = self._prompt_builder().build(prompt_tokens, seed)
        prompt_value: str | list[int] = (
            list(prompt.ids) if self.options.prompt_format == "token_ids" else prompt.text
        )
        while True:
            shape = self.shapes[self._shape]
            try:
                sample = self._request(shape, prompt_value, prompt_tokens, output_tokens)
            except _Rejected as rej:
                if self._locked or self._shape + 1 >= len(self.shapes):
                    raise InvalidArgument(
                        "API_REJECTED_REQUEST",
                        f"the API at {redact_url(self.base_url)} rejected the request "
                        f"(HTTP {rej.status}, shape {shape.describe()}): {rej.message}",
                    ) from None
                self._shape += 1
                self.fallbacks += 1
                continue
            self._locked = True
            return sample

    def environment(self) -> dict[str, str]:
        env = {
            "kind": "http",
            "http.base_url": redact_url(self.base_url),
            "http.api_model": self.api_model,
            "http.library": f"httpx {httpx.__version__}",
            "http.prompt_format": self.options.prompt_format,
            "http.request_shape": self.shapes[self._shape].describe()
            if self._locked
            else "not negotiated",
        }
        if self.api_key_env:
            env["http.api_key_env"] = self.api_key_env  # the variable's name only
        if self._builder is not None:
            tok = self._builder.tokenizer
            env["http.tokenizer"] = tok.name
            env["http.tokenizer_sha256"] = tok.sha256
            env["http.tokenizer_vocab"] = str(tok.vocab_size)
        elif isinstance(self._tokenizer_ref, str):
            env["http.tokenizer"] = self._tokenizer_ref
        env["http.resends"] = str(self.resends)
        if self._server_header:
            env["http.server"] = self._server_header
        if self._models_status:
            env["http.models_status"] = self._models_status
        return env

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> HttpTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _prompt_builder(self) -> PromptBuilder:
        if self._builder is None:
            ref = self._tokenizer_ref
            self._builder = PromptBuilder(load_tokenizer(ref) if isinstance(ref, str) else ref)
        return self._builder

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                timeout=httpx.Timeout(
                    self.options.read_timeout_s, connect=self.options.connect_timeout_s
                ),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                transport=self._transport,
                # a proxy from the environment never applies to a loopback API
                trust_env=self.options.trust_env and not _is_loopback(self.base_url),
            )
        return self._client

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise FailedPrecondition(
                    "API_KEY_MISSING",
                    f"environment variable {self.api_key_env} (profile.target.api_key_env) "
                    "is not set or empty; it must hold the API key",
                    field="profile.target.api_key_env",
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            text = text.replace(key, "[redacted]")
        return text.replace(self.base_url, redact_url(self.base_url))

    def _transport_error(self, exc: httpx.HTTPError) -> IdealrtError:
        where = redact_url(self.base_url)
        kind = type(exc).__name__
        detail = self._scrub(str(exc))
        if isinstance(exc, httpx.TimeoutException):
            return Unavailable("API_TIMEOUT", f"the API at {where} timed out ({kind}): {detail}")
        if isinstance(exc, httpx.ConnectError):
            return Unavailable("API_UNREACHABLE", f"cannot connect to the API at {where}: {detail}")
        return Unavailable("API_TRANSPORT_ERROR", f"the API at {where} failed ({kind}): {detail}")

    def _status_error(self, status: int, body: bytes) -> IdealrtError | _Rejected:
        msg = self._scrub(error_message(body))
        where = redact_url(self.base_url)
        if status in (400, 422):
            return _Rejected(status, msg)
        if status == 429:
            return ResourceExhausted(
                "API_RATE_LIMITED", f"the API at {where} is rate limiting (HTTP 429): {msg}"
            )
        if status in (401, 403):
            return InvalidArgument(
                "API_AUTH_FAILED",
                f"the API at {where} refused the credentials (HTTP {status}): {msg}",
                field="profile.target.api_key_env",
            )
        if status >= 500:
            return Unavailable(
                "API_SERVER_ERROR", f"the API at {where} failed (HTTP {status}): {msg}"
            )
        return InvalidArgument(
            "API_REJECTED_REQUEST",
            f"the API at {where} rejected the request (HTTP {status}): {msg}",
        )

    def _body(self, shape: RequestShape, prompt: str | list[int], o: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.api_model,
            "prompt": prompt,
            "max_tokens": o,
            "temperature": 0,
        }
        if shape.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(EOS_DIALECTS[shape.eos](o))
        return body

    def _send(
        self, client: httpx.Client, request: httpx.Request
    ) -> tuple[datetime, int, httpx.Response]:
        """Send, timing from just before the send. A kept-alive connection that the server
        closed meanwhile (idle timeout, or after an error response) fails before any response
        byte: that attempt is discarded and the request sent once more, timed afresh."""
        for attempt in (1, 2):
            start = datetime.now(UTC)
            t0 = time.perf_counter_ns()
            try:
                return start, t0, client.send(request, stream=True)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                if attempt == 2:
                    raise
                self.resends += 1
        raise AssertionError("unreachable")

    def _request(self, shape: RequestShape, prompt: str | list[int], p: int, o: int) -> Sample:
        client = self._http()
        request = client.build_request(
            "POST",
            f"{self.base_url}/completions",
            content=json.dumps(self._body(shape, prompt, o)).encode(),
            headers=self._headers(),
        )
        clock = time.perf_counter_ns
        self.requests += 1
        try:
            start, t0, response = self._send(client, request)
            try:
                if response.status_code >= 400:
                    response.read()
                    err = self._status_error(response.status_code, response.content)
                    raise err
                streamed = "text/event-stream" in response.headers.get("content-type", "")
                if streamed:
                    events = list(iter_sse(response.iter_lines(), clock))
                    t_end = clock()
                    completion = parse_stream(events)
                else:
                    response.read()
                    t_end = clock()
                    completion = parse_body(response.content)
                self._server_header = response.headers.get("server", self._server_header)
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if completion.error is not None:
            raise Unavailable(
                "API_STREAM_ERROR",
                f"the API at {redact_url(self.base_url)} reported an error in its response: "
                f"{self._scrub(completion.error)}",
            )
        return to_sample(completion, streamed, p, o, t0, t_end, start)
