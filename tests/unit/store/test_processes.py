"""Several processes on one store (SQLite file, PostgreSQL): each has its own engine, so
only the database's own locking keeps sequence numbers contiguous and migrations single."""

from __future__ import annotations

import subprocess
import sys
import time

import sqlalchemy as sa

from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec
from idealrt.services.store import schema
from idealrt.services.store.repository import open_store
from idealrt.services.store.url import create_store_engine, parse_store_url

WORKERS = 3
BATCHES = 25

WRITER = f"""
import sys, time
from idealrt.core.domain import Sample
from idealrt.services.store.repository import open_store

url, profile_id, worker, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with open_store(url) as store:
    time.sleep(max(0.0, start - time.time()))  # all workers write at once
    for b in range({BATCHES}):
        for owner in (worker, (worker + 1) % {WORKERS}):  # own batch, then a neighbour's replay
            batch = [Sample(prompt_tokens=owner * 100 + b, output_tokens=2, prefill_ns=i,
                            decode_ns=(5,), total_ns=5 + i) for i in range(4)]
            assert store.append_samples(profile_id, f"w{{owner}}-b{{b}}", batch) == 4
"""

OPENER = """
import sys
from idealrt.services.store.repository import open_store
open_store(sys.argv[1]).close()
"""


def _run_all(*argvs: list[str]) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", *argv]) for argv in argvs]
    for proc in procs:
        assert proc.wait(timeout=120) == 0


def test_appends_from_several_processes(durable_store_url: str) -> None:
    with open_store(durable_store_url) as st:
        p, _ = st.create_profile(
            Profile(id="", model=ModelRef(), stack=StackSpec(), plan=ProfilePlan((1,), (2,)))
        )
    start = str(time.time() + 3.0)  # after every worker has imported and opened
    _run_all(*([WRITER, durable_store_url, p.id, str(w), start] for w in range(WORKERS)))
    with open_store(durable_store_url) as st:
        got = st.all_samples(p.id)
    assert [s.seq for s in got] == list(range(WORKERS * BATCHES * 4))
    runs = [got[i : i + 4] for i in range(0, len(got), 4)]
    assert all(len({s.prompt_tokens for s in run}) == 1 for run in runs)  # batches contiguous
    assert len({run[0].prompt_tokens for run in runs}) == WORKERS * BATCHES  # each once


def test_concurrent_first_opens_from_processes(durable_store_url: str) -> None:
    _run_all(*([OPENER, durable_store_url] for _ in range(4)))
    engine = create_store_engine(parse_store_url(durable_store_url))
    try:
        with engine.connect() as conn:
            got = conn.execute(sa.select(schema.schema_version.c.version)).scalars().all()
    finally:
        engine.dispose()
    assert sorted(got) == list(range(1, schema.SCHEMA_VERSION + 1))
