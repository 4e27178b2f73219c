"""The wire side of an HTTP target: the client, headers, request bodies, one timed request
(sent once more when a kept-alive connection was closed meanwhile) and the mapping of
transport and status errors; `HttpTarget` (`idealrt.services.profiler.http_target`, whose
docstring describes the behaviour) builds on `_HttpClient`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from datetime import datetime
from typing import Any

import httpx

from idealrt.core.clock import utcnow
from idealrt.core.domain import Sample
from idealrt.core.errors import (
    FailedPrecondition,
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
from idealrt.services.profiler.reasons import (
    API_AUTH_FAILED,
    API_KEY_MISSING,
    API_RATE_LIMITED,
    API_REJECTED_REQUEST,
    API_SERVER_ERROR,
    API_STREAM_ERROR,
    API_TIMEOUT,
    API_TRANSPORT_ERROR,
    API_UNREACHABLE,
)

__all__ = ["_HttpClient", "_Rejected", "_is_loopback"]


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


class _HttpClient:
    """Requests to the API at `base_url`; the state it uses is set by HttpTarget.__init__."""

    base_url: str
    api_model: str
    api_key_env: str
    options: HttpOptions
    _transport: httpx.BaseTransport | None
    _client: httpx.Client | None
    _server_header: str
    requests: int
    resends: int

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
                    API_KEY_MISSING,
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
            return Unavailable(API_TIMEOUT, f"the API at {where} timed out ({kind}): {detail}")
        if isinstance(exc, httpx.ConnectError):
            return Unavailable(API_UNREACHABLE, f"cannot connect to the API at {where}: {detail}")
        return Unavailable(API_TRANSPORT_ERROR, f"the API at {where} failed ({kind}): {detail}")

    def _status_error(self, status: int, body: bytes) -> IdealrtError | _Rejected:
        msg = self._scrub(error_message(body))
        where = redact_url(self.base_url)
        if status in (400, 422):
            return _Rejected(status, msg)
        if status == 429:
            return ResourceExhausted(
                API_RATE_LIMITED, f"the API at {where} is rate limiting (HTTP 429): {msg}"
            )
        if status in (401, 403):
            return InvalidArgument(
                API_AUTH_FAILED,
                f"the API at {where} refused the credentials (HTTP {status}): {msg}",
                field="profile.target.api_key_env",
            )
        if status >= 500:
            return Unavailable(
                API_SERVER_ERROR, f"the API at {where} failed (HTTP {status}): {msg}"
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
                API_STREAM_ERROR,
                f"the API at {redact_url(self.base_url)} reported an error in its response: "
                f"{self._scrub(completion.error)}",
            )
        return to_sample(completion, streamed, p, o, t0, t_end, start)
