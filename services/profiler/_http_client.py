"""The wire side of an HTTP target: the client, headers, request bodies, one timed attempt
(sent once more when a kept-alive connection was closed meanwhile), the mapping of
transport and status errors, and the retries of failed attempts; `HttpTarget`
(`idealrt.services.profiler.http_target`, whose docstring describes the behaviour) builds
on `_HttpClient`.

Retries and the send-once-more are one idea with the attempt they repeat: what an attempt
raises decides whether it is retried, and every attempt is timed on its own.

Outbound checks (outbound.py): with a policy, connections go through `_CheckedBackend`,
which resolves the host itself, refuses (PERMISSION_DENIED, not retried) when an address is
not one the namespace may reach, and connects to the checked address (TLS still verifies
the host name). When a proxy from the environment applies (trust_env), httpx's own
transport is used: the proxy resolves the name, and only the host allow-list applies.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import ipaddress
import itertools
import json
import random
import threading
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpcore
import httpx
import structlog

from idealrt.core.clock import utcnow
from idealrt.core.domain import Sample
from idealrt.core.errors import (
    IdealrtError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from idealrt.services.profiler._http_options import EOS_DIALECTS, HttpOptions, RequestShape
from idealrt.services.profiler._openai_stream import (
    error_message,
    iter_sse,
    parse_body,
    parse_stream,
    redact_url,
    to_sample,
)
from idealrt.services.profiler.outbound import Credential, OutboundPolicy
from idealrt.services.profiler.reasons import (
    API_AUTH_FAILED,
    API_ERROR_BUDGET_EXHAUSTED,
    API_RATE_LIMITED,
    API_REJECTED_REQUEST,
    API_RETRY_CANCELLED,
    API_SERVER_ERROR,
    API_STREAM_ERROR,
    API_TIMEOUT,
    API_TRANSPORT_ERROR,
    API_UNREACHABLE,
)

__all__ = ["RetryRecord", "_HttpClient", "_Rejected", "_is_loopback", "retry_after_s", "tally"]

log = structlog.get_logger(__name__)


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


class _Transient(Exception):
    """A failed attempt that may be retried: the error it ends in when it is not, its kind
    for the tallies ("429", "503", "timeout", "connect", "transport", "stream") and the wait
    the server asked for (Retry-After, seconds; None when it sent none)."""

    def __init__(self, error: IdealrtError, kind: str, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.kind = kind
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class RetryRecord:
    """One generation that needed retries: the kind of each failed attempt, in order, and
    the wait before each retry. start_time is the kept sample's `Sample.start_time` (that of
    the attempt that succeeded), None when the generation failed."""

    prompt_tokens: int
    output_tokens: int
    seed: int
    errors: tuple[str, ...]
    waits_s: tuple[float, ...]
    start_time: datetime | None

    @property
    def retries(self) -> int:
        return len(self.waits_s)


def tally(kinds: Iterable[str]) -> str:
    """The kinds by count, most frequent first (`429 x 10, timeout x 2`); `none` for none."""
    counts = collections.Counter(kinds)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} x {n}" for k, n in ranked) or "none"


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """A Retry-After header in seconds from `now`: delay-seconds or an HTTP date (a date
    already past is 0); None when absent or unparseable."""
    value = (value or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _transport_kind(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    return "transport"


class _CheckedBackend(httpcore.SyncBackend):
    """Resolves, checks (`check(host, port, addresses)` raises to refuse) and connects to
    the checked addresses, in order."""

    def __init__(
        self,
        check: Callable[[str, int, list[str]], None],
        resolve: Callable[[str, int], list[str]],
    ) -> None:
        self.check = check
        self.resolve = resolve

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self.resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        self.check(host, port, addresses)
        last: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last


def _env_proxy_applies(url: str) -> bool:
    host = httpx.URL(url).host
    scheme = httpx.URL(url).scheme
    proxies = urllib.request.getproxies()
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


class _HttpClient:
    """Requests to the API at `base_url`; the state it uses is set by HttpTarget.__init__."""

    base_url: str
    api_model: str
    credential: Credential | None
    outbound: OutboundPolicy | None
    namespace: str
    _last_key: str
    options: HttpOptions
    _transport: httpx.BaseTransport | None
    _client: httpx.Client | None
    _server_header: str
    _clock: Callable[[], int]
    _sleep: Callable[[float], object] | None
    _rng: random.Random
    _cancel: threading.Event
    _owns_cancel: bool
    _call_errors: list[str]
    _call_waits: list[float]
    requests: int
    resends: int
    retries: int
    retry_wait_s: float
    errors: collections.Counter[str]

    def _checked_transport(self) -> httpx.BaseTransport | None:
        """A transport whose connections pass the outbound policy (None: httpx's own)."""
        policy = self.outbound
        if policy is None or self._transport is not None:
            return self._transport
        trust_env = self.options.trust_env and not _is_loopback(self.base_url)
        if trust_env and _env_proxy_applies(self.base_url):
            return None
        namespace = self.namespace

        def check(host: str, port: int, addresses: list[str]) -> None:
            policy.check_address(namespace, host, port, addresses)

        transport = httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        )
        # httpx takes no network backend; its pool (httpcore.ConnectionPool) does
        # (tests/unit/profiler/test_outbound.py connects through it)
        transport._pool._network_backend = _CheckedBackend(check, policy.resolve)
        return transport

    def _http(self) -> httpx.Client:
        if self._client is None:
            if self._owns_cancel:
                self._cancel.clear()  # close() ended the waits of the previous client
            self._client = httpx.Client(
                timeout=httpx.Timeout(
                    self.options.read_timeout_s, connect=self.options.connect_timeout_s
                ),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                transport=self._checked_transport(),
                # a proxy from the environment never applies to a loopback API
                trust_env=self.options.trust_env and not _is_loopback(self.base_url),
            )
        return self._client

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.credential is not None:
            self._last_key = self.credential.read()  # now: a rotated Secret takes effect
            headers["Authorization"] = f"Bearer {self._last_key}"
        return headers

    def _scrub(self, text: str) -> str:
        if self._last_key:
            text = text.replace(self._last_key, "[redacted]")
        return text.replace(self.base_url, redact_url(self.base_url))

    def _transport_error(self, exc: httpx.HTTPError) -> IdealrtError:
        where = redact_url(self.base_url)
        kind = type(exc).__name__
        detail = self._scrub(str(exc))
        if isinstance(exc, httpx.TimeoutException):
            return Unavailable(API_TIMEOUT, f"the API at {where} timed out ({kind}): {detail}")
        if isinstance(exc, httpx.ConnectError):
            return Unavailable(API_UNREACHABLE, f"cannot connect to the API at {where}: {detail}")
        return Unavailable(API_TRANSPORT_ERROR, f"the API at {where} failed ({kind}): {detail}")

    def _status_error(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> IdealrtError | _Rejected | _Transient:
        """The failure of a response with an error status: 408, 429 and 5xx are transient;
        a 400/422 may be a refused field (_Rejected); any other status fails at once with
        the API's message (or an excerpt of its body)."""
        msg = self._scrub(error_message(body))
        where = redact_url(self.base_url)
        if status in (400, 422):
            return _Rejected(status, msg)
        if status == 429:
            return _Transient(
                ResourceExhausted(
                    API_RATE_LIMITED, f"the API at {where} is rate limiting (HTTP 429): {msg}"
                ),
                "429",
                retry_after,
            )
        if status == 408:
            return _Transient(
                Unavailable(API_TIMEOUT, f"the API at {where} timed out (HTTP 408): {msg}"),
                "408",
                retry_after,
            )
        if status in (401, 403):
            return InvalidArgument(
                API_AUTH_FAILED,
                f"the API at {where} refused the credentials (HTTP {status}): {msg}",
                field="profile.target.credential",
            )
        if status >= 500:
            return _Transient(
                Unavailable(API_SERVER_ERROR, f"the API at {where} failed (HTTP {status}): {msg}"),
                str(status),
                retry_after,
            )
        return InvalidArgument(
            API_REJECTED_REQUEST,
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
            start = utcnow()
            t0 = self._clock()
            try:
                return start, t0, client.send(request, stream=True)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                if attempt == 2:
                    raise
                self.resends += 1
        raise AssertionError("unreachable")

    def _attempt(self, shape: RequestShape, prompt: str | list[int], p: int, o: int) -> Sample:
        """One attempt, timed on its own: its Sample, or _Transient / _Rejected /
        IdealrtError (not retried)."""
        client = self._http()
        request = client.build_request(
            "POST",
            f"{self.base_url}/completions",
            content=json.dumps(self._body(shape, prompt, o)).encode(),
            headers=self._headers(),
        )
        clock = self._clock
        self.requests += 1
        try:
            start, t0, response = self._send(client, request)
            try:
                if response.status_code >= 400:
                    response.read()
                    wait = retry_after_s(response.headers.get("retry-after"), utcnow())
                    raise self._status_error(response.status_code, response.content, wait)
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
        except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
            raise self._transport_error(exc) from None  # our request is wrong: never retried
        except httpx.HTTPError as exc:
            raise _Transient(self._transport_error(exc), _transport_kind(exc)) from None
        if completion.error is not None:
            raise _Transient(
                Unavailable(
                    API_STREAM_ERROR,
                    f"the API at {redact_url(self.base_url)} reported an error in its "
                    f"response: {self._scrub(completion.error)}",
                ),
                "stream",
            )
        # counted after the stream ended: never inside the timed region
        return to_sample(
            completion, streamed, p, o, t0, t_end, start, count_tokens=self._chunk_tokens
        )

    def _chunk_tokens(self, texts: Sequence[str]) -> Sequence[int]:
        """The tokens of each stream chunk's text by the profile's tokenizer (HttpTarget)."""
        raise NotImplementedError

    def _request(self, shape: RequestShape, prompt: str | list[int], p: int, o: int) -> Sample:
        """One request: attempts until one succeeds, one fails in a way not retried, the
        request's `max_attempts` are spent or the profile's `max_failed_attempts` are.
        Between attempts, a wait: the server's Retry-After (at most `max_retry_after_s`),
        else exponential backoff with full jitter. Failed attempts and waits are tallied on
        the client (`errors`, `retries`, `retry_wait_s`) and for the current generation
        (`_call_errors`, `_call_waits`)."""
        opts = self.options
        for attempt in itertools.count(1):
            try:
                return self._attempt(shape, prompt, p, o)
            except _Transient as failure:
                self.errors[failure.kind] += 1
                self._call_errors.append(failure.kind)
                self._give_up_if_spent(failure, attempt)
                wait = self._retry_wait(attempt, failure.retry_after)
                log.warning(
                    "http_attempt_failed",
                    base_url=redact_url(self.base_url),
                    kind=failure.kind,
                    reason=failure.error.reason,
                    attempt=attempt,
                    max_attempts=opts.max_attempts,
                    retry_after_s=failure.retry_after,
                    wait_s=round(wait, 3),
                )
                if not self._wait(wait):
                    raise Unavailable(
                        API_RETRY_CANCELLED,
                        f"cancelled while waiting {wait:.1f} s to retry a request to the API "
                        f"at {redact_url(self.base_url)} after: {failure.error.message}",
                    ) from None
                self.retries += 1
                self.retry_wait_s += wait
                self._call_waits.append(wait)
        raise AssertionError("unreachable")

    def _give_up_if_spent(self, failure: _Transient, attempt: int) -> None:
        """Raise when the profile's error budget or this request's attempts are spent."""
        opts = self.options
        used = sum(self.errors.values())
        if used >= opts.max_failed_attempts:
            raise ResourceExhausted(
                API_ERROR_BUDGET_EXHAUSTED,
                f"{used} of {opts.max_failed_attempts} allowed failed attempts "
                f"(profile.target.options.max_failed_attempts) spent on the API at "
                f"{redact_url(self.base_url)}: {tally(self.errors.elements())}; "
                f"the last: {failure.error.message}",
                field="profile.target.options.max_failed_attempts",
            ) from None
        if attempt >= opts.max_attempts:
            err = failure.error
            raise type(err)(
                err.reason,
                f"{err.message} (attempt {attempt} of {opts.max_attempts}, "
                f"profile.target.options.max_attempts; this request's failed attempts: "
                f"{tally(self._call_errors)})",
                field=err.field,
            ) from None

    def _retry_wait(self, attempt: int, retry_after: float | None) -> float:
        opts = self.options
        if retry_after is not None:
            return min(retry_after, opts.max_retry_after_s)
        cap = min(opts.backoff_max_s, opts.backoff_base_s * 2.0 ** (attempt - 1))
        return self._rng.uniform(0.0, cap)

    def _wait(self, seconds: float) -> bool:
        """Wait before a retry, on the cancel event (or the injected sleep); False when
        cancelled, before or during the wait."""
        if self._cancel.is_set():
            return False
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            self._cancel.wait(seconds)
        return not self._cancel.is_set()
