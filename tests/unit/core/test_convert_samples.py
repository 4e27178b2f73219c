"""Sample.timing and Sample.chunks through protobuf: every value round trips, one sample
at a time and by batch; UNSPECIFIED (a writer from before the field) reads as
SERVER_STEPS; an unknown value is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from idealrt.common.v1 import common_pb2 as cpb
from idealrt.core import convert as cv
from idealrt.core.domain import Sample, SampleTiming
from idealrt.core.errors import InvalidArgument

BASE = Sample(prompt_tokens=8, output_tokens=3, prefill_ns=10, decode_ns=(4, 5), total_ns=19)


@pytest.mark.parametrize("timing", list(SampleTiming))
def test_timing_and_chunks_round_trip(timing: SampleTiming) -> None:
    s = dataclasses.replace(BASE, timing=timing, chunks=2)
    m = cv.sample_to_pb(s)
    assert cpb.SampleTiming.Name(m.timing) == f"SAMPLE_TIMING_{timing.name}" and m.chunks == 2
    assert cv.sample_from_pb(m) == s
    wire = cpb.Sample.FromString(m.SerializeToString())
    assert cv.sample_batch_from_pb([wire, wire]).samples() == [s, s]


def test_every_domain_timing_has_a_proto_value() -> None:
    names = {n for n in cpb.SampleTiming.keys() if n != "SAMPLE_TIMING_UNSPECIFIED"}  # noqa: SIM118
    assert names == {f"SAMPLE_TIMING_{t.name}" for t in SampleTiming}


def test_unspecified_reads_as_server_steps() -> None:
    m = cv.sample_to_pb(BASE)
    m.ClearField("timing")
    assert cv.sample_from_pb(m).timing is SampleTiming.SERVER_STEPS
    assert list(cv.sample_batch_from_pb([m]).timing) == [SampleTiming.SERVER_STEPS]


def test_an_unknown_timing_is_invalid_argument() -> None:
    m = cv.sample_to_pb(BASE)
    m.timing = 42  # type: ignore[assignment]
    for convert in (
        lambda: cv.sample_from_pb(m, "samples[0]"),
        lambda: cv.sample_batch_from_pb([m]),
    ):
        with pytest.raises(InvalidArgument) as info:
            convert()
        assert (info.value.reason, info.value.field) == ("ENUM_INVALID", "samples[0].timing")
