"""Serving under a queue (issue 14): are a queued Generate call's timings those of an
unqueued one?

`run_serving_queue` starts a real serving server (`python -m idealrt.services.serving`, its
configuration from the environment: the caller's `env` is passed through, e.g.
IDEALRT_SERVER_MODEL=sync|aio) and, in a load-generator process of its own, loads one model
(DEFAULT_MODEL, seeded random weights, CPU fp32, threads=1, the server pinned to one core
with the stack option `cores` as the other benches pin serving; the load generator pinned
to the other cores when there are any). Then `rounds` rounds, each of
  - unqueued: `concurrent` // 2 Generate calls one after another (each alone on the server);
  - queued: `concurrent` Generate calls issued at once (the others wait for the device
    while one runs: the one on the device at each moment sees the queue behind it);
  - unqueued: the other half of the unqueued calls,
so that drift within a round and between rounds lands on both sides alike. With
`at_once=False` (`--control`) the "queued" calls are sent one at a time too: an A/A run
that shows what this machine's noise alone makes of the comparison.
Per call, the server-reported decode steps (`GenerateResponse.decode_ns`) give its median
step; each side's figure is the median of those per-call medians over all rounds, and
ratio = queued / unqueued (target: within 2%, i.e. ratio <= 1.02); ratio_paired_median is
the median over rounds of each round's own ratio (drift between rounds cancels).
`overlaps` counts pairs of timed regions ([start_time, start_time + total_ns],
server-reported) that overlap among the queued calls of a round: one on the device at a
time means 0. `handoff_us_median` is the server's gap from one queued call's timed region
to the next one's (the queue's handoff: the previous call's answer going out, the next
call's preparation).

    .venv/bin/python bench/_svc_serving.py [--rounds 5] [--concurrent 8] [--model gpt2]
        [--server-model sync|aio] [--control]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_serving_queue"]

LISTENING = "serving listening on port "
START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 600.0
WARMUP_CALLS = 3
# The default model: tiny-gpt2 (catalog, seeded random weights), whose ~0.14 ms decode step
# is mostly Python and cache-resident, so any work of the queue in the server (another
# thread holding the GIL or the core) shows at once, and other tenants' memory traffic
# does not. model="gpt2" runs the benches' usual GPT-2-small: memory-bound ~17 ms steps,
# whose rounds on the shared 2-core machine swing far more than 2% (see --control).
DEFAULT_MODEL = "tiny-gpt2"
FIRST_STEPS = 3  # decode steps reported apart: right after the prefill


def _cores() -> tuple[list[int], list[int]]:
    """(server core, load-generator cores): the highest allowed core serves (as
    bench/_common.default_core), the others generate load (the same core on a 1-core box)."""
    allowed = sorted(os.sched_getaffinity(0))
    server = [allowed[-1]]
    return server, allowed[:-1] or server


@contextlib.contextmanager
def _server(
    env: Mapping[str, str] | None, command: Sequence[str] | None = None
) -> Iterator[tuple[int, Path]]:
    """A serving process on 127.0.0.1:<free port>: (port, its log file). SIGTERM on exit.
    `command`: what to run instead of `python -m idealrt.services.serving` (experiments
    with a patched server; it must print the same "listening" line)."""
    full = {**os.environ, "IDEALRT_SERVING_ADDRESS": "127.0.0.1:0", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="idealrt-bench-serving-") as tmp:
        log = Path(tmp, "serving.log")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(command or [sys.executable, "-m", "idealrt.services.serving"]),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full,
            )
        try:
            yield _wait_listening(proc, log), log
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_listening(proc: subprocess.Popen[bytes], log: Path) -> int:
    # before anything is measured: a sleep between reads of the log file is harmless here
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(LISTENING):
                return int(line[len(LISTENING) :].strip())
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the serving process did not start (exit {proc.poll()}):\n{tail}")


# ---------------------------------------------------------------- the load generator


def _call_record(resp: Any) -> dict[str, Any]:
    start = resp.start_time.seconds * 1_000_000_000 + resp.start_time.nanos
    return {
        "start_ns": start,
        "end_ns": start + resp.total_ns,
        "prompt_tokens": resp.prompt_tokens,
        "output_tokens": resp.output_tokens,
        "prefill_ns": resp.prefill_ns,
        "decode_ns": list(resp.decode_ns),
    }


def _loadgen(args: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: load the model, warm up, then the interleaved rounds."""
    import grpc

    from idealrt.core import convert as cv
    from idealrt.core.domain import Backend, ModelRef, StackSpec
    from idealrt.serving.v1 import serving_service_pb2 as pb
    from idealrt.serving.v1 import serving_service_pb2_grpc as pbg

    os.sched_setaffinity(0, set(args["loadgen_cores"]))
    options = {"threads": "1", "cores": ",".join(map(str, args["server_cores"]))}
    stack = StackSpec(backend=Backend(args["backend"]), device="cpu", dtype="fp32", options=options)
    p, o, n = args["prompt_tokens"], args["output_tokens"], args["concurrent"]
    errors: list[str] = []
    with grpc.insecure_channel(f"127.0.0.1:{args['port']}") as channel:
        stub = pbg.ServingServiceStub(channel)
        loaded = stub.LoadModel(
            pb.LoadModelRequest(
                request_id=uuid.uuid4().hex,
                model=cv.model_ref_to_pb(ModelRef(name=args["model"], seed=0)),
                stack=cv.stack_to_pb(stack),
                max_context=p + o,
            ),
            timeout=CALL_TIMEOUT_S,
        ).model

        def request(seed: int) -> Any:
            req = pb.GenerateRequest(model_id=loaded.model_id, output_tokens=o, batch_size=1)
            req.synthetic.length, req.synthetic.seed = p, seed
            return req

        def one(seed: int) -> dict[str, Any] | None:
            try:
                return _call_record(stub.Generate(request(seed), timeout=CALL_TIMEOUT_S))
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
                return None

        def at_once(seeds: Sequence[int]) -> list[dict[str, Any] | None]:
            # every call issued before any answer is awaited; waiting blocks (no polling)
            futures = [stub.Generate.future(request(s), timeout=CALL_TIMEOUT_S) for s in seeds]
            out: list[dict[str, Any] | None] = []
            for f in futures:
                try:
                    out.append(_call_record(f.result()))
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    out.append(None)
            return out

        for i in range(WARMUP_CALLS):
            one(10_000 + i)
        errors.clear()
        rounds: list[dict[str, Any]] = []
        seed = 0
        queued = at_once if args["at_once"] else (lambda seeds: [one(s) for s in seeds])
        for _ in range(args["rounds"]):
            # unqueued calls on both sides of the queued ones: drift within the round
            # lands on both alike
            seeds = list(range(seed, seed + 2 * n))
            seed += 2 * n
            half = n // 2
            before = [one(s) for s in seeds[:half]]
            at = queued(seeds[n : 2 * n])
            after = [one(s) for s in seeds[half:n]]
            rounds.append({"unqueued": before + after, "queued": at})
        stub.UnloadModel(pb.UnloadModelRequest(model_id=loaded.model_id), timeout=CALL_TIMEOUT_S)
    return {"rounds": rounds, "errors": errors, "resolved_options": dict(loaded.stack.options)}


# ---------------------------------------------------------------- analysis


def overlaps(calls: Sequence[Mapping[str, int]]) -> int:
    """Pairs of timed regions [start_ns, end_ns) that overlap."""
    spans = sorted((c["start_ns"], c["end_ns"]) for c in calls)
    return sum(1 for i, (_, end) in enumerate(spans) for start, _ in spans[i + 1 :] if start < end)


def _step_median(call: Mapping[str, Any]) -> float:
    return float(statistics.median(call["decode_ns"])) * 1e-9


def _side_detail(calls: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Where a disturbance would hide from the median: the mean step, the first steps
    after the prefill (the previous call's answer lands there), the slowest step."""
    steps = [d for c in calls for d in c["decode_ns"]]
    first = [d for c in calls for d in c["decode_ns"][:FIRST_STEPS]]
    if not steps:
        return {"step_s_mean": None, "first_steps_s_median": None, "step_s_p99": None}
    ordered = sorted(steps)
    return {
        "step_s_mean": statistics.fmean(steps) * 1e-9,
        "first_steps_s_median": statistics.median(first) * 1e-9,
        "step_s_p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e-9,
        "prefill_s_median": statistics.median(c["prefill_ns"] for c in calls) * 1e-9,
    }


def summarize(raw: Mapping[str, Any], concurrent: int, output_tokens: int) -> dict[str, Any]:
    per: dict[str, list[float]] = {"unqueued": [], "queued": []}
    kept: dict[str, list[Mapping[str, Any]]] = {"unqueued": [], "queued": []}
    per_round: list[dict[str, float]] = []
    gaps: list[int] = []
    by_position: dict[int, list[float]] = {}
    overlap = calls = bad = 0
    for rnd in raw["rounds"]:
        medians: dict[str, float] = {}
        for side in ("unqueued", "queued"):
            done = [c for c in rnd[side] if c is not None]
            calls += len(rnd[side])
            exact = [c for c in done if c["output_tokens"] == output_tokens]
            bad += len(done) - len(exact)
            per[side] += [_step_median(c) for c in exact]
            kept[side] += exact
            if exact:
                medians[side] = statistics.median(_step_median(c) for c in exact)
        queued = sorted((c for c in rnd["queued"] if c is not None), key=lambda c: c["start_ns"])
        overlap += overlaps(queued)
        for i, c in enumerate(queued):
            by_position.setdefault(i, []).append(_step_median(c))
        gaps += [b["start_ns"] - a["end_ns"] for a, b in itertools.pairwise(queued)]
        if len(medians) == 2:
            per_round.append({**medians, "ratio": medians["queued"] / medians["unqueued"]})
    un = statistics.median(per["unqueued"]) if per["unqueued"] else float("nan")
    qu = statistics.median(per["queued"]) if per["queued"] else float("nan")
    ratios = [r["ratio"] for r in per_round]
    return {
        "unqueued_decode_step_s_median": un,
        "queued_decode_step_s_median": qu,
        "ratio": qu / un if un == un and un > 0 else float("nan"),
        # the same comparison paired round by round (drift between rounds cancels)
        "ratio_paired_median": statistics.median(ratios) if ratios else float("nan"),
        "overlaps": overlap,
        "calls": calls,
        "errors": len(raw["errors"]) + bad,
        "error_messages": sorted(set(raw["errors"]))[:10],
        "nonconforming_calls": bad,
        "per_round": per_round,
        "handoff_us_median": statistics.median(gaps) / 1e3 if gaps else None,
        "handoff_us_min": min(gaps) / 1e3 if gaps else None,
        "concurrent": concurrent,
        "detail": {side: _side_detail(kept[side]) for side in kept},
        # a queued call's median step by its place in its round's queue (0 ran first,
        # while the others arrived): where the queue would disturb, it shows by place
        "queued_step_s_median_by_position": [
            statistics.median(by_position[i]) for i in sorted(by_position)
        ],
    }


def run_serving_queue(
    *,
    concurrent: int = 8,
    rounds: int,
    env: dict[str, str] | None = None,
    model: str = DEFAULT_MODEL,
    backend: str = "pytorch",
    prompt_tokens: int = 32,
    output_tokens: int = 65,
    server_command: Sequence[str] | None = None,
    at_once: bool = True,
) -> dict[str, Any]:
    """Unqueued vs `concurrent` queued Generate calls on one model of a real serving
    process, `rounds` alternating rounds (see the module docstring). Returns
    {"unqueued_decode_step_s_median", "queued_decode_step_s_median", "ratio", "overlaps",
    "calls", "errors", ...details}."""
    if concurrent < 2 or rounds < 1 or output_tokens < 2:
        raise ValueError("need concurrent >= 2, rounds >= 1 and output_tokens >= 2")
    server_cores, loadgen_cores = _cores()
    args = {
        "concurrent": concurrent,
        "rounds": rounds,
        "model": model,
        "backend": backend,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "server_cores": server_cores,
        "loadgen_cores": loadgen_cores,
        "at_once": at_once,
    }
    with _server(env, server_command) as (port, log):
        args["port"] = port
        proc = subprocess.run(
            [sys.executable, __file__, "--loadgen", json.dumps(args)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"load generator failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n"
                f"server log:\n{tail}"
            )
    raw = json.loads(proc.stdout)
    out = summarize(raw, concurrent, output_tokens)
    out.update(
        {
            "rounds": rounds,
            "model": model,
            "backend": backend,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "server_cores": server_cores,
            "loadgen_cores": loadgen_cores,
            "server_env": dict(env or {}),
            "control_run": not at_once,
            "resolved_options": raw["resolved_options"],
        }
    )
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        print(json.dumps(_loadgen(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--backend", default="pytorch", choices=("pytorch", "onnxruntime"))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=65)
    ap.add_argument("--server-model", choices=("sync", "aio"), default=None)
    ap.add_argument("--server-command", default=None, help="instead of the module (experiments)")
    ap.add_argument("--control", action="store_true", help="A/A: send the queued side serially")
    a = ap.parse_args()
    env = {"IDEALRT_SERVER_MODEL": a.server_model} if a.server_model else None
    doc = run_serving_queue(
        concurrent=a.concurrent,
        rounds=a.rounds,
        env=env,
        model=a.model,
        backend=a.backend,
        prompt_tokens=a.prompt_tokens,
        output_tokens=a.output_tokens,
        server_command=a.server_command.split() if a.server_command else None,
        at_once=not a.control,
    )
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
