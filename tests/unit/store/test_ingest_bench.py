"""bench/_svc_ingest.py end to end, briefly: a real store server process, writers in another
process resending some batches, and the exact check of what was stored. Asserts what the
bench must find (nothing lost, duplicated, altered or misplaced; retries answered as
replays), never its rate: the numbers are the bench's to report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _svc_ingest  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_concurrent_ingest_loses_and_duplicates_nothing(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path}/idealrt.db"
        if backend == "sqlite"
        else str(request.getfixturevalue("pg_database_url"))
    )
    got = _svc_ingest.run_ingest(backend, url, writers=4, seconds=1.5, batch_size=20, steps=8)
    assert got["errors"] == {}, got["error_examples"]
    assert got["batches"] >= _svc_ingest.RETRY_EVERY * 4  # enough to include retries
    assert got["retried_batches"] >= 1
    assert got["samples"] == got["batches"] * 20
    for key in ("lost", "duplicated", "unexpected", "altered", "partial_batches", "seq_errors"):
        assert got[key] == 0, (key, got)
