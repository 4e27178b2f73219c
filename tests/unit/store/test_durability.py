"""Nothing committed is lost when the writer dies: a subprocess appends batches and reports
each one as soon as `append_samples` returns; we SIGKILL it right after a report (it keeps
writing, so the kill usually lands inside a transaction) and reopen.

A SIGKILL tests a process crash. Power loss / an OS crash is covered by configuration
(SQLite WAL + synchronous=FULL, checked in test_url; PostgreSQL's fsync defaults), which a
test cannot pull the plug on.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import sqlalchemy as sa

from idealrt.services.store.repository import open_store
from idealrt.services.store.url import create_store_engine, parse_store_url

BATCH = 10
KILL_AFTER = 25

CHILD = f"""
import sys
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, Sample, StackSpec
from idealrt.services.store.repository import open_store

store = open_store(sys.argv[1])
p, _ = store.create_profile(Profile(
    id="", model=ModelRef(name="m"), stack=StackSpec(), plan=ProfilePlan((1,), (2,)),
    request_id="crash-test"))
print("profile", p.id, flush=True)
i = 0
while True:
    batch = [Sample(prompt_tokens=i, output_tokens=51, prefill_ns=j, decode_ns=(7,) * 50,
                    total_ns=350 + j) for j in range({BATCH})]
    assert store.append_samples(p.id, f"b{{i}}", batch) == {BATCH}
    print("committed", i, flush=True)
    i += 1
"""


def test_commits_survive_sigkill(durable_store_url: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, durable_store_url],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        kind, profile_id = proc.stdout.readline().split()
        assert kind == "profile"
        reported = -1
        for line in proc.stdout:
            reported = int(line.split()[1])
            if reported == KILL_AFTER:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert reported == KILL_AFTER

    with open_store(durable_store_url) as st:
        samples = st.all_samples(profile_id)
        assert st.get_profile(profile_id).request_id == "crash-test"
    # every reported batch is there; a batch cut by the kill is all there or not at all
    assert len(samples) % BATCH == 0
    assert len(samples) >= (KILL_AFTER + 1) * BATCH
    assert [s.seq for s in samples] == list(range(len(samples)))
    for b in range(len(samples) // BATCH):
        chunk = samples[b * BATCH : (b + 1) * BATCH]
        assert {s.prompt_tokens for s in chunk} == {b}
        assert [s.prefill_ns for s in chunk] == list(range(BATCH))
        assert all(s.decode_ns == (7,) * 50 for s in chunk)

    if durable_store_url.startswith("sqlite"):
        engine = create_store_engine(parse_store_url(durable_store_url))
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("PRAGMA integrity_check")).scalar() == "ok"
        finally:
            engine.dispose()
