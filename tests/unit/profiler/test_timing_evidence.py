"""Every sample says how its times were obtained (Sample.timing), and a profile whose samples
cannot support the cost model says so.

- `to_sample`'s rules, on hand-made completions (a stand-in token counter);
- the HTTP target against tests/fixtures/openai_server.py with a real (trained) tokenizer:
  one token per chunk, several, varying, tokens streamed as empty text, not streamed;
- TimingEvidence: provenance and the INVALID verdict;
- the runner: INVALID (TIMING_EVIDENCE_INSUFFICIENT) for a grid the chunks cannot support,
  SUCCEEDED with the evidence in provenance otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import (
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    Sample,
    SampleFlag,
    SampleTiming,
    StackSpec,
    Target,
    TargetKind,
)
from idealrt.services.profiler import _openai_stream as sse
from idealrt.services.profiler._timing_evidence import TimingEvidence
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.http_target import HttpOptions, HttpTarget
from idealrt.services.profiler.prompts import load_tokenizer
from idealrt.services.profiler.reasons import TIMING_EVIDENCE_INSUFFICIENT
from idealrt.services.profiler.runner import run_profile
from idealrt.services.store.repository import Store
from tests._fixtures import load_fixture

fake = load_fixture("openai_server")
make = load_fixture("make_hf_model")

T0 = 1_000
START = datetime(2026, 1, 2, tzinfo=UTC)
# one character a token, and no two of them merge (checked against the tokenizer below)
SYMBOLS = "!#%&"


def _symbol(i: int) -> str:
    return SYMBOLS[i % len(SYMBOLS)]


# ---------------------------------------------------------------- to_sample's rules


def _completion(texts: Sequence[str], completion_tokens: int | None, empty_before: int = 0) -> Any:
    return sse.Completion(
        chunk_times_ns=tuple(T0 + 100 * (i + 1) for i in range(len(texts))),
        chunk_texts=tuple(texts),
        empty_before_text=empty_before,
        empty_chunks=empty_before,
        text="".join(texts),
        prompt_tokens=3,
        completion_tokens=completion_tokens,
    )


def _by_length(texts: Sequence[str]) -> list[int]:
    return [len(t) for t in texts]  # the stand-in tokenizer: one character, one token


def _sample(c: Any, o: int, streamed: bool = True, count: Any = _by_length) -> Sample:
    return sse.to_sample(c, streamed, 3, o, T0, T0 + 10_000, START, count_tokens=count)


def test_one_token_per_chunk_is_stream_tokens() -> None:
    s = _sample(_completion(["a", "b", "c"], 3), 3)
    assert s.timing is SampleTiming.STREAM_TOKENS and s.chunks == 3
    assert s.prefill_ns == 100 and s.decode_ns == (100, 100)


def test_chunks_of_several_tokens_have_no_steps_and_no_prefill() -> None:
    s = _sample(_completion(["ab", "cd", "e"], 5), 5)
    assert s.timing is SampleTiming.STREAM_CHUNKS and s.chunks == 3
    assert s.decode_ns == ()  # never split into invented steps
    assert s.prefill_ns == 0  # the first chunk carried two tokens: its arrival is no TTFT
    assert s.flag is SampleFlag.OK  # the counts are right: kept, with what it proves


def test_a_first_chunk_of_exactly_the_first_token_keeps_the_prefill() -> None:
    s = _sample(_completion(["a", "bcd", "e"], 5), 5)
    assert (s.timing, s.prefill_ns, s.decode_ns) == (SampleTiming.STREAM_CHUNKS, 100, ())


@pytest.mark.parametrize(
    ("texts", "o", "empty_before", "why"),
    [
        (["a", "b", "c"], 4, 1, "a token with no text came before the first chunk"),
        (["a", "b", "c"], 4, 0, "a token somewhere has no text: it may be in the first chunk"),
    ],
)
def test_tokens_without_text_make_the_prefill_unknown(
    texts: list[str], o: int, empty_before: int, why: str
) -> None:
    s = _sample(_completion(texts, o, empty_before), o)
    assert (s.timing, s.prefill_ns, s.decode_ns, s.chunks) == (
        SampleTiming.STREAM_CHUNKS,
        0,
        (),
        3,
    ), why


def test_without_a_tokenizer_only_the_chunk_count_tells() -> None:
    assert _sample(_completion(["a", "b"], 2), 2, count=None).timing is SampleTiming.STREAM_TOKENS
    s = _sample(_completion(["a", "bc"], 3), 3, count=None)
    assert (s.timing, s.prefill_ns) == (SampleTiming.STREAM_CHUNKS, 0)


def test_without_usage_the_tokenizer_must_count_one_token_a_chunk() -> None:
    assert _sample(_completion(["a", "b"], None), 2).timing is SampleTiming.STREAM_TOKENS
    s = _sample(_completion(["a", "bc"], None), 3)
    assert s.timing is SampleTiming.STREAM_CHUNKS and s.flag is SampleFlag.NONCONFORMING
    assert _sample(_completion(["a", "b"], None), 2, count=None).timing is (
        SampleTiming.STREAM_CHUNKS
    )


def test_a_response_not_streamed_is_totals_only() -> None:
    c = sse.Completion(text="abc", prompt_tokens=3, completion_tokens=3)
    s = _sample(c, 3, streamed=False)
    assert (s.timing, s.prefill_ns, s.decode_ns, s.chunks) == (SampleTiming.TOTALS_ONLY, 0, (), 0)


def test_parse_stream_counts_empty_chunks_apart_from_the_finish() -> None:
    def ev(text: str, finish: str | None = None) -> sse.SseEvent:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        return sse.SseEvent(0, json.dumps({"choices": [choice]}))

    c = sse.parse_stream([ev(""), ev("a"), ev(""), ev("b"), ev("", "length")])
    assert c.chunk_texts == ("a", "b") and (c.empty_chunks, c.empty_before_text) == (2, 1)


# ---------------------------------------------------------------- through a real server


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(make.train_tokenizer(tmp_path_factory.mktemp("tok")))
    tok = load_tokenizer(str(path))
    runs = [_symbol(i) + _symbol(i + 1) + _symbol(i + 2) for i in range(len(SYMBOLS))]
    assert [len(ids) for ids in tok.encode_batch([*SYMBOLS, *runs])] == [1] * len(SYMBOLS) + [
        3
    ] * len(runs), "the symbols must be one token each and never merge"
    return path


@pytest.fixture
def api_factory(tok_path: Path) -> Iterator[Any]:
    tok = load_tokenizer(str(tok_path))
    started: list[Any] = []

    def start(**kw: Any) -> Any:
        kw.setdefault("token_text", _symbol)
        kw.setdefault("prefill_s", 0.01)
        kw.setdefault("decode_s", 0.001)
        cfg = fake.FakeConfig(count_tokens=lambda text: len(tok.encode(text)), **kw)
        srv = fake.FakeOpenAI(cfg).start()
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


def _generate(targets: list[HttpTarget], api: Any, tok_path: Path, o: int, **kw: Any) -> Sample:
    t = HttpTarget(api.base_url, "fake-model", str(tok_path), **kw)
    targets.append(t)
    s = t.generate(6, o, seed=0)
    assert s.flag is SampleFlag.OK and s.output_tokens == o
    return s


def test_served_one_token_per_chunk(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    s = _generate(targets, api_factory(), tok_path, 6)
    assert s.timing is SampleTiming.STREAM_TOKENS and s.chunks == 6
    assert len(s.decode_ns) == 5 and s.prefill_ns >= 10_000_000


def test_served_chunks_of_two_tokens(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    s = _generate(targets, api_factory(tokens_per_chunk=2), tok_path, 5)
    assert (s.timing, s.chunks, s.decode_ns, s.prefill_ns) == (
        SampleTiming.STREAM_CHUNKS,
        3,
        (),
        0,
    )
    assert s.total_ns >= 10_000_000


def test_served_varying_chunks_after_a_first_single_token(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    s = _generate(targets, api_factory(chunk_sizes=(1, 3, 2)), tok_path, 8)
    assert (s.timing, s.chunks, s.decode_ns) == (SampleTiming.STREAM_CHUNKS, 4, ())
    assert s.prefill_ns >= 10_000_000  # the first chunk was exactly the first token


@pytest.mark.parametrize("empty", [0, 3])
def test_served_tokens_without_text(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path, empty: int
) -> None:
    # `transformers serve` with a tokenizer smaller than the model's vocabulary
    s = _generate(targets, api_factory(empty_tokens=frozenset({empty})), tok_path, 6)
    assert (s.timing, s.chunks, s.decode_ns, s.prefill_ns) == (
        SampleTiming.STREAM_CHUNKS,
        5,
        (),
        0,
    )


def test_served_without_streaming(
    api_factory: Any, targets: list[HttpTarget], tok_path: Path
) -> None:
    s = _generate(targets, api_factory(), tok_path, 4, options=HttpOptions(stream=False))
    assert (s.timing, s.chunks, s.decode_ns, s.prefill_ns) == (SampleTiming.TOTALS_ONLY, 0, (), 0)


# ---------------------------------------------------------------- TimingEvidence


def _ok(p: int, o: int, timing: SampleTiming, prefill: int = 0, chunks: int = 0) -> Sample:
    steps = tuple([1] * (o - 1)) if timing.has_steps else ()
    return Sample(p, o, prefill, steps, 100, timing=timing, chunks=chunks)


def test_evidence_counts_by_timing_in_provenance() -> None:
    ev = TimingEvidence()
    for s in (
        _ok(4, 32, SampleTiming.STREAM_CHUNKS, chunks=2),
        _ok(8, 32, SampleTiming.STREAM_CHUNKS, chunks=20),
        _ok(8, 16, SampleTiming.STREAM_TOKENS, prefill=5),
        Sample(8, 16, 0, (), 100, flag=SampleFlag.WARMUP, timing=SampleTiming.TOTALS_ONLY),
    ):
        ev.add(s)
    assert ev.provenance() == {
        "timing.stream_chunks": "2",
        "timing.stream_tokens": "1",
        "timing.stream_chunks.chunks": "2-20 chunks per 32 tokens",
    }
    assert ev.insufficient() == ""  # one sample has per-step times


@pytest.mark.parametrize(
    ("grid", "invalid"),
    [
        ([(4, 32), (64, 32)], True),  # one output length
        ([(4, 16), (4, 32)], True),  # one prompt length
        ([(4, 16), (64, 32)], False),  # the totals separate alpha and beta
    ],
)
def test_evidence_without_steps_or_prefill_needs_a_grid(
    grid: list[tuple[int, int]], invalid: bool
) -> None:
    ev = TimingEvidence(tokenizer="/tok")
    for p, o in grid:
        ev.add(_ok(p, o, SampleTiming.STREAM_CHUNKS, chunks=3))
    ev.add(_ok(4, 32, SampleTiming.TOTALS_ONLY))
    error = ev.insufficient()
    assert error.startswith(f"{TIMING_EVIDENCE_INSUFFICIENT}: ") is invalid
    if invalid:
        assert (
            "2 of 3 samples have stream chunks of several tokens (tokenizer /tok counted" in error
        )
        assert "no sample has per-step decode times" in error and "the grid has one" in error


def test_evidence_with_a_measured_prefill_everywhere_is_enough() -> None:
    ev = TimingEvidence()
    for p in (4, 64):
        ev.add(_ok(p, 32, SampleTiming.STREAM_CHUNKS, prefill=7, chunks=3))
    assert ev.insufficient() == ""  # alpha from the prefills, beta from total - prefill


def test_held_out_samples_are_counted_but_do_not_make_the_grid() -> None:
    ev = TimingEvidence()
    ev.add(_ok(4, 32, SampleTiming.TOTALS_ONLY))
    ev.add(Sample(64, 16, 0, (), 100, heldout=True, timing=SampleTiming.TOTALS_ONLY))
    assert ev.provenance() == {"timing.totals_only": "2"}
    assert ev.insufficient().startswith(TIMING_EVIDENCE_INSUFFICIENT)


# ---------------------------------------------------------------- the runner's verdict


def _run(
    store: Store, kit: Any, lease_dir: Path, api: Any, tok_path: Path, outputs: tuple[int, ...]
) -> tuple[Profile, list[Sample]]:
    profile, _ = store.create_profile(
        Profile(
            id="",
            model=ModelRef(name="api"),
            stack=StackSpec(),
            plan=ProfilePlan(prompt_tokens=(4, 16), output_tokens=outputs, repeats=2, seed=3),
            target=Target(
                kind=TargetKind.HTTP,
                base_url=api.base_url,
                api_model="fake-model",
                tokenizer=str(tok_path),
            ),
        )
    )
    final = run_profile(
        profile,
        HttpTarget(api.base_url, "fake-model", str(tok_path)),
        store,
        cancel=threading.Event(),
        on_progress=lambda p: None,
        options=kit.quiet_options(lease_dir, contention=ContentionPolicy(enabled=False)),
    )
    return final, store.all_samples(profile.id)


def test_a_profile_the_chunks_cannot_support_ends_invalid(
    kit: Any, store: Store, lease_dir: Path, api_factory: Any, tok_path: Path
) -> None:
    api = api_factory(tokens_per_chunk=2, prefill_s=0.0, decode_s=0.0)
    final, samples = _run(store, kit, lease_dir, api, tok_path, outputs=(5,))
    assert final.state == ProfileState.INVALID
    reason, _, message = final.error.partition(": ")
    assert reason == TIMING_EVIDENCE_INSUFFICIENT
    assert f"tokenizer {tok_path} counted 3-3 chunks per 5 tokens" in message
    assert "one output length (5)" in message
    measured = [s for s in samples if s.flag is SampleFlag.OK]
    assert len(measured) == 4  # stored as measured, evidence and all
    assert all(s.timing is SampleTiming.STREAM_CHUNKS and s.chunks == 3 for s in measured)
    assert final.provenance.entries["timing.stream_chunks"] == "4"


def test_a_profile_with_weaker_evidence_succeeds_and_says_so(
    kit: Any, store: Store, lease_dir: Path, api_factory: Any, tok_path: Path
) -> None:
    api = api_factory(tokens_per_chunk=2, prefill_s=0.0, decode_s=0.0)
    final, _ = _run(store, kit, lease_dir, api, tok_path, outputs=(2, 5))
    assert final.state == ProfileState.SUCCEEDED, final.error
    entries = final.provenance.entries
    assert entries["timing.stream_chunks"] == "8"
    assert entries["timing.stream_chunks.chunks"] == "1-3 chunks per 2/5 tokens"
    assert "timing.stream_tokens" not in entries


def test_a_profile_of_one_token_per_chunk_records_it(
    kit: Any, store: Store, lease_dir: Path, api_factory: Any, tok_path: Path
) -> None:
    api = api_factory(prefill_s=0.0, decode_s=0.0)
    final, _ = _run(store, kit, lease_dir, api, tok_path, outputs=(5,))
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert final.provenance.entries["timing.stream_tokens"] == "4"
