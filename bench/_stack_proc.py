"""One benchmarked stack in a process of its own (bench_backends).

A serving process holds one model; the benchmark does the same, so that stacks cannot
disturb each other through the process they would otherwise share (the allocator's heap,
torch's global state, a big Python object graph for the garbage collector to walk).
Measured before the split (2026-11-26, threads=1 pinned, 10 rounds): GPT-2's pytorch
decode step ran 13.75 / 14.62 ms at context 128 / 512 with no other stack in its process
and 14.45 / 15.35 ms with the transformers stack loaded beside it and generating between
its measurements - 5% slower from the neighbour alone.

The coordinator (bench_backends.measure_config) still interleaves the stacks round by
round; a worker only runs when asked, the others wait on their pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from typing import Any

__all__ = ["StackProcess"]


def _serve(name: str, cores: list[int], threads: int, conn: Any) -> None:
    import _common as c
    import bench_backends as bb

    c.quiet_logs()
    try:
        reg, m, opts = bb.open_stack(name, cores, threads)
    except Exception as e:  # reported by the coordinator as "not available"
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", {"options": opts, "resolved_options": dict(m.stack.options)}))
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "close":
                return
            _, contexts, steps, seed, settle = cmd
            try:
                conn.send(("ok", bb.measure_round(reg, m.model_id, contexts, steps, seed, settle)))
            except Exception as e:
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        reg.close()


class StackProcess:
    """A stack loaded (and warmed up) in a spawned process; `measure_round` runs there."""

    def __init__(self, name: str, cores: list[int], threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(name, cores, threads, child), daemon=True)
        self._proc.start()
        child.close()
        status, payload = self._recv()
        if status != "ok":
            self.close()
            raise RuntimeError(payload)
        self.info: dict[str, Any] = payload

    def _recv(self) -> tuple[str, Any]:
        try:
            msg: tuple[str, Any] = self._conn.recv()
        except EOFError:
            code = self._proc.exitcode
            raise RuntimeError(f"the {self.name} worker process died (exit {code})") from None
        return msg

    def measure_round(
        self, contexts: list[int], steps: int, seed: int, settle: int
    ) -> tuple[dict[str, list[int]], dict[str, int], dict[str, list[int]]]:
        self._conn.send(("round", contexts, steps, seed, settle))
        status, payload = self._recv()
        if status != "ok":
            raise RuntimeError(f"{self.name}: {payload}")
        decode, prefill, settling = payload
        return decode, prefill, settling

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("close",))
            self._proc.join(timeout=60)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()
