"""Server-sent events and OpenAI completions payloads, parsed without timing side effects,
and turned into Samples (`to_sample`).

`iter_sse(lines, clock)` turns the response's lines into events stamped with the clock
reading taken when the event's first `data:` line was read (its bytes arrived then; events
that arrived in one network read get near-equal stamps). Only string checks happen while the
stream is open; JSON is parsed afterwards (`parse_stream`) so the timed loop does no more
work than it must.

SSE rules followed (WHATWG): `field: value` lines, one optional space after the colon;
several `data:` lines of an event join with "\n"; a blank line dispatches the event; lines
starting with ":" are comments (keep-alives); `data: [DONE]` ends an OpenAI stream; an
unterminated event at EOF is dispatched too.

A *token chunk* is an event whose first choice carries non-empty `text`; an *empty chunk* one
whose first choice has `text: ""` and no `finish_reason` (a server that cannot decode a
token, e.g. an id beyond its tokenizer's vocabulary, streams it so). Servers differ in
where they put `usage` (OpenAI and vLLM: a last chunk with `choices: []`; `transformers
serve`: the last chunk, with `text: ""` and `finish_reason`), so usage is taken from any
event that has it (the last one wins).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from idealrt.core.domain import Sample, SampleFlag, SampleTiming

__all__ = [
    "Completion",
    "SseEvent",
    "TokenCounter",
    "error_message",
    "iter_sse",
    "parse_body",
    "parse_stream",
    "redact_url",
    "to_sample",
]

DONE = "[DONE]"


@dataclasses.dataclass(frozen=True)
class SseEvent:
    t_ns: int  # clock reading when its first data line was read
    data: str
    event: str = ""


@dataclasses.dataclass(frozen=True)
class Completion:
    """One completions response, streamed or not."""

    chunk_times_ns: tuple[int, ...] = ()  # arrival of each token chunk (streaming only)
    chunk_texts: tuple[str, ...] = ()  # the text of each token chunk
    empty_chunks: int = 0  # empty chunks (see the module doc) in all
    empty_before_text: int = 0  # empty chunks before the first token chunk
    text: str = ""
    prompt_tokens: int | None = None  # from usage; None when the API sent none
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # an error event inside a 200 stream
    events: int = 0  # data events seen (token chunks, role/usage chunks, [DONE])
    done: bool = False  # `[DONE]` seen


def iter_sse(lines: Iterable[str], clock: Callable[[], int]) -> Iterator[SseEvent]:
    data: list[str] = []
    event = ""
    t_first = 0
    for line in lines:
        if not line:
            if data:
                yield SseEvent(t_first, "\n".join(data), event)
            data, event = [], ""
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            if not data:
                t_first = clock()
            data.append(value)
        elif field == "event":
            event = value
    if data:
        yield SseEvent(t_first, "\n".join(data), event)


def _usage(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None, None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (int(p) if isinstance(p, int) else None, int(c) if isinstance(c, int) else None)


def _first_choice(obj: dict[str, Any]) -> dict[str, Any] | None:
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or json.dumps(err))
    return str(err)


def parse_stream(events: Iterable[SseEvent]) -> Completion:
    """Fold the events of one streamed completion. Unparseable data is an error."""
    times: list[int] = []
    parts: list[str] = []
    prompt_tokens = completion_tokens = None
    finish: str | None = None
    error: str | None = None
    n = empty = empty_before = 0
    done = False
    for ev in events:
        n += 1
        if ev.data.strip() == DONE:
            done = True
            break
        try:
            obj = json.loads(ev.data)
        except ValueError:
            error = f"unparseable stream event: {ev.data[:200]!r}"
            break
        if not isinstance(obj, dict):
            error = f"unexpected stream event: {ev.data[:200]!r}"
            break
        if ev.event == "error" or "error" in obj:
            error = _error_text(obj.get("error", obj))
            break
        p, c = _usage(obj)
        if p is not None or c is not None:
            prompt_tokens, completion_tokens = p, c
        choice = _first_choice(obj)
        if choice is None:
            continue
        text = choice.get("text")
        if isinstance(text, str) and text:
            times.append(ev.t_ns)
            parts.append(text)
        elif text == "" and not choice.get("finish_reason"):
            empty += 1
            empty_before += not times
        if choice.get("finish_reason"):
            finish = str(choice["finish_reason"])
    return Completion(
        chunk_times_ns=tuple(times),
        chunk_texts=tuple(parts),
        empty_chunks=empty,
        empty_before_text=empty_before,
        text="".join(parts),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish,
        error=error,
        events=n,
        done=done,
    )


def parse_body(body: bytes) -> Completion:
    """A non-streamed completions response (JSON)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return Completion(error=f"response is not JSON: {body[:200]!r}")
    if not isinstance(obj, dict):
        return Completion(error=f"unexpected response: {body[:200]!r}")
    if "error" in obj:
        return Completion(error=_error_text(obj["error"]))
    p, c = _usage(obj)
    choice = _first_choice(obj) or {}
    text = choice.get("text")
    reason = choice.get("finish_reason")
    return Completion(
        text=text if isinstance(text, str) else "",
        prompt_tokens=p,
        completion_tokens=c,
        finish_reason=str(reason) if reason else None,
        events=1,
    )


def error_message(body: bytes, limit: int = 500) -> str:
    """The API's own message from an error response: OpenAI `{"error": {"message"}}`,
    FastAPI `{"detail": ...}`, `{"message": ...}`, `{"error": "..."}`; else the raw text."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:limit]
    if isinstance(obj, dict):
        for key in ("error", "detail", "message"):
            if key in obj:
                val = obj[key]
                if key == "detail" and isinstance(val, list):  # pydantic validation errors
                    return "; ".join(
                        str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in val
                    )[:limit]
                return _error_text(val)[:limit]
    return json.dumps(obj)[:limit]


def redact_url(url: str) -> str:
    """base_url without user:password@ and without a query (keys sometimes travel there)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


# The tokens of each text (no special tokens), e.g. PromptTokenizer.encode_batch's lengths.
TokenCounter = Callable[[Sequence[str]], Sequence[int]]


def _token_counts(c: Completion, count: TokenCounter | None) -> tuple[int, ...] | None:
    if count is None or not c.chunk_texts:
        return None
    return tuple(count(c.chunk_texts))


def to_sample(
    c: Completion,
    streamed: bool,
    p: int,
    o: int,
    t0: int,
    t_end: int,
    start: datetime,
    count_tokens: TokenCounter | None = None,
) -> Sample:
    """The Sample of one response (the rules are in http_target's docstring). `count_tokens`
    (the profile's tokenizer) counts the tokens of each chunk's text; without it, what a
    chunk carried is known only from the chunk count against usage.completion_tokens."""
    times = c.chunk_times_ns
    got_p = c.prompt_tokens if c.prompt_tokens is not None else p
    if c.completion_tokens is not None:
        got_o = c.completion_tokens
    else:
        got_o = len(times) if streamed else 0
    counts = _token_counts(c, count_tokens) if streamed else None
    # One token per chunk: as many token chunks as the API counted tokens (each carries at
    # least one, so each carries exactly one); without usage, the tokenizer must say so.
    one_per_chunk = (
        streamed
        and got_o > 0
        and len(times) == got_o
        and (c.completion_tokens is not None or (counts is not None and set(counts) == {1}))
    )
    decode: tuple[int, ...] = ()
    if not streamed:
        timing, prefill = SampleTiming.TOTALS_ONLY, 0
    elif one_per_chunk:
        timing = SampleTiming.STREAM_TOKENS
        prefill = times[0] - t0
        decode = tuple(b - a for a, b in itertools.pairwise(times))
    else:
        # Several tokens a chunk, or tokens without text: no per-step times. The first
        # chunk's arrival is the first token's only when it carried exactly that token:
        # nothing before it, one token by the tokenizer, and the tokenizer sees every
        # token the API counted (else some token's text is invisible and could be in it).
        timing = SampleTiming.STREAM_CHUNKS
        first_is_one = (
            counts is not None
            and c.empty_before_text == 0
            and counts[0] == 1
            and sum(counts) == got_o
        )
        prefill = times[0] - t0 if first_is_one else 0
    conforming = (
        c.prompt_tokens is not None
        and c.completion_tokens is not None
        and got_p == p
        and got_o == o
    )
    total = t_end - t0
    return Sample(
        prompt_tokens=got_p,
        output_tokens=got_o,
        prefill_ns=prefill,
        decode_ns=decode,
        total_ns=total,
        start_time=start,
        rpc_ns=total,
        flag=SampleFlag.OK if conforming else SampleFlag.NONCONFORMING,
        timing=timing,
        chunks=len(times) if streamed else 0,
    )
