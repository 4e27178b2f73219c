"""Sample.timing and Sample.chunks in the store (SQLite and PostgreSQL): every timing round
trips, by list and by batch; a replay that differs only in timing is another batch; and
migration 3 gives the rows stored before it the timing their own times prove."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from idealrt.common.v1 import common_pb2 as cpb
from idealrt.core import convert as cv
from idealrt.core.domain import Profile, Sample, SampleBatch, SampleTiming
from idealrt.core.errors import AlreadyExists
from idealrt.services.store import _rows, schema
from idealrt.services.store.repository import Store, open_store
from idealrt.services.store.url import create_store_engine, parse_store_url

MakeProfile = Callable[..., Profile]
MakeSample = Callable[..., Sample]


def _each_timing(make_sample: MakeSample) -> list[Sample]:
    return [
        make_sample(i, timing=t, chunks=(0 if t is SampleTiming.TOTALS_ONLY else 3 + i))
        for i, t in enumerate(SampleTiming)
    ]


def test_every_timing_round_trips(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample
) -> None:
    p, _ = store.create_profile(make_profile())
    samples = _each_timing(make_sample)
    assert store.append_samples(p.id, "list", samples) == len(samples)
    batch = cv.sample_batch_from_pb([cv.sample_to_pb(s) for s in samples])  # the ingest path
    assert store.append_samples(p.id, "batch", batch) == len(samples)
    got = store.all_samples(p.id)
    n = len(samples)
    assert got == [dataclasses.replace(s, seq=i) for i, s in enumerate(samples + samples)]
    assert [s.timing for s in got[:n]] == list(SampleTiming)
    assert type(got[0].timing) is SampleTiming and got[1].chunks == 4


def test_a_replay_with_other_timing_is_refused(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample
) -> None:
    p, _ = store.create_profile(make_profile())
    batch = [make_sample(i) for i in range(3)]
    store.append_samples(p.id, "b", batch)
    for change in ({"timing": SampleTiming.STREAM_CHUNKS}, {"chunks": 7}):
        with pytest.raises(AlreadyExists):
            store.append_samples(p.id, "b", [dataclasses.replace(batch[0], **change), *batch[1:]])
    assert store.append_samples(p.id, "b", SampleBatch.from_samples(batch)) == 3  # the replay


def test_unspecified_timing_on_the_wire_is_server_steps() -> None:
    m = cv.sample_to_pb(Sample(4, 2, 5, (6,), 11))
    assert m.timing == cpb.SAMPLE_TIMING_SERVER_STEPS
    m.ClearField("timing")
    assert cv.sample_from_pb(m).timing is SampleTiming.SERVER_STEPS


# ---- migration 3 -------------------------------------------------------------------------


def _v2_row(s: Sample, **keys: Any) -> dict[str, Any]:
    row = _rows.sample_row(s, **keys)
    del row["timing"], row["chunks"]  # not in the v2 table
    return row


def test_a_version_2_database_gets_the_timing_its_rows_prove(
    durable_store_url: str,
    make_profile: MakeProfile,
    make_sample: MakeSample,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = [
        make_sample(0),  # timed step by step (the serving target)
        make_sample(1, prefill_ns=0, decode_ns=()),  # not streamed: the total only
        make_sample(2, decode_ns=()),  # several tokens a chunk: its "prefill" unproven
        make_sample(3, output_tokens=1, decode_ns=()),  # one token: no steps to time
    ]
    with monkeypatch.context() as m:
        m.setattr(schema, "SCHEMA_VERSION", 2)
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        engine = create_store_engine(parse_store_url(durable_store_url))
        try:
            schema.migrate(engine)
            now = datetime(2026, 1, 2, tzinfo=UTC)
            profile = make_profile(id="prof_v2", create_time=now)
            with engine.begin() as conn:
                assert "timing" not in {c["name"] for c in sa.inspect(conn).get_columns("samples")}
                conn.execute(
                    schema.profiles.insert().values(_rows.profile_row(profile, update_time=now))
                )
                conn.execute(
                    schema.sample_batches.insert().values(
                        profile_id="prof_v2", batch_id="b0", first_seq=0, count=4, create_time=now
                    )
                )
                conn.execute(
                    schema.samples.insert(),
                    [
                        _v2_row(s, profile_id="prof_v2", batch_id="b0", seq=i)
                        for i, s in enumerate(old)
                    ],
                )
        finally:
            engine.dispose()

    with open_store(durable_store_url) as st:
        got = st.all_samples("prof_v2")
        assert [s.timing for s in got] == [
            SampleTiming.SERVER_STEPS,
            SampleTiming.TOTALS_ONLY,
            SampleTiming.TOTALS_ONLY,
            SampleTiming.SERVER_STEPS,
        ]
        assert {s.chunks for s in got} == {0}
        # otherwise as stored; the unproven prefill is kept, but never read as measured
        assert [dataclasses.replace(s, timing=SampleTiming.SERVER_STEPS) for s in got] == [
            dataclasses.replace(s, seq=i) for i, s in enumerate(old)
        ]
        assert got[2].prefill_ns > 0 and got[2].measured_prefill_ns == 0
        # a working store: a replay of the old batch (with the timing it now has) is one
        assert (
            st.append_samples("prof_v2", "b0", [dataclasses.replace(s, seq=-1) for s in got]) == 4
        )
        assert st.append_samples("prof_v2", "b1", [make_sample(9)]) == 1
        with st._engine.connect() as conn:
            assert schema.current_version(conn) == schema.SCHEMA_VERSION == 3
            cols = {c["name"]: c for c in sa.inspect(conn).get_columns("samples")}
            assert not cols["timing"]["nullable"] and "server_steps" in str(
                cols["timing"]["default"]
            )
            assert not cols["chunks"]["nullable"]
