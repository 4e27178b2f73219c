"""The columnar ingest path gives exactly what the per-sample path gives: protobuf to a
SampleBatch (core.convert.sample_batch_from_pb vs sample_from_pb per sample), the column
checks (check_sample_batch vs check_samples: the same normalized samples, the same first
error), the column values written (batch_columns vs sample_values), SQLite's fast DATETIME
text, and a SampleBatch appended through the Store as a list of the same samples is."""

from __future__ import annotations

import json
import math
import random
from array import array
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from sqlalchemy.dialects import sqlite
from sqlalchemy.types import TypeDecorator

from idealrt.common.v1 import common_pb2 as cpb
from idealrt.core import convert as cv
from idealrt.core.domain import (
    ContentionColumns,
    ContentionObservation,
    Profile,
    ProfileState,
    Sample,
    SampleBatch,
    SampleFlag,
    SampleTiming,
)
from idealrt.core.errors import IdealrtError, InvalidArgument
from idealrt.services.store import _rows, _validate, schema
from idealrt.services.store.repository import Store

MakeProfile = Callable[..., Profile]
MakeSample = Callable[..., Sample]


def _random_sample(rng: random.Random, i: int) -> Sample:
    steps = tuple(rng.randrange(0, 2**40) for _ in range(rng.randrange(0, 9)))
    when = None
    if rng.random() < 0.8:
        when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(
            seconds=rng.randrange(-(10**9), 10**9), microseconds=rng.choice([0, 1, 999_999])
        )
    contention = ContentionObservation(
        foreign_cpu_s=rng.choice([0.0, -0.0, 1e-9, 0.5, 1e300]),
        gpu_foreign_processes=rng.choice([0, 0, 3]),
        sm_clock_mhz=rng.choice([0.0, 1410.0]),
        temperature_c=rng.choice([0.0, 61.5]),
        throttle_reasons=rng.choice([0, 4]),
        energy_j=rng.choice([0.0, 12.25]),
        energy_source=rng.choice(["", "rapl", "nvml", 'q"\\é\n']),
    )
    return Sample(
        prompt_tokens=rng.randrange(0, 2**31),
        output_tokens=rng.randrange(0, 5000),
        prefill_ns=rng.randrange(0, 2**63),
        decode_ns=steps,
        total_ns=rng.randrange(0, 2**63),
        batch_size=rng.randrange(1, 64),
        start_time=when,
        rpc_ns=rng.randrange(0, 2**40),
        heldout=rng.random() < 0.2,
        repeat=rng.randrange(-3, 10),
        flag=rng.choice(list(SampleFlag)),
        contention=contention,
        timing=rng.choice(list(SampleTiming)),
        chunks=rng.choice([0, 0, 1, 2**31 - 1]),
    )


def _samples(n: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    return [_random_sample(rng, i) for i in range(n)]


# ---- protobuf to columns ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_batch_from_pb_is_sample_from_pb_per_sample(seed: int) -> None:
    msgs = [cv.sample_to_pb(s) for s in _samples(40, seed)]
    msgs[3].batch_size = 0  # "or 1", as sample_from_pb
    msgs[4].ClearField("start_time")
    batch = cv.sample_batch_from_pb(msgs)
    one_by_one = [cv.sample_from_pb(m, f"samples[{i}]") for i, m in enumerate(msgs)]
    assert batch.samples() == [Sample(**{**vars(s), "seq": -1}) for s in one_by_one]
    assert all(type(steps) is array for steps in batch.decode_ns)
    assert cv.sample_batch_from_pb([]).samples() == []


def test_timing_from_pb_one_value_mixed_and_unspecified() -> None:
    """One timing for a whole batch (the rule), several, and UNSPECIFIED (a writer from
    before the field): read as SERVER_STEPS, by column as sample by sample."""
    msgs = [cv.sample_to_pb(s) for s in _samples(6)]
    for m in msgs:
        m.timing = cpb.SAMPLE_TIMING_STREAM_CHUNKS
    assert set(cv.sample_batch_from_pb(msgs).timing) == {SampleTiming.STREAM_CHUNKS}
    msgs[1].ClearField("timing")
    msgs[2].timing = cpb.SAMPLE_TIMING_TOTALS_ONLY
    batch = cv.sample_batch_from_pb(msgs)
    assert list(batch.timing) == [
        SampleTiming.STREAM_CHUNKS,
        SampleTiming.SERVER_STEPS,
        SampleTiming.TOTALS_ONLY,
        *[SampleTiming.STREAM_CHUNKS] * 3,
    ]
    assert [cv.sample_from_pb(m).timing for m in msgs] == list(batch.timing)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({1: "flag"}, "samples[1].flag"),
        ({2: "time", 5: "flag"}, "samples[2].start_time"),
        ({4: "both"}, "samples[4].start_time"),  # a sample's time is converted before its flag
        ({0: "unknown-flag"}, "samples[0].flag"),
        ({3: "unknown-timing"}, "samples[3].timing"),
    ],
)
def test_batch_from_pb_raises_the_first_samples_error(bad: dict[int, str], field: str) -> None:
    msgs = [cv.sample_to_pb(s) for s in _samples(8)]
    for i, what in bad.items():
        if what in ("flag", "both"):
            msgs[i].flag = cpb.SAMPLE_FLAG_UNSPECIFIED
        if what in ("time", "both"):
            msgs[i].start_time.seconds = 2**62
        if what == "unknown-flag":
            msgs[i].flag = 99  # type: ignore[assignment]
        if what == "unknown-timing":
            msgs[i].timing = 99  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as batch:
        cv.sample_batch_from_pb(msgs)
    with pytest.raises(InvalidArgument) as single:
        for i, m in enumerate(msgs):
            cv.sample_from_pb(m, f"samples[{i}]")
    assert batch.value.field == single.value.field == field
    assert (batch.value.reason, batch.value.message) == (single.value.reason, single.value.message)


# ---- column checks -----------------------------------------------------------------------


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except IdealrtError as exc:
        return (type(exc), exc.reason, exc.field, exc.message)


def _checked_both_ways(samples: list[Any]) -> tuple[Any, Any]:
    """check_sample_batch of the batch of `samples` and check_samples of them (each as its
    samples with seq -1, or its error)."""
    by_column = _outcome(
        lambda: _validate.check_sample_batch(SampleBatch.from_samples(samples)).samples()
    )
    one_by_one = _outcome(
        lambda: [Sample(**{**vars(s), "seq": -1}) for s in _validate.check_samples(samples)]
    )
    return by_column, one_by_one


WEIRD: list[tuple[str, Callable[[Sample], Sample]]] = [
    ("numpy int", lambda s: Sample(**{**vars(s), "prompt_tokens": np.int64(5)})),
    ("bool as int", lambda s: Sample(**{**vars(s), "repeat": True})),
    ("int too large", lambda s: Sample(**{**vars(s), "prompt_tokens": 2**31})),
    ("negative", lambda s: Sample(**{**vars(s), "prefill_ns": -1})),
    ("batch size 0", lambda s: Sample(**{**vars(s), "batch_size": 0})),
    ("float as int", lambda s: Sample(**{**vars(s), "rpc_ns": 1.0})),
    ("flag as text", lambda s: Sample(**{**vars(s), "flag": "warmup"})),
    ("bad flag", lambda s: Sample(**{**vars(s), "flag": "nope"})),
    ("heldout int", lambda s: Sample(**{**vars(s), "heldout": 1})),
    ("timing as text", lambda s: Sample(**{**vars(s), "timing": "stream_chunks"})),
    ("bad timing", lambda s: Sample(**{**vars(s), "timing": "guessed"})),
    ("negative chunks", lambda s: Sample(**{**vars(s), "chunks": -1})),
    ("chunks too large", lambda s: Sample(**{**vars(s), "chunks": 2**31})),
    ("naive time", lambda s: Sample(**{**vars(s), "start_time": datetime(2026, 1, 1)})),
    (
        "other zone",
        lambda s: Sample(
            **{**vars(s), "start_time": datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=3)))}
        ),
    ),
    ("steps as list", lambda s: Sample(**{**vars(s), "decode_ns": [1, 2, 3]})),  # type: ignore[arg-type]
    ("steps with bool", lambda s: Sample(**{**vars(s), "decode_ns": (1, True)})),
    ("negative step", lambda s: Sample(**{**vars(s), "decode_ns": (1, -2)})),
    ("step too large", lambda s: Sample(**{**vars(s), "decode_ns": (2**63,)})),
    ("steps as text", lambda s: Sample(**{**vars(s), "decode_ns": "12"})),  # type: ignore[arg-type]
    ("steps as a set", lambda s: Sample(**{**vars(s), "decode_ns": {1, 2}})),  # type: ignore[arg-type]
    (
        "nan",
        lambda s: Sample(
            **{**vars(s), "contention": ContentionObservation(temperature_c=math.nan)}
        ),
    ),
    (
        "int as float",
        lambda s: Sample(**{**vars(s), "contention": ContentionObservation(energy_j=3)}),  # type: ignore[arg-type]
    ),
    (
        "huge floats",
        lambda s: Sample(
            **{**vars(s), "contention": ContentionObservation(foreign_cpu_s=1e308, energy_j=1e308)}
        ),
    ),
    ("not a sample", lambda s: 7),  # type: ignore[arg-type,return-value]
]


@pytest.mark.parametrize("case", [name for name, _ in WEIRD])
@pytest.mark.parametrize("where", [0, 3, 9])
def test_column_checks_agree_with_the_per_sample_checks(case: str, where: int) -> None:
    change = dict(WEIRD)[case]
    samples: list[Any] = _samples(10)
    samples[where] = change(samples[where])
    if case == "not a sample":  # no batch holds one: a list given to the Store is refused
        given = _outcome(lambda: _validate.check_sample_batch(samples))
        assert given == _outcome(lambda: _validate.check_samples(samples))
        assert given[2] == f"samples[{where}]"
        return
    by_column, one_by_one = _checked_both_ways(samples)
    assert by_column == one_by_one


def test_column_checks_accept_valid_batches_as_they_are() -> None:
    samples = _samples(50, seed=7)
    batch = _validate.check_sample_batch(SampleBatch.from_samples(samples))
    assert batch.samples() == [Sample(**{**vars(s), "seq": -1}) for s in samples]
    assert all(type(c) is tuple for c in (batch.prompt_tokens, batch.start_time))
    assert all(type(steps) is array and steps.typecode == "q" for steps in batch.decode_ns)


def test_numpy_columns_are_normalized_like_their_elements() -> None:
    samples = _samples(6)
    batch = SampleBatch.from_samples(samples)
    as_numpy = SampleBatch(
        **{
            **{k: getattr(batch, k) for k in vars(batch) if k != "contention"},
            "prompt_tokens": np.array(batch.prompt_tokens, dtype=np.int64),
            "rpc_ns": np.array(batch.rpc_ns, dtype=np.uint64),
        },
        contention=ContentionColumns(
            **{
                **vars(batch.contention),
                "energy_j": np.array(batch.contention.energy_j, dtype=np.float64),
            }
        ),
    )
    assert (
        _validate.check_sample_batch(as_numpy).samples()
        == _validate.check_sample_batch(batch).samples()
    )


@pytest.mark.parametrize(
    ("column", "value"),
    [("output_tokens", (1, 2)), ("start_time", "abc"), ("contention.energy_source", None)],
)
def test_a_batch_of_ragged_or_missing_columns_is_refused(column: str, value: object) -> None:
    batch = SampleBatch.from_samples(_samples(3))
    if column.startswith("contention."):
        name = column.removeprefix("contention.")
        broken = SampleBatch(
            **{k: getattr(batch, k) for k in vars(batch) if k != "contention"},
            contention=ContentionColumns(**{**vars(batch.contention), name: value}),
        )
    else:
        broken = SampleBatch(**{**vars(batch), column: value})
    with pytest.raises(InvalidArgument) as info:
        _validate.check_sample_batch(broken)
    assert (info.value.reason, info.value.field) == ("VALUE_INVALID", f"samples.{column}")


# ---- the column values written -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_batch_columns_are_the_samples_values(seed: int) -> None:
    samples = _validate.check_samples(_samples(60, seed))
    columns = _rows.batch_columns(_validate.check_sample_batch(samples))
    assert [tuple(c) for c in columns] == list(zip(*map(_rows.sample_values, samples), strict=True))


def test_sqlite_times_are_written_as_sqlalchemy_writes_them() -> None:
    """The fast DATETIME text is the general path's (process_bind_param, then SQLite's
    DATETIME processor) for UTC datetimes; anything else takes the general path."""
    dialect = sqlite.dialect()
    impl = schema.samples.c.start_time.type.dialect_impl(dialect)
    fast = impl.bind_processor(dialect)
    general = TypeDecorator.bind_processor(impl, dialect)
    assert fast is not None and general is not None
    rng = random.Random(3)
    values: list[datetime | None] = [
        None,
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5))),
    ]
    values += [
        datetime(1, 1, 1, tzinfo=UTC)
        + timedelta(seconds=rng.randrange(0, 315_000_000_000), microseconds=rng.choice([0, 7]))
        for _ in range(2000)
    ]
    assert [fast(v) for v in values] == [general(v) for v in values]


# ---- through the Store -----------------------------------------------------------------------


def test_a_batch_is_stored_as_the_list_of_its_samples_is(
    store: Store, make_profile: MakeProfile
) -> None:
    samples = _samples(30, seed=11)
    a, _ = store.create_profile(make_profile(state=ProfileState.RUNNING))
    b, _ = store.create_profile(make_profile(state=ProfileState.RUNNING))
    msgs = [cv.sample_to_pb(s) for s in samples]
    assert store.append_batch(a.id, "b1", samples).appended == 30
    assert store.append_batch(b.id, "b1", cv.sample_batch_from_pb(msgs)).appended == 30
    assert store.all_samples(a.id) == store.all_samples(b.id)
    # a replay, either way round, is recognised; a changed batch is refused
    assert store.append_batch(a.id, "b1", cv.sample_batch_from_pb(msgs)).total_samples == 30
    assert store.append_batch(b.id, "b1", samples).total_samples == 30
    last = Sample(**{**vars(samples[-1]), "rpc_ns": 1})
    changed = SampleBatch.from_samples([*samples[:-1], last])
    with pytest.raises(IdealrtError) as info:
        store.append_batch(b.id, "b1", changed)
    assert info.value.reason == "BATCH_ID_REUSED"
    assert store.count_samples(b.id) == 30


def test_replays_compare_values_not_spellings() -> None:
    """A stored contention JSON that spells an equal observation otherwise (a default
    field written out, other key order) is the same sample; any other difference is not."""
    sample = _validate.check_samples(_samples(1, seed=4))[0]
    values = _rows.sample_values(sample)
    at = _rows.SAMPLE_COLUMNS.index("contention")
    c = sample.contention
    spelled = dict(reversed(list(vars(c).items())))  # every field, defaults too, reversed
    other = (*values[:at], json.dumps(spelled), *values[at + 1 :])
    assert other != values and _rows.same_sample_values(other, values)
    changed = (*values[:at], json.dumps({**spelled, "energy_j": c.energy_j + 1}), *values[at + 1 :])
    assert not _rows.same_sample_values(changed, values)
    assert not _rows.same_sample_values((*values[:-1], None), values)
