"""The options of an HTTP target (`HttpOptions`, parsed from a profile's `target.options` by
`http_options`), the EOS-control dialects and the request shapes negotiated from them;
public through `idealrt.services.profiler.http_target`.

Retry options (their use: `_http_client`): each bounded, and out of range is
INVALID_ARGUMENT TARGET_OPTION_INVALID naming the option (`profile.target.options.<key>`
from a profile). Defaults suit a rate-limited public API profiled over hours: 6 attempts a
request (waits of about 1, 2, 4, 8, 16 s, or what Retry-After says up to 120 s), and a
profile absorbs up to 100 failed attempts before it ends FAILED.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from idealrt.core.errors import InvalidArgument, invalid
from idealrt.services.profiler.reasons import (
    PROMPT_FORMAT_INVALID,
    TARGET_OPTION_INVALID,
    TARGET_OPTION_UNKNOWN,
    UNKNOWN_EOS_DIALECT,
)

__all__ = ["EOS_DIALECTS", "HttpOptions", "RequestShape", "http_options"]

EOS_DIALECTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "vllm": lambda o: {"ignore_eos": True, "min_tokens": o},
    "transformers": lambda o: {
        "generation_config": json.dumps(
            {"min_new_tokens": o, "max_new_tokens": o, "do_sample": False}
        )
    },
    "none": lambda o: {},
}


_INT_RANGES = {"max_attempts": (1, 100), "max_failed_attempts": (1, 100_000)}
_SECONDS_RANGES = {"max_retry_after_s": 3600.0, "backoff_base_s": 600.0, "backoff_max_s": 3600.0}


def _allowed(name: str) -> str:
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        return f"an integer in [{low}, {high}]"
    return f"a number of seconds in (0, {_SECONDS_RANGES[name]:g}]"


def _in_range(name: str, value: object) -> bool:
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return isinstance(value, int | float) and 0 < value <= _SECONDS_RANGES[name]  # not NaN


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
    # retries of 408, 429, 5xx, connection errors, timeouts and broken streams
    max_attempts: int = 6  # per request, the first one included (1: never retry)
    max_failed_attempts: int = 100  # per profile: the failed attempt that reaches it ends it
    max_retry_after_s: float = 120.0  # the longest wait a Retry-After header gets
    backoff_base_s: float = 1.0  # retry n waits U(0, min(backoff_max_s, base * 2^(n-1)))
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        for name in (*_INT_RANGES, *_SECONDS_RANGES):
            value = getattr(self, name)
            if not _in_range(name, value):
                raise invalid(
                    name, TARGET_OPTION_INVALID, f"{name}={value!r}: must be {_allowed(name)}"
                )
        if self.backoff_max_s < self.backoff_base_s:
            raise invalid(
                "backoff_max_s",
                TARGET_OPTION_INVALID,
                f"backoff_max_s={self.backoff_max_s!r}: must be at least "
                f"backoff_base_s={self.backoff_base_s!r}",
            )
        if self.prompt_format not in ("text", "token_ids"):
            raise InvalidArgument(
                PROMPT_FORMAT_INVALID,
                f"prompt_format={self.prompt_format!r}: must be 'text' or 'token_ids'",
                field="prompt_format",
            )
        unknown = [d for d in self.eos_dialects if d not in EOS_DIALECTS]
        if unknown or not self.eos_dialects:
            raise InvalidArgument(
                UNKNOWN_EOS_DIALECT,
                f"eos_dialects {list(self.eos_dialects)}: each must be one of "
                f"{sorted(EOS_DIALECTS)}, at least one",
                field="eos_dialects",
            )


_OPTION_KEYS = (
    "stream",
    "prompt_format",
    "eos_dialects",
    "connect_timeout_s",
    "read_timeout_s",
    *_INT_RANGES,
    *_SECONDS_RANGES,
)


def http_options(raw: Mapping[str, str]) -> HttpOptions:
    """HttpOptions from a profile's `target.options` (strings); unknown keys or bad values
    are INVALID_ARGUMENT naming `profile.target.options.<key>`."""
    unknown = sorted(set(raw) - set(_OPTION_KEYS))
    if unknown:
        raise InvalidArgument(
            TARGET_OPTION_UNKNOWN,
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
            TARGET_OPTION_INVALID,
            f"profile.target.options: {exc}",
            field="profile.target.options",
        ) from None
    for key in (*_INT_RANGES, *_SECONDS_RANGES):
        if key in raw:
            try:
                kw[key] = int(raw[key]) if key in _INT_RANGES else float(raw[key])
            except ValueError:
                raise invalid(
                    f"profile.target.options.{key}",
                    TARGET_OPTION_INVALID,
                    f"{key}={raw[key]!r}: must be {_allowed(key)}",
                ) from None  # the range is checked by HttpOptions
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
