"""The machine limits bench_backends measures beside the stacks, in the same thread
configuration: read bandwidth (`measure_bandwidth`), fp32 matmul rate (`measure_matmul`),
and ONNX Runtime's own ceiling for a GPT-2-small decode step (its one-row weight MatMuls
alone)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
from _common import pinned

from idealrt.core import catalog


def measure_limits(cores: list[int], threads: int, quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 7
    bw = measure_bandwidth(cores, threads, mib=256 if quick else 1024, repeats=reps)
    mm = measure_matmul(cores, threads, n=1024 if quick else 2048, repeats=reps)
    out: dict[str, Any] = {"cores": cores, "threads": threads, "bandwidth": bw, "matmul": mm}
    if not quick and c.backend_available("onnxruntime")[0]:
        out["onnxruntime_weight_stream"] = ort_weight_stream(cores, threads)
    return out


def ort_weight_stream(cores: list[int], threads: int, rounds: int = 5) -> dict[str, Any]:
    """ONNX Runtime's own ceiling for a decode step: one graph of nothing but the one-row
    MatMuls of GPT-2-small's weights (per layer qkv, out, up, down; then the LM head; B
    prepacked, on huge pages, as in the decoder's session), timed in rounds alternating
    with the read bandwidth measurement. What a step can reach at best on this stack,
    before attention, norms, activations and node dispatch."""
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from idealrt.services.serving import hugepages

    spec = catalog.resolve("gpt2")
    d, ff, qkv = spec.d_model, spec.d_ff, (spec.heads + 2 * spec.kv_heads_effective) * spec.head_dim
    shapes = [(d, qkv), (spec.heads * spec.head_dim, d), (d, ff), (ff, d)] * spec.layers
    shapes.append((d, spec.vocab))
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    nbytes = float(sum(k * n * 4 for k, n in shapes))
    widths = sorted({k for k, _ in shapes})
    graph = helper.make_graph(
        nodes,
        "weight_stream",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in widths],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rates, fracs = [], []
    with tempfile.TemporaryDirectory() as tmp, c.pinned(cores, threads):
        path = Path(tmp) / "weights.onnx"
        onnx.save(model, str(path), save_as_external_data=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        x = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in widths}
        with hugepages.AnonymousRegions() as regions:  # as the backend's hugepages=auto
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            sess.run(None, x)
        if hugepages.available()[0]:
            hugepages.collapse(regions.added)
        for _ in range(rounds):
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                sess.run(None, x)
                ts.append(time.perf_counter() - t0)
            bw = measure_bandwidth(cores, threads, mib=512, repeats=3)["torch_best_bytes_s"]
            rates.append(nbytes / min(ts))
            fracs.append(rates[-1] / bw)
        del sess
    return {
        "bytes": nbytes,
        "median_bytes_s": statistics.median(rates),
        "fraction_of_bandwidth": statistics.median(fracs),
        "round_fractions": fracs,
    }


def measure_bandwidth(
    cores: Sequence[int], threads: int, *, mib: int = 1024, repeats: int = 7
) -> dict[str, float]:
    """STREAM-like read: best and median bytes/s of summing a `mib` MiB fp32 tensor
    (torch, `threads` threads pinned to `cores`), and numpy's single-threaded sum."""
    import torch

    n = mib * 1024 * 1024 // 4
    with pinned(cores, threads):
        x = torch.ones(n, dtype=torch.float32)
        x.sum()  # fault the pages in
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            t.append(time.perf_counter() - t0)
        a = x.numpy()
        tn = []
        for _ in range(max(3, repeats // 2)):
            t0 = time.perf_counter()
            np.add.reduce(a)
            tn.append(time.perf_counter() - t0)
        del a, x
    nbytes = float(n * 4)
    return {
        "bytes": nbytes,
        "torch_best_bytes_s": nbytes / min(t),
        "torch_median_bytes_s": nbytes / statistics.median(t),
        "numpy_best_bytes_s": nbytes / min(tn),
        "repeats": float(repeats),
    }


def _best_rate(fn: Any, flops: float, repeats: int) -> tuple[float, float]:
    fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return flops / min(t), flops / statistics.median(t)


def _ort_matmul(n: int, threads: int) -> Any:
    """A callable running one n x n fp32 MatMul through ONNX Runtime (its MLAS GEMM)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "mm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((n, n), dtype=np.float32) for x in ("a", "b")}
    return lambda: sess.run(None, feeds)


def measure_matmul(
    cores: Sequence[int], threads: int, *, n: int = 2048, repeats: int = 7
) -> dict[str, Any]:
    """fp32 FLOP/s (2 n^3 per product) of an n x n matmul, best and median of `repeats`,
    through torch.matmul (MKL/oneDNN), numpy (its BLAS) and ONNX Runtime (MLAS) when it
    is installed. `best_flops_s` is the fastest of them: the best fp32 GEMM rate this
    machine demonstrably reaches with these threads, which is what a roofline must use
    (torch's own figure alone can sit below what another stack achieves)."""
    import torch

    flops = 2.0 * n**3
    rates: dict[str, dict[str, Any]] = {}
    with pinned(cores, threads):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        best, med = _best_rate(lambda: torch.matmul(a, b, out=out), flops, repeats)
        rates["torch"] = {"best_flops_s": best, "median_flops_s": med}
        an, bn = a.numpy(), b.numpy()
        best, med = _best_rate(lambda: an @ bn, flops, repeats)
        rates["numpy"] = {"best_flops_s": best, "median_flops_s": med}
        try:
            best, med = _best_rate(_ort_matmul(n, threads), flops, repeats)
            rates["onnxruntime"] = {"best_flops_s": best, "median_flops_s": med}
        except Exception as e:  # optional probe
            rates["onnxruntime"] = {"error": f"{type(e).__name__}: {e}"}
    usable = {k: v["best_flops_s"] for k, v in rates.items() if "best_flops_s" in v}
    fastest = max(usable, key=lambda k: usable[k])
    return {
        "n": n,
        "flops": flops,
        "repeats": repeats,
        "by_library": rates,
        "torch_best_flops_s": rates["torch"]["best_flops_s"],
        "best_flops_s": usable[fastest],
        "best_library": fastest,
    }
