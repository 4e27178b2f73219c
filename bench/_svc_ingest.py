"""Store ingest over gRPC: `writers` concurrent writers appending sample batches to a real
store server, then an exact check that nothing was lost or duplicated (bench_service).

Three processes, as in production: the store server (`python -m idealrt.services.store`,
configured only by its environment: IDEALRT_STORE_URL, IDEALRT_STORE_ADDRESS=127.0.0.1:0,
and whatever `env` adds, e.g. IDEALRT_SERVER_MODEL=sync|aio), the load generator (this
file run with `--load`: one thread and one channel per writer), and the coordinator that
starts both, verifies and reports. On a 2-core machine the server and the writers share
the cores; the report gives each process's CPU seconds so a number can be read for what
it is.

Each writer creates its own profile (CreateProfile in state RUNNING, then UpdateProfile
RUNNING to claim it, as a profiler does) and appends batches of `batch_size` samples,
each with `steps` per-step decode times, until `seconds` have passed. Every sample is
unique and recognisable: its prefill_ns encodes (writer, batch, index) and its decode
steps are derived from that, so the check finds a lost, duplicated, misplaced or altered
sample by content, not only by count. Every RETRY_EVERY-th batch is sent a second time
with the same batch_id, as a client whose first response was lost would: the store must
answer the same count and write nothing. A failed append is retried with the same
batch_id (an unknown outcome is resolved by idempotency); the error codes are counted.

After the load, the coordinator lists every profile's samples over gRPC and checks: seqs
0..n-1 exactly, each acknowledged sample present once, nothing else present.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["run_ingest"]

RETRY_EVERY = 20  # one batch in 20 is re-sent with its batch_id (a client retry)
STEP_POOL = 97  # distinct decode-step vectors per writer (sample i uses pool[uid % 97])
_BATCH_BITS = 24
_INDEX_BITS = 16
_PORT_LINE = re.compile(r"store listening on port (\d+)")
_START_TIMEOUT_S = 60.0
_CALL_TIMEOUT_S = 60.0
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")


# ---------------------------------------------------------------- the samples


def _uid(writer: int, batch: int, index: int) -> int:
    return (((writer << _BATCH_BITS) | batch) << _INDEX_BITS) | index


def _split(uid: int) -> tuple[int, int, int]:
    index = uid & ((1 << _INDEX_BITS) - 1)
    batch = (uid >> _INDEX_BITS) & ((1 << _BATCH_BITS) - 1)
    return uid >> (_INDEX_BITS + _BATCH_BITS), batch, index


def _step_pool(writer: int, steps: int) -> list[list[int]]:
    return [
        [1_000_000 + ((writer * 7919 + k * 104_729 + j * 31) % 500_000) for j in range(steps)]
        for k in range(STEP_POOL)
    ]


# ---------------------------------------------------------------- the server


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _store_server(store_url: str, env: Mapping[str, str] | None, workdir: Path) -> Iterator[Any]:
    """A store server subprocess; yields (process, port). Stopped with SIGTERM."""
    penv = {**os.environ, **(env or {})}
    penv.update(IDEALRT_STORE_URL=store_url, IDEALRT_STORE_ADDRESS="127.0.0.1:0")
    penv.setdefault("IDEALRT_DATA_DIR", str(workdir / "data"))
    out_path, err_path = workdir / "store.out", workdir / "store.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "idealrt.services.store"], stdout=out, stderr=err, env=penv
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not (m := _PORT_LINE.search(out_path.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = err_path.read_text()[-3000:]
                raise RuntimeError(f"the store server did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        yield proc, int(m.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the load generator


def _make_profile(writer: int) -> Any:
    from idealrt.core.domain import (
        Backend,
        ModelRef,
        Profile,
        ProfilePlan,
        ProfileState,
        StackSpec,
    )

    return Profile(
        id="",
        request_id=f"ingest-{os.getpid()}-{time.time_ns()}-{writer}",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
        plan=ProfilePlan(prompt_tokens=(16, 64), output_tokens=(8, 65)),
        state=ProfileState.RUNNING,
    )


def _writer(
    target: str, writer: int, cfg: dict[str, Any], start: threading.Barrier, out: dict[str, Any]
) -> None:
    """One writer: its profile, then batches until the deadline. Fills `out`."""
    from google.protobuf import timestamp_pb2

    from idealrt.clients.store import StoreClient
    from idealrt.common.v1 import common_pb2 as cpb
    from idealrt.core.errors import IdealrtError
    from idealrt.core.grpc_client import call, open_channel
    from idealrt.store.v1 import store_service_pb2 as pb
    from idealrt.store.v1 import store_service_pb2_grpc as pbg

    batch_size, steps = cfg["batch_size"], cfg["steps"]
    channel = open_channel(target)
    client = StoreClient(channel, timeout=_CALL_TIMEOUT_S)
    stub = pbg.StoreServiceStub(channel)
    errors: Counter[str] = Counter()
    acked: list[int] = []  # batch numbers acknowledged
    uncertain: list[int] = []  # sent, never acknowledged (the outcome is unknown)
    examples: dict[str, str] = {}  # the first message of each error code
    retried = 0
    try:
        try:
            prof, _ = client.create_profile(_make_profile(writer))
            client.update_profile(prof)  # RUNNING again: claims the profile for this writer
            # one template message per position in a batch (its decode steps from the pool);
            # a batch is the templates copied, each made unique by its prefill_ns and total_ns:
            # protobuf does the copying in C, so the writers leave the cores to the server
            pool = _step_pool(writer, steps)
            stamp = timestamp_pb2.Timestamp()
            stamp.GetCurrentTime()
            contention = cpb.ContentionObservation(foreign_cpu_seconds=0.001, energy_source="rapl")
            templates = [
                cpb.Sample(
                    prompt_tokens=16 + (i & 63),
                    output_tokens=steps + 1,
                    batch_size=1,
                    rpc_ns=1_000,
                    start_time=stamp,
                    repeat=i % 3,
                    flag=cpb.SAMPLE_FLAG_OK,
                    contention=contention,
                )
                for i in range(batch_size)
            ]
            out["profile_id"] = prof.id
        except BaseException:
            start.abort()  # the others stop waiting for this writer
            raise
        start.wait()
        deadline = time.perf_counter() + cfg["seconds"]
        batch = 0
        while time.perf_counter() < deadline:
            base = _uid(writer, batch, 0)
            req = pb.AppendSamplesRequest(profile_id=prof.id, batch_id=f"w{writer}-b{batch}")
            req.samples.extend(templates)
            for i, m in enumerate(req.samples):
                uid = base + i
                m.prefill_ns = uid
                m.total_ns = uid + steps
                m.decode_ns.extend(pool[uid % STEP_POOL])
            sends = 2 if batch % RETRY_EVERY == RETRY_EVERY - 1 else 1
            expected_total = (len(acked) + 1) * batch_size
            for attempt in range(sends):
                for _ in range(5):  # a transient error: resend the same batch_id
                    try:
                        resp = call(stub.AppendSamples, req, _CALL_TIMEOUT_S)
                    except IdealrtError as exc:
                        errors[exc.code.name] += 1
                        examples.setdefault(exc.code.name, f"{exc.reason}: {exc}"[:300])
                        if exc.code.name in _TRANSIENT:
                            continue
                        uncertain.append(batch)  # not transient: this writer stops
                        return
                    if (resp.appended, resp.total_samples) != (batch_size, expected_total):
                        errors["WRONG_COUNT"] += 1
                    break
                else:  # failed 5 times
                    uncertain.append(batch)
                    return
                if attempt:
                    retried += 1
            acked.append(batch)
            batch += 1
    finally:
        out.update(acked=acked, uncertain=uncertain, retried=retried)
        out.update(errors=dict(errors), examples=examples)
        out["end"] = time.perf_counter()
        channel.close()


def _load(target: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The load generator's main: `cfg["writers"]` writer threads; returns their results."""
    import resource

    from idealrt.core.logging import configure_logging

    configure_logging("warning")
    n = cfg["writers"]
    start = threading.Barrier(n + 1)
    outs: list[dict[str, Any]] = [{} for _ in range(n)]
    threads = [
        threading.Thread(target=_writer, args=(target, w, cfg, start, outs[w]), daemon=True)
        for w in range(n)
    ]
    for t in threads:
        t.start()
    start.wait(timeout=_START_TIMEOUT_S)
    began = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for t in threads:
        t.join()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "writers": outs,
        "elapsed_s": max(o.get("end", began) for o in outs) - began,
        "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


# ---------------------------------------------------------------- the check


def _verify(
    target: str, writer: int, result: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, int]:
    """Lost / duplicated / unexpected samples and seq errors of one writer's profile."""
    from idealrt.clients.store import StoreClient

    batch_size = cfg["batch_size"]
    pool = _step_pool(writer, cfg["steps"])
    acked = set(result["acked"])
    uncertain = set(result["uncertain"])
    client = StoreClient(target, timeout=_CALL_TIMEOUT_S)
    try:
        stored = client.all_samples(result["profile_id"])
    finally:
        client.close()
    seen: Counter[int] = Counter()
    unexpected = altered = 0
    for s in stored:
        w, batch, index = _split(s.prefill_ns)
        if w != writer or index >= batch_size or batch not in acked | uncertain:
            unexpected += 1
            continue
        seen[s.prefill_ns] += 1
        if list(s.decode_ns) != pool[s.prefill_ns % STEP_POOL]:
            altered += 1
    # a batch whose outcome is unknown must be wholly there or wholly absent
    partial = sum(
        1
        for b in uncertain
        if 0 < sum(1 for i in range(batch_size) if seen[_uid(writer, b, i)]) < batch_size
    )
    expected = [_uid(writer, b, i) for b in acked for i in range(batch_size)]
    return {
        "lost": sum(1 for uid in expected if not seen[uid]),
        "duplicated": sum(c - 1 for c in seen.values() if c > 1),
        "unexpected": unexpected,
        "altered": altered,
        "partial_batches": partial,
        "seq_errors": sum(1 for i, s in enumerate(stored) if s.seq != i),
        "stored": len(stored),
    }


def run_ingest(
    backend: str,
    store_url: str,
    *,
    writers: int = 8,
    seconds: float,
    batch_size: int = 100,
    steps: int = 64,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the ingest load against a fresh store server on `store_url` (see the module
    docstring) and return the measured rate and the exact check's counts."""
    if not 1 <= batch_size < 1 << _INDEX_BITS:
        raise ValueError(f"batch_size must be in [1, {1 << _INDEX_BITS}), got {batch_size}")
    cfg = {"writers": writers, "seconds": seconds, "batch_size": batch_size, "steps": steps}
    with (
        tempfile.TemporaryDirectory(prefix="idealrt-ingest-") as tmp,
        _store_server(store_url, env, Path(tmp)) as (proc, port),
    ):
        target = f"127.0.0.1:{port}"
        server_cpu0 = _cpu_s(proc.pid)
        load = subprocess.run(
            [sys.executable, __file__, "--load", target, json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=seconds + 300,
            check=False,
            env={**os.environ, **(env or {})},
        )
        server_cpu = _cpu_s(proc.pid) - server_cpu0
        if load.returncode != 0:
            raise RuntimeError(f"the load generator failed:\n{load.stderr[-3000:]}")
        generated = json.loads(load.stdout.strip().splitlines()[-1])
        checks = [_verify(target, w, r, cfg) for w, r in enumerate(generated["writers"])]
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for r in generated["writers"]:
        errors.update(r["errors"])
        examples = {**r["examples"], **examples}
    samples = sum(len(r["acked"]) for r in generated["writers"]) * batch_size
    elapsed = generated["elapsed_s"]
    total = {k: sum(c[k] for c in checks) for k in checks[0]}
    return {
        "backend": backend,
        "store_url": _redact(store_url),
        "server_model": (env or {}).get("IDEALRT_SERVER_MODEL", "sync"),
        "writers": writers,
        "batch_size": batch_size,
        "steps": steps,
        "seconds": round(elapsed, 3),
        "samples": samples,
        "samples_per_s": round(samples / elapsed, 1) if elapsed > 0 else 0.0,
        "batches": sum(len(r["acked"]) for r in generated["writers"]),
        "retried_batches": sum(r["retried"] for r in generated["writers"]),
        "uncertain_batches": sum(len(r["uncertain"]) for r in generated["writers"]),
        "lost": total["lost"],
        "duplicated": total["duplicated"],
        "unexpected": total["unexpected"],
        "altered": total["altered"],
        "partial_batches": total["partial_batches"],
        "seq_errors": total["seq_errors"],
        "errors": dict(errors),
        "error_examples": examples,
        "server_cpu_s": round(server_cpu, 2),
        # the server's CPU per stored sample (gRPC, conversion, checks, SQL): the number to
        # read beside the rate on a shared machine, where the rate also depends on the load
        "server_cpu_us_per_sample": round(server_cpu / samples * 1e6, 1) if samples else 0.0,
        "load_cpu_s": round(generated["cpu_s"], 2),
        "cores": len(os.sched_getaffinity(0)),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--load":
        print(json.dumps(_load(sys.argv[2], json.loads(sys.argv[3]))))
        return
    seconds = float(os.environ.get("INGEST_SECONDS", "10"))
    env = {"IDEALRT_SERVER_MODEL": os.environ.get("IDEALRT_SERVER_MODEL", "sync")}
    with tempfile.TemporaryDirectory(prefix="idealrt-ingest-db-") as tmp:
        url = f"sqlite:///{tmp}/idealrt.db"
        print(json.dumps(run_ingest("sqlite", url, seconds=seconds, env=env)), flush=True)
    pg = os.environ.get("IDEALRT_TEST_POSTGRES_URL", "")
    if pg:
        with _pg_schema(pg) as url:
            print(json.dumps(run_ingest("postgresql", url, seconds=seconds, env=env)), flush=True)


@contextlib.contextmanager
def _pg_schema(server_url: str) -> Iterator[str]:
    """A store URL on a fresh schema of `server_url`'s database, dropped afterwards."""
    import secrets

    import psycopg
    import sqlalchemy as sa
    from psycopg import sql

    name = f"idealrt_ingest_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        url = sa.make_url(server_url).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
