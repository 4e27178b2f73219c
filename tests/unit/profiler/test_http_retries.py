"""HttpTarget retries: 408/429/5xx, connection errors, timeouts; Retry-After; the error budget.

Over the real HTTP server of tests/fixtures/openai_server.py, whose `faults` fail chosen
requests on cue. The waits between attempts go to an injected sleep that records them (and
may advance an injected clock), so no test waits for real: the waits are asserted as the
values the target chose, never as elapsed time.
"""

from __future__ import annotations

import email.utils
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import ProfileState, SampleFlag
from idealrt.core.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from idealrt.services.profiler import _http_client
from idealrt.services.profiler.http_target import HttpOptions, HttpTarget, http_options
from idealrt.services.profiler.prompts import PromptTokenizer, load_tokenizer
from tests._fixtures import load_fixture

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


fake = load_fixture("openai_server")
make = load_fixture("make_hf_model")
Fault = fake.Fault


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make.train_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_path: Path) -> PromptTokenizer:
    return load_tokenizer(str(tok_path))


@pytest.fixture
def api_factory(tok: PromptTokenizer) -> Iterator[Any]:
    started: list[Any] = []

    def start(**kw: Any) -> Any:
        cfg = fake.FakeConfig(count_tokens=lambda text: len(tok.encode(text)), **kw)
        srv = fake.FakeOpenAI(cfg).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


class FakeTime:
    """The injected clock and sleep: sleep(s) records s and moves the clock s ahead."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.offset_ns = 0

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.offset_ns += int(seconds * 1e9)

    def clock(self) -> int:
        return time.perf_counter_ns() + self.offset_ns


@pytest.fixture
def make_target(tok_path: Path) -> Iterator[Any]:
    made: list[HttpTarget] = []

    def build(base_url: str, fake_time: FakeTime, **options: Any) -> HttpTarget:
        t = HttpTarget(
            base_url,
            "fake-model",
            str(tok_path),
            options=HttpOptions(**options),
            sleep=fake_time.sleep,
            clock=fake_time.clock,
        )
        made.append(t)
        return t

    yield build
    for t in made:
        t.close()


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _http_date(delta_s: float) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=delta_s), usegmt=True)


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
        options=kit.quiet_options(lease_dir, contention=ContentionPolicy(enabled=False)),
    )
    return final, store.all_samples(profile.id)


# ---------------------------------------------------------------- through the runner


def test_429_burst_with_retry_after_succeeds_and_records_the_retries(
    kit: Any, store: Any, lease_dir: Path, api_factory: Any, make_target: Any
) -> None:
    # the negotiation in prepare() meets three 429s; a later sample two 503s
    faults = {
        **fake.on_requests(range(1, 4), Fault(429, retry_after="1")),
        **fake.on_requests(range(7, 9), Fault(503)),
    }
    api = api_factory(faults=faults)
    ft = FakeTime()
    target = make_target(api.base_url, ft)
    final, samples = _run_profile(kit, store, lease_dir, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert ft.waits[:3] == [1.0, 1.0, 1.0]  # Retry-After honoured
    assert len(ft.waits) == 5 and all(0.0 <= w <= 2.0 for w in ft.waits[3:])  # jittered backoff
    assert target.retries == 5 and dict(target.errors) == {"429": 3, "503": 2}
    negotiation, sample = target.retry_log
    assert (negotiation.errors, negotiation.waits_s) == (("429",) * 3, (1.0,) * 3)
    assert sample.errors == ("503", "503") and sample.retries == 2
    kept = [s for s in samples if s.start_time == sample.start_time]
    assert len(kept) == 1 and kept[0].flag in (SampleFlag.OK, SampleFlag.WARMUP)
    assert (kept[0].prompt_tokens, kept[0].output_tokens) == (
        sample.prompt_tokens,
        sample.output_tokens,
    )
    # the kept sample started after the last failed attempt reached the server
    calls = api.completions()
    assert calls[7].received < sample.start_time <= calls[8].received
    env = final.provenance.entries  # read again at the end of the run: every retry
    assert env["target.http.retries"] == "5" and env["target.http.errors"] == "429 x 3, 503 x 2"
    end = target.environment()
    assert end["http.retries"] == "5" and end["http.errors"] == "429 x 3, 503 x 2"
    assert end["http.retried_requests"] == "2"
    assert end["http.failed_attempts"] == "5 of 100 allowed"


def test_error_budget_exhausted_fails_the_profile(
    kit: Any, store: Any, lease_dir: Path, api_factory: Any, make_target: Any
) -> None:
    faults = {
        **fake.on_requests(range(3, 5), Fault(503)),
        **fake.on_requests(range(5, 100), Fault(429, retry_after="0")),
    }
    api = api_factory(faults=faults)
    ft = FakeTime()
    target = make_target(api.base_url, ft, max_failed_attempts=6, max_attempts=50)
    final, _ = _run_profile(kit, store, lease_dir, target)
    assert final.state == ProfileState.FAILED
    assert final.error.startswith("API_ERROR_BUDGET_EXHAUSTED:")
    assert dict(target.errors) == {"503": 2, "429": 4}
    assert len(api.completions()) == 2 + 6  # nothing sent once the budget was spent
    assert len(ft.waits) == 5


def test_a_400_fails_the_profile_at_once_without_retry(
    kit: Any, store: Any, lease_dir: Path, api_factory: Any, make_target: Any
) -> None:
    api = api_factory(faults={3: Fault(400)})
    ft = FakeTime()
    target = make_target(api.base_url, ft)
    final, _ = _run_profile(kit, store, lease_dir, target)
    assert final.state == ProfileState.FAILED
    assert final.error.startswith("API_REJECTED_REQUEST:")
    assert len(api.completions()) == 3 and ft.waits == [] and target.retries == 0
    assert not target.errors and target.retry_log == []


# ---------------------------------------------------------------- one target


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(api_factory: Any, make_target: Any, status: int) -> None:
    api = api_factory(faults={1: Fault(status)})
    ft = FakeTime()
    t = make_target(api.base_url, ft)
    assert t.generate(4, 2, seed=0).flag == SampleFlag.OK
    assert len(api.completions()) == 2 and dict(t.errors) == {str(status): 1}
    assert len(ft.waits) == 1 and 0.0 <= ft.waits[0] <= 1.0  # U(0, backoff_base_s)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_other_4xx_fail_at_once(api_factory: Any, make_target: Any, status: int) -> None:
    api = api_factory(faults={2: Fault(status, body="<html>no such thing</html>")})
    ft = FakeTime()
    t = make_target(api.base_url, ft)
    t.generate(4, 2, seed=0)  # settles the request shape: a 400 is then no field refusal
    with pytest.raises(InvalidArgument) as e:
        t.generate(4, 2, seed=1)
    assert e.value.reason in ("API_REJECTED_REQUEST", "API_AUTH_FAILED")
    assert len(api.completions()) == 2 and ft.waits == [] and not t.errors


def test_timeouts_and_dropped_connections_are_retried(api_factory: Any, make_target: Any) -> None:
    api = api_factory(faults={1: Fault(hang_s=30.0), 2: Fault(500)})
    ft = FakeTime()
    t = make_target(api.base_url, ft, read_timeout_s=0.2, backoff_base_s=2.0)
    assert t.generate(4, 2, seed=0).flag == SampleFlag.OK
    assert t.retry_log[0].errors == ("timeout", "500")
    assert 0.0 <= ft.waits[0] <= 2.0 and 0.0 <= ft.waits[1] <= 4.0  # the cap doubles
    # three drops: the resend of a stale connection fails too, a retry then succeeds
    api.config.drop_requests = 3
    assert t.generate(4, 2, seed=1).flag == SampleFlag.OK
    assert t.retry_log[1].errors == ("transport",) and t.resends == 2


def test_attempts_of_one_request_are_bounded(api_factory: Any, make_target: Any) -> None:
    api = api_factory(faults=fake.on_requests(range(1, 10), Fault(503, retry_after="2")))
    ft = FakeTime()
    t = make_target(api.base_url, ft, max_attempts=3)
    with pytest.raises(Unavailable) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_SERVER_ERROR"
    assert len(api.completions()) == 3 and ft.waits == [2.0, 2.0]
    (record,) = t.retry_log
    assert record.errors == ("503",) * 3 and record.start_time is None


def test_connection_refused_is_retried_then_unavailable(make_target: Any) -> None:
    ft = FakeTime()
    t = make_target(_refused_url(), ft, max_attempts=3)
    with pytest.raises(Unavailable) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_UNREACHABLE"
    assert dict(t.errors) == {"connect": 3} and len(ft.waits) == 2


def test_rate_limit_past_the_attempts_is_resource_exhausted(
    api_factory: Any, make_target: Any
) -> None:
    api = api_factory(faults=fake.on_requests(range(1, 10), Fault(429)))
    t = make_target(api.base_url, FakeTime(), max_attempts=2)
    with pytest.raises(ResourceExhausted) as e:
        t.generate(4, 2, seed=0)
    assert e.value.reason == "API_RATE_LIMITED"


def test_retried_sample_is_timed_from_the_successful_attempt(
    api_factory: Any, make_target: Any
) -> None:
    api = api_factory(faults={1: Fault(503, retry_after="100")})
    ft = FakeTime()  # the wait moves the target's clock 100 s ahead
    t = make_target(api.base_url, ft)
    s = t.generate(6, 4, seed=0)
    assert ft.waits == [100.0]
    assert s.flag == SampleFlag.OK
    # timed from the first attempt, the sample would hold the 100 s wait
    assert 0 < s.prefill_ns <= s.total_ns < 50 * 10**9
    first, second = api.completions()
    assert first.received < s.start_time <= second.received
    assert t.retry_log[0].start_time == s.start_time


def test_retry_after_http_date_and_the_cap(api_factory: Any, make_target: Any) -> None:
    api = api_factory(
        faults={
            1: Fault(429, retry_after=_http_date(30.0)),
            2: Fault(429, retry_after="1000"),
            3: Fault(503, retry_after="soon"),  # unparseable: backoff instead
        }
    )
    ft = FakeTime()
    t = make_target(api.base_url, ft, max_retry_after_s=60.0, backoff_base_s=0.5)
    assert t.generate(4, 2, seed=0).flag == SampleFlag.OK
    date_wait, capped, backoff = ft.waits
    assert 20.0 < date_wait <= 30.0
    assert capped == 60.0
    assert 0.0 <= backoff <= 0.5 * 2**2


def test_the_wait_ends_when_the_run_is_cancelled(api_factory: Any, tok_path: Path) -> None:
    api = api_factory(faults={1: Fault(429, retry_after="3600")})
    cancel = threading.Event()
    t = HttpTarget(api.base_url, "fake-model", str(tok_path), options=HttpOptions())
    t.bind_cancel(cancel)  # a real wait, on the run's event
    timer = threading.Timer(0.05, cancel.set)
    timer.start()
    try:
        with pytest.raises(Unavailable) as e:
            t.generate(4, 2, seed=0)
    finally:
        timer.cancel()
        timer.join()
        t.close()
    assert e.value.reason == "API_RETRY_CANCELLED"
    assert len(api.completions()) == 1 and t.retries == 0


def test_an_injected_sleep_is_cancellable_too(api_factory: Any, tok_path: Path) -> None:
    api = api_factory(faults={1: Fault(503)})
    cancel = threading.Event()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        cancel.set()

    t = HttpTarget(api.base_url, "fake-model", str(tok_path), cancel=cancel, sleep=sleep)
    try:
        with pytest.raises(Unavailable) as e:
            t.generate(4, 2, seed=0)
        assert e.value.reason == "API_RETRY_CANCELLED" and len(waits) == 1
        with pytest.raises(Unavailable) as e:  # already cancelled: no wait at all
            api.config.faults[2] = Fault(503)
            t.generate(4, 2, seed=1)
        assert e.value.reason == "API_RETRY_CANCELLED" and len(waits) == 1
    finally:
        t.close()


def test_close_ends_a_wait_of_a_target_without_a_cancel_event(
    api_factory: Any, tok_path: Path
) -> None:
    api = api_factory(faults={1: Fault(429, retry_after="3600")})
    t = HttpTarget(api.base_url, "fake-model", str(tok_path))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            t.generate(4, 2, seed=0)
        except Unavailable as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while not t.errors and worker.is_alive():  # once the first attempt failed, it waits
        worker.join(0.01)
    t.close()
    worker.join(30.0)
    assert not worker.is_alive()
    assert [getattr(e, "reason", "") for e in errors] == ["API_RETRY_CANCELLED"]


# ---------------------------------------------------------------- options and helpers


@pytest.mark.parametrize(
    "bad",
    [
        {"max_attempts": 0},
        {"max_attempts": 101},
        {"max_failed_attempts": 0},
        {"max_retry_after_s": 0.0},
        {"max_retry_after_s": float("nan")},
        {"backoff_base_s": -1.0},
        {"backoff_max_s": 4000.0},
        {"backoff_base_s": 10.0, "backoff_max_s": 5.0},
    ],
)
def test_retry_options_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as e:
        HttpOptions(**bad)
    assert e.value.reason == "TARGET_OPTION_INVALID"
    assert e.value.field in bad


def test_retry_options_from_target_options() -> None:
    opts = http_options(
        {
            "max_attempts": "3",
            "max_failed_attempts": "12",
            "max_retry_after_s": "30",
            "backoff_base_s": "0.5",
            "backoff_max_s": "8",
        }
    )
    assert (opts.max_attempts, opts.max_failed_attempts, opts.max_retry_after_s) == (3, 12, 30.0)
    assert (opts.backoff_base_s, opts.backoff_max_s) == (0.5, 8.0)
    for raw, key in [
        ({"max_attempts": "three"}, "max_attempts"),
        ({"max_attempts": "0"}, "max_attempts"),
        ({"max_failed_attempts": "2.5"}, "max_failed_attempts"),
        ({"max_retry_after_s": "-1"}, "max_retry_after_s"),
    ]:
        with pytest.raises(InvalidArgument) as exc:
            http_options(raw)
        assert exc.value.reason == "TARGET_OPTION_INVALID"
        assert exc.value.field == f"profile.target.options.{key}"


def test_default_options_retry() -> None:
    opts = HttpOptions()
    assert opts.max_attempts > 1 and opts.max_failed_attempts > opts.max_attempts
    assert 0 < opts.backoff_base_s <= opts.backoff_max_s <= opts.max_retry_after_s


def test_retry_after_parsing() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    parse = _http_client.retry_after_s
    assert parse("7", now) == 7.0
    assert parse(" 0 ", now) == 0.0
    assert parse("Wed, 01 Jan 2025 12:00:30 GMT", now) == 30.0
    assert parse("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0  # already past
    for bad in (None, "", "-5", "1.5", "soon"):
        assert parse(bad, now) is None


def test_tally() -> None:
    kinds = ["timeout", "429", "429", "503", "429", "timeout"]
    assert _http_client.tally(kinds) == "429 x 3, timeout x 2, 503 x 1"
    assert _http_client.tally([]) == "none"
