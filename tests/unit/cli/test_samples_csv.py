"""CSV import of other tools' measurements: each row says (or implies) how its times were
obtained, and nothing a row cannot prove is taken as measured."""

from __future__ import annotations

import pytest

from idealrt.clients.samples_csv import read_samples_csv
from idealrt.core.domain import SampleTiming
from idealrt.core.errors import InvalidArgument


def test_timing_is_implied_by_what_a_row_holds() -> None:
    rows = read_samples_csv(
        "prompt_tokens,output_tokens,prefill_ns,decode_ns,total_ns\n"
        "8,3,100,20;30,150\n"  # every step: measured in-process by the tool
        "8,1,100,,\n"  # one token: nothing to step
        "8,4,100,,400\n"  # a total and a time to first token, no steps
    )
    assert [r.timing for r in rows] == [
        SampleTiming.SERVER_STEPS,
        SampleTiming.SERVER_STEPS,
        SampleTiming.STREAM_CHUNKS,
    ]
    assert rows[2].measured_decode_ns == () and rows[2].measured_prefill_ns == 100


def test_an_explicit_timing_is_checked_against_the_row() -> None:
    rows = read_samples_csv(
        "prompt_tokens,output_tokens,prefill_ns,total_ns,timing\n8,4,0,400,totals_only\n"
    )
    assert rows[0].timing is SampleTiming.TOTALS_ONLY and rows[0].measured_prefill_ns == 0
    with pytest.raises(InvalidArgument, match="timing server_steps has per-step times"):
        read_samples_csv(
            "prompt_tokens,output_tokens,prefill_ns,total_ns,timing\n8,4,100,400,server_steps\n"
        )
    with pytest.raises(InvalidArgument, match="column timing must be one of"):
        read_samples_csv("prompt_tokens,output_tokens,prefill_ns,total_ns,timing\n8,4,1,9,guess\n")
    with pytest.raises(InvalidArgument, match="prefill_ns must be >= 1 for timing server_steps"):
        read_samples_csv("prompt_tokens,output_tokens,prefill_ns,decode_ns\n8,2,0,5\n")
