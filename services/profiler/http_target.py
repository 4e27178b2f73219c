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
- timing (Sample.timing, the evidence the times rest on) and chunks (token chunks: events
  whose first choice has non-empty text). After the stream has ended, the profile's
  tokenizer counts the tokens of each chunk's text.
- streaming, one token per chunk (as many token chunks as usage.completion_tokens; without
  usage, the tokenizer counts one token in each): timing STREAM_TOKENS, prefill_ns = t0 ->
  arrival of the first token chunk (time to first token), decode_ns = the gaps between
  consecutive token chunks.
- streaming otherwise (a server that packs several tokens into one chunk, or streams a
  token it cannot decode as empty text: `transformers serve` with a tokenizer smaller
  than the model's vocabulary): timing STREAM_CHUNKS, decode_ns empty (per-token steps
  are unknown, never invented), and prefill_ns the first token chunk's arrival only when
  that chunk carried exactly the first token (no empty chunk before it, one token by the
  tokenizer, and the tokenizer counts all the tokens usage counted); else 0.
- non-streaming: timing TOTALS_ONLY, prefill_ns = 0, decode_ns = (), total only.
- prefill_ns = 0 always means "unknown" (the fit never takes it for a time).
- total_ns = t0 -> the end of the response body (stream end). rpc_ns = total_ns: for a
  black-box API the round trip is the only time there is.
- prompt_tokens / output_tokens = the API's `usage` counts. The sample is NONCONFORMING
  (kept as evidence, never fitted) when usage is missing or differs from (p, o), e.g. a
  random-weight model stopping early at EOS where EOS cannot be disabled.

A kept-alive connection that the server closed meanwhile (its idle timeout; some servers
close after an error answer) fails before any response byte: such a request is sent once
more, timed afresh (`environment()["http.resends"]` counts them; not a failed attempt).

Retries (options in HttpOptions, `profile.target.options`). A failed attempt is retried
when it may pass later: 429, 408, 5xx, connection errors, timeouts, broken streams and
error events inside a stream. Before retry n: the server's Retry-After (delay-seconds or an
HTTP date, at most `max_retry_after_s`), else full-jitter exponential backoff U(0,
min(backoff_max_s, backoff_base_s * 2^(n-1))). The wait is on the run's cancel event
(`bind_cancel`; without one, an event of the target's own that close() sets), or calls the
injected `sleep`: a cancelled wait ends the generation with Unavailable API_RETRY_CANCELLED.
Every attempt is timed on its own: a retried generation's Sample (start_time, t0, every
duration) is that of the attempt that succeeded, never counted from an earlier one.
A request gives up after `max_attempts` attempts with the last attempt's error (its reason:
API_RATE_LIMITED, API_SERVER_ERROR, API_TIMEOUT, ...; the message adds the tally of its
failed attempts). The profile's error budget: the failed attempt that brings the target's
total to `max_failed_attempts` ends it with ResourceExhausted API_ERROR_BUDGET_EXHAUSTED,
"<used> of <max> allowed failed attempts ...: 429 x 10, timeout x 2; the last: ...".
A 4xx other than 408/429 is never retried (our request or the user's configuration is
wrong): it fails at once with the status and the API's message or a body excerpt.
What was retried: `retry_log` holds one RetryRecord per generation that needed retries
(its p, o, seed, the kind of each failed attempt, each wait, and the kept sample's
start_time, which identifies the stored Sample); `environment()` sums them up
(`http.retries`, `http.errors`, `http.failed_attempts`, `http.retried_requests`,
`http.retry_wait_s`, `http.retry_policy`). A Sample has no field for them.

Errors: connection refused/reset, timeouts, 5xx and broken streams -> Unavailable; 429 ->
ResourceExhausted; other 4xx -> InvalidArgument with the API's own message. The API key is
that of the profile's credential (outbound.py: configured by the profiler's operator,
bound to namespaces and base URLs; never a variable the caller names), read for each
request and sent as `Authorization: Bearer`; it is never logged, or put into errors
(scrubbed from API messages that echo it) or provenance (which names the credential id).
`from_profile` checks the base URL and the credential against the outbound policy, and
every connection is checked again (the host's addresses). The probe of prepare() is not
retried: an API that cannot be reached at the start fails the profile at once.

httpx's sync client, one keep-alive connection, blocking reads: no busy-waiting.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable, Sequence

import httpx

from idealrt.core.domain import Profile, Sample, TargetKind
from idealrt.core.errors import InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.core.reasons import OUTPUT_TOKENS_INVALID
from idealrt.services.profiler._http_client import RetryRecord, _HttpClient, _Rejected, tally
from idealrt.services.profiler._http_options import (
    EOS_DIALECTS,
    HttpOptions,
    RequestShape,
    http_options,
)
from idealrt.services.profiler._openai_stream import redact_url
from idealrt.services.profiler.outbound import (
    DEFAULT_NAMESPACE,
    Credential,
    OutboundPolicy,
    parse_base_url,
)
from idealrt.services.profiler.prompts import PromptBuilder, PromptTokenizer, load_tokenizer
from idealrt.services.profiler.reasons import (
    API_MODEL_REQUIRED,
    API_REJECTED_REQUEST,
    BASE_URL_REQUIRED,
    TARGET_KIND_MISMATCH,
)

__all__ = [
    "EOS_DIALECTS",
    "HttpOptions",
    "HttpTarget",
    "RequestShape",
    "RetryRecord",
    "http_options",
]


class HttpTarget(_HttpClient):
    """One model behind an OpenAI-compatible completions API.

    `cancel`: the run's cancel event, which ends a wait between retries (or `bind_cancel`
    later). For tests: `sleep(seconds)` replaces the wait (it returns when done; the cancel
    event is checked before and after), `clock` the perf-counter (ns) that times attempts,
    `rng` the jitter's random source."""

    def __init__(
        self,
        base_url: str,
        api_model: str,
        tokenizer: str | PromptTokenizer,
        *,
        credential: Credential | None = None,
        outbound: OutboundPolicy | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        options: HttpOptions | None = None,
        transport: httpx.BaseTransport | None = None,
        cancel: threading.Event | None = None,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
        rng: random.Random | None = None,
    ) -> None:
        parse_base_url(base_url)  # http(s), a host, no userinfo: INVALID_ARGUMENT otherwise
        if not api_model:
            raise InvalidArgument(
                API_MODEL_REQUIRED,
                "api_model (the model name sent to the API) is empty",
                field="profile.target.api_model",
            )
        self.base_url = base_url.rstrip("/")
        self.api_model = api_model
        self.credential = credential
        self.outbound = outbound
        self.namespace = namespace
        self._last_key = ""
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
        self._owns_cancel = cancel is None
        self._cancel = cancel if cancel is not None else threading.Event()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._call_errors: list[str] = []
        self._call_waits: list[float] = []
        self.requests = 0  # attempts sent (resends not counted)
        self.fallbacks = 0
        self.resends = 0
        self.retries = 0
        self.retry_wait_s = 0.0
        self.errors: collections.Counter[str] = collections.Counter()  # failed attempts by kind
        self.retry_log: list[RetryRecord] = []

    @classmethod
    def from_profile(
        cls,
        profile: Profile,
        outbound: OutboundPolicy,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        cancel: threading.Event | None = None,
    ) -> HttpTarget:
        """The target of `profile`, if the outbound policy lets `namespace` reach its base
        URL (and send its credential there): PERMISSION_DENIED otherwise."""
        t = profile.target
        if t.kind != TargetKind.HTTP:
            raise InvalidArgument(
                TARGET_KIND_MISMATCH,
                f"profile.target.kind is {t.kind.value!r}; an HTTP target needs 'http'",
                field="profile.target.kind",
            )
        if not t.base_url:
            raise InvalidArgument(
                BASE_URL_REQUIRED,
                "profile.target.base_url is empty (e.g. http://127.0.0.1:8000/v1)",
                field="profile.target.base_url",
            )
        if not t.tokenizer:
            load_tokenizer("")  # raises TOKENIZER_REQUIRED
        target = cls(  # the fields first: their errors say what is missing
            t.base_url,
            t.api_model,
            t.tokenizer,
            outbound=outbound,
            namespace=namespace,
            options=http_options(t.options),
            cancel=cancel,
        )
        url = outbound.check_url(namespace, t.base_url)
        if t.credential:
            target.credential = outbound.credential(namespace, t.credential, url)
        return target

    def bind_cancel(self, cancel: threading.Event) -> None:
        """Wait between retries on `cancel` (the run's event): setting it ends the wait."""
        self._cancel, self._owns_cancel = cancel, False

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
                OUTPUT_TOKENS_INVALID,
                f"output_tokens={output_tokens}: must be at least 1",
                field="plan.output_tokens",
            )
        prompt = self._prompt_builder().build(prompt_tokens, seed)
        prompt_value: str | list[int] = (
            list(prompt.ids) if self.options.prompt_format == "token_ids" else prompt.text
        )
        self._call_errors, self._call_waits = [], []
        sample: Sample | None = None
        try:
            sample = self._negotiated(prompt_value, prompt_tokens, output_tokens)
            return sample
        finally:
            if self._call_errors:
                self.retry_log.append(
                    RetryRecord(
                        prompt_tokens,
                        output_tokens,
                        seed,
                        tuple(self._call_errors),
                        tuple(self._call_waits),
                        sample.start_time if sample is not None else None,
                    )
                )

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
        if self.credential is not None:
            env["http.credential"] = self.credential.id  # the id only
        if self._builder is not None:
            tok = self._builder.tokenizer
            env["http.tokenizer"] = tok.name
            env["http.tokenizer_sha256"] = tok.sha256
            env["http.tokenizer_vocab"] = str(tok.vocab_size)
        elif isinstance(self._tokenizer_ref, str):
            env["http.tokenizer"] = self._tokenizer_ref
        env["http.resends"] = str(self.resends)
        opts = self.options
        env["http.retries"] = str(self.retries)
        env["http.errors"] = tally(self.errors.elements())
        env["http.failed_attempts"] = (
            f"{sum(self.errors.values())} of {opts.max_failed_attempts} allowed"
        )
        env["http.retried_requests"] = str(len(self.retry_log))
        env["http.retry_wait_s"] = f"{self.retry_wait_s:.3f}"
        env["http.retry_policy"] = (
            f"max_attempts={opts.max_attempts} max_failed_attempts={opts.max_failed_attempts} "
            f"max_retry_after_s={opts.max_retry_after_s:g} "
            f"backoff={opts.backoff_base_s:g}..{opts.backoff_max_s:g}s full-jitter"
        )
        if self._server_header:
            env["http.server"] = self._server_header
        if self._models_status:
            env["http.models_status"] = self._models_status
        return env

    def close(self) -> None:
        if self._owns_cancel:
            self._cancel.set()  # a wait between retries in another thread ends now
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> HttpTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _negotiated(
        self, prompt_value: str | list[int], prompt_tokens: int, output_tokens: int
    ) -> Sample:
        """One request in the shape in use; while the shape is not settled, a rejected shape
        moves to the next candidate."""
        while True:
            shape = self.shapes[self._shape]
            try:
                sample = self._request(shape, prompt_value, prompt_tokens, output_tokens)
            except _Rejected as rej:
                if self._locked or self._shape + 1 >= len(self.shapes):
                    raise InvalidArgument(
                        API_REJECTED_REQUEST,
                        f"the API at {redact_url(self.base_url)} rejected the request "
                        f"(HTTP {rej.status}, shape {shape.describe()}): {rej.message}",
                    ) from None
                self._shape += 1
                self.fallbacks += 1
                continue
            self._locked = True
            return sample

    def _chunk_tokens(self, texts: Sequence[str]) -> Sequence[int]:
        return [len(ids) for ids in self._prompt_builder().tokenizer.encode_batch(texts)]

    def _prompt_builder(self) -> PromptBuilder:
        if self._builder is None:
            ref = self._tokenizer_ref
            self._builder = PromptBuilder(load_tokenizer(ref) if isinstance(ref, str) else ref)
        return self._builder
