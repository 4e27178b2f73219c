"""Does idealrt's timing add anything to what it measures? (issue 15)

For the transformers and pytorch serving backends, in one process on one pinned core, one
loaded model object is timed two ways, interleaved generation by generation:

- idealrt: the backend's `generate` (what the serving service runs for a Generate call:
  StepClock marks after each token, the result the store keeps): prefill_ns, decode_ns,
  total_ns;
- direct: the most direct loop over the same model object with perf_counter_ns around it
  and nothing else: for transformers the Hugging Face model's forward with its KV cache
  (the loop a user would write; `model.generate` as well, for reference), for pytorch the
  backend's own decoder module called step by step on its own cache.

Both generate the same greedy tokens for the same prompts (checked). Reported per backend:
the medians of total time, prefill and per-step decode, idealrt / direct (target: within
2%), and the interleaved rounds' spread. GPT-2 small's shape (catalog "gpt2", random
weights, seed 0), CPU fp32, batch 1, threads 1 on the pinned core.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c
import numpy as np

GRID = ((16, 16), (128, 16), (512, 8))  # (prompt tokens, output tokens)
QUICK_GRID = ((16, 8), (128, 8))


def _load(backend: str, core: int) -> Any:
    from idealrt.core.catalog import resolve
    from idealrt.core.domain import Backend, StackSpec

    if backend == "transformers":
        from idealrt.services.serving.backends.transformers_backend import create_backend
    else:
        from idealrt.services.serving.backends.pytorch_backend import create_backend
    b = create_backend()
    stack = StackSpec(
        backend=Backend(backend), device="cpu", dtype="fp32", options={"threads": "1"}
    )
    b.load(resolve("gpt2"), stack, "", 0, 1024)
    return b


# (prompt, o) -> (prefill ns, total ns, step ns, greedy tokens)
Direct = Callable[[list[int], int], tuple[int, int, list[int], list[int]]]


def _direct_transformers(b: Any) -> Direct:
    """A plain HF forward loop over the backend's own model object."""
    import torch

    model = b._model  # the very object the backend times (a bench may look inside)

    def run(prompt: list[int], o: int) -> tuple[int, int, list[int], list[int]]:
        ids = torch.tensor([prompt], dtype=torch.int64)
        toks: list[int] = []
        marks = []
        with torch.inference_mode():
            t0 = time.perf_counter_ns()
            res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = res.logits[:, -1].argmax(-1)
            toks.append(int(tok))
            marks.append(time.perf_counter_ns())
            for _ in range(1, o):
                res = model(
                    input_ids=tok.view(-1, 1),
                    past_key_values=res.past_key_values,
                    use_cache=True,
                    logits_to_keep=1,
                )
                tok = res.logits[:, -1].argmax(-1)
                toks.append(int(tok))
                marks.append(time.perf_counter_ns())
        steps = [b2 - a for a, b2 in itertools.pairwise(marks)]
        return marks[0] - t0, marks[-1] - t0, steps, toks

    return run


def _hf_generate(b: Any) -> Callable[[list[int], int], int]:
    """`model.generate` (greedy, exactly o new tokens): the library's own loop, total ns."""
    import torch

    model = b._model

    def run(prompt: list[int], o: int) -> int:
        ids = torch.tensor([prompt], dtype=torch.int64)
        with torch.inference_mode():
            t0 = time.perf_counter_ns()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=o,
                min_new_tokens=o,
                do_sample=False,
                pad_token_id=0,
            )
            return time.perf_counter_ns() - t0

    return run


def _direct_pytorch(b: Any) -> Direct:
    """The backend's decoder module called directly on the backend's own cache, with the
    same kernels the backend chose (ATen for the prefill, its native decode kernel, if any,
    for the steps)."""
    import torch

    dec = b._decoder
    b._prepare_batch(1)

    def run(prompt: list[int], o: int) -> tuple[int, int, list[int], list[int]]:
        cache, native = b._cache, b._native
        p = len(prompt)
        ids = torch.tensor([prompt], dtype=torch.int64)
        toks: list[int] = []
        marks = []
        with torch.inference_mode():
            t0 = time.perf_counter_ns()
            dec.use_native(None)
            logits = dec(ids, cache, 0, last_only=True)
            dec.use_native(native)
            tok = logits[:, -1].argmax(-1)
            toks.append(int(tok))
            marks.append(time.perf_counter_ns())
            for i in range(1, o):
                logits = dec(tok.view(-1, 1), cache, p + i - 1, last_only=True)
                tok = logits[:, -1].argmax(-1)
                toks.append(int(tok))
                marks.append(time.perf_counter_ns())
        steps = [b2 - a for a, b2 in itertools.pairwise(marks)]
        return marks[0] - t0, marks[-1] - t0, steps, toks

    return run


def measure(backend: str, core: int, rounds: int, grid: tuple[tuple[int, int], ...]) -> dict:
    b = _load(backend, core)
    direct = _direct_transformers(b) if backend == "transformers" else _direct_pytorch(b)
    generate = _hf_generate(b) if backend == "transformers" else None
    rng = np.random.default_rng(7)
    ours: dict[str, list[list[float]]] = {"total": [], "prefill": [], "step": []}
    theirs: dict[str, list[list[float]]] = {"total": [], "prefill": [], "step": []}
    hf_total: list[float] = []
    ours_for_hf: list[float] = []
    mismatched = 0
    for r in range(rounds):
        row_o: dict[str, list[float]] = {k: [] for k in ours}
        row_d: dict[str, list[float]] = {k: [] for k in ours}
        for p, o in grid:
            prompt = rng.integers(0, 50_000, size=p).tolist()
            first_ours = r % 2 == 0  # alternate which goes first
            for which in ("ours", "direct") if first_ours else ("direct", "ours"):
                if which == "ours":
                    res = b.generate(prompt, o)
                    row_o["total"].append(res.total_ns / o)
                    row_o["prefill"].append(res.prefill_ns / p)
                    row_o["step"].append(float(np.median(res.decode_ns)) if res.decode_ns else 0)
                    ours_tokens = list(res.output_ids)
                else:
                    pre, tot, steps, toks = direct(prompt, o)
                    row_d["total"].append(tot / o)
                    row_d["prefill"].append(pre / p)
                    row_d["step"].append(float(np.median(steps)) if steps else 0)
                    direct_tokens = toks
            if ours_tokens != direct_tokens:
                mismatched += 1
            if generate is not None:
                hf_total.append(generate(prompt, o) / o)
                ours_for_hf.append(b.generate(prompt, o).total_ns / o)
        for k in ours:
            ours[k].append(row_o[k])
            theirs[k].append(row_d[k])
    out: dict[str, Any] = {"backend": backend, "rounds": rounds, "grid": grid}
    for k in ours:
        a, d = np.array(ours[k]), np.array(theirs[k])  # rounds x grid
        per_round = np.median(a / d, axis=1)
        out[k] = {
            "ratio_median": float(np.median(a / d)),
            "round_ratios": per_round.tolist(),
            "idealrt_median_ns": float(np.median(a)),
            "direct_median_ns": float(np.median(d)),
        }
    out["token_mismatches"] = mismatched
    if hf_total:
        out["hf_generate_over_idealrt_total"] = float(
            np.median(np.array(hf_total) / np.array(ours_for_hf))
        )
    b.unload()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 9)")
    ap.add_argument("--core", type=int, default=c.default_core())
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--backends", default="pytorch,transformers")
    args = ap.parse_args(argv)
    c.quiet_logs()
    out = c.out_dir(args.quick, args.out_dir)
    rounds = args.rounds or (2 if args.quick else 9)
    grid = QUICK_GRID if args.quick else GRID
    doc = c.begin_doc("agreement", args.quick, vars(args))
    doc["model"] = "gpt2 (catalog; random weights, seed 0), CPU fp32, batch 1, 1 thread"
    targets: list[dict[str, Any]] = []
    lines: list[str] = []
    doc["backends"] = {}
    with c.pinned([args.core], 1):
        for name in [x.strip() for x in args.backends.split(",") if x.strip()]:
            ok, why = c.backend_available(f"{name}")
            if not ok:
                doc["backends"][name] = {"available": False, "reason": why}
                lines.append(f"- {name}: not available ({why})")
                continue
            print(f"[agreement] {name}: {rounds} interleaved rounds over {grid} ...", flush=True)
            res = measure(name, args.core, rounds, grid)
            doc["backends"][name] = res
            for k in ("total", "prefill", "step"):
                dev = abs(res[k]["ratio_median"] - 1.0)
                targets.append(
                    c.target(f"{name}: idealrt / direct {k}, |ratio - 1|", dev, "<=", 0.02, "%")
                )
            targets.append(
                c.target(f"{name}: greedy tokens differ", float(res["token_mismatches"]), "<=", 0.0)
            )
            hf = res.get("hf_generate_over_idealrt_total")
            tot, pre, step = res["total"], res["prefill"], res["step"]
            lines.append(
                f"- {name}: idealrt / direct: total {tot['ratio_median']:.4f}, prefill "
                f"{pre['ratio_median']:.4f}, decode step {step['ratio_median']:.4f} (rounds "
                f"{min(tot['round_ratios']):.4f}-{max(tot['round_ratios']):.4f}); step "
                f"{step['idealrt_median_ns'] / 1e6:.2f} ms"
                + (f"; HF generate() / idealrt total {hf:.3f}" if hf else "")
            )
    doc["targets"] = targets
    doc["summary_md"] = lines
    for line in lines:
        print(line)
    for t in targets:
        value, goal = c.fmt(t["value"], t["unit"]), c.fmt(t["threshold"], t["unit"])
        print(f"  {t['name']}: {value} {t['op']} {goal} {'met' if t['met'] else 'NOT met'}")
    c.write_result(out / "agreement.json", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
