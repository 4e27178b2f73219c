"""The machine limits bench_backends measures beside the stacks, in the same thread
configuration: read bandwidth, fp32 matmul rate, and ONNX Runtime's own ceiling for a
GPT-2-small decode step (its one-row weight MatMuls alone)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import _common as c

from idealrt.core import catalog


def measure_limits(cores: list[int], threads: int, quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 7
    bw = c.measure_bandwidth(cores, threads, mib=256 if quick else 1024, repeats=reps)
    mm = c.measure_matmul(cores, threads, n=1024 if quick else 2048, repeats=reps)
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
            bw = c.measure_bandwidth(cores, threads, mib=512, repeats=3)["torch_best_bytes_s"]
            rates.append(nbytes / min(ts))
            fracs.append(rates[-1] / bw)
        del sess
    return {
        "bytes": nbytes,
        "median_bytes_s": statistics.median(rates),
        "fraction_of_bandwidth": statistics.median(fracs),
        "round_fractions": fracs,
    }
