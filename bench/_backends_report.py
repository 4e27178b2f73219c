"""bench_backends' analysis: roofline fractions, the issue's targets, the decode plot.

Decode fraction = decode_bytes(c, fp32) / the best measured bandwidth / measured step;
prefill fraction = the FLOP bound (logits of the last position only, as the stacks compute)
/ measured. Growth 128 -> 512 is judged against the bytes ratio decode_bytes(512) /
decode_bytes(128); the same question in absolute terms (extra time vs the extra KV bytes at
the measured bandwidth) and the ratio within each round are kept beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _common as c

from idealrt.core import catalog
from idealrt.services.metrics.roofline import MeasuredHardware, roofline

__all__ = ["TARGET_DECODE", "checks", "fractions", "plot"]

TARGET_DECODE = {"onnxruntime": 0.80, "pytorch": 0.75}


def fractions(res: dict[str, Any], limits: dict[str, Any]) -> None:
    """Add roofline bounds and fractions (in place) to one stack's measurements."""
    spec = catalog.resolve("gpt2")
    hw = MeasuredHardware(
        mem_bandwidth_bytes_s=limits["bandwidth"]["torch_best_bytes_s"],
        peak_flops_s=limits["matmul"]["best_flops_s"],
    )
    for ctx, d in res["decode"].items():
        b = roofline(spec, hw, "fp32", 1, int(ctx))
        d["bytes"] = b.decode_bytes
        d["bound_s"] = b.decode_s_lower
        d["bound_by"] = b.decode_bound_by
        d["fraction_of_roofline"] = b.decode_s_lower / d["median_s"]
        # each round against the bandwidth measured in that round: the spread of the answer
        d["round_fractions"] = [
            b.decode_bytes / bw / t
            for bw, t in zip(res["round_bandwidth_bytes_s"], d["round_medians_s"], strict=True)
        ]
    for p, d in res["prefill"].items():
        b = roofline(spec, hw, "fp32", int(p), 1)
        d["flops_last_logits"] = b.prefill_flops
        d["flops_all_logits"] = spec.prefill_flops(int(p))
        d["bound_s"] = b.prefill_s_lower
        d["bound_by"] = b.prefill_bound_by
        d["fraction_of_roofline"] = b.prefill_s_lower / d["median_s"]
        d["fraction_all_logits_flops"] = d["flops_all_logits"] / hw.peak_flops_s / d["median_s"]
        torch_peak = limits["matmul"]["torch_best_flops_s"]
        d["fraction_vs_torch_matmul"] = b.prefill_flops / torch_peak / d["median_s"]


def plot(path: Path, configs: dict[str, Any]) -> str:
    plt = c.pyplot()
    if plt is None:
        return "matplotlib not installed: no plot"
    fig, axes = plt.subplots(1, len(configs), figsize=(6.5 * len(configs), 4.6), squeeze=False)
    for ax, (cname, cfg) in zip(axes[0], configs.items(), strict=True):
        bound_drawn = False
        for bname, res in cfg["stacks"].items():
            if not res.get("available"):
                continue
            xs = sorted(int(k) for k in res["decode"])
            ax.plot(xs, [res["decode"][str(x)]["median_s"] * 1e3 for x in xs], "o-", label=bname)
            if not bound_drawn:
                ax.plot(
                    xs,
                    [res["decode"][str(x)]["bound_s"] * 1e3 for x in xs],
                    "k--",
                    label="roofline (bytes / measured bandwidth)",
                )
                bound_drawn = True
        ax.set_title(f"GPT-2-small decode step, CPU fp32, {cname}")
        ax.set_xlabel("context length c")
        ax.set_ylabel("decode step (ms, median)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def checks(name: str, cfg_name: str, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    spec = catalog.resolve("gpt2")
    out: list[dict[str, Any]] = []
    res = cfg["stacks"].get(name, {})
    if not res.get("available"):
        return out
    dec = res["decode"]
    for ctx in ("128", "512"):
        if ctx in dec and name in TARGET_DECODE:
            out.append(
                c.target(
                    f"{cfg_name} {name}: decode@{ctx} fraction of roofline",
                    dec[ctx]["fraction_of_roofline"],
                    ">=",
                    TARGET_DECODE[name],
                    "%",
                )
            )
    if "128" in dec and "512" in dec:
        allowed = spec.decode_bytes(512, "fp32") / spec.decode_bytes(128, "fp32")
        growth = dec["512"]["median_s"] / dec["128"]["median_s"]
        bw = cfg["limits"]["bandwidth"]["torch_best_bytes_s"]
        extra_kv = spec.decode_bytes(512, "fp32") - spec.decode_bytes(128, "fp32")
        res["growth_128_to_512"] = {
            "measured": growth,
            "bytes_ratio": allowed,
            # the same question in absolute terms: the extra time vs the extra KV bytes read
            # at the measured bandwidth (a stack below its roofline cannot meet this one)
            "extra_s": dec["512"]["median_s"] - dec["128"]["median_s"],
            "extra_kv_bytes_at_bandwidth_s": extra_kv / bw,
            # the ratio within each round (128 and 512 measured minutes apart at most)
            "round_ratios": [
                b / a
                for a, b in zip(
                    dec["128"]["round_medians_s"], dec["512"]["round_medians_s"], strict=True
                )
            ],
        }
    if "growth_128_to_512" in res and name in TARGET_DECODE:
        allowed, growth = (
            res["growth_128_to_512"]["bytes_ratio"],
            res["growth_128_to_512"]["measured"],
        )
        out.append(
            c.target(
                f"{cfg_name} {name}: decode growth 128->512 (<= bytes ratio {allowed:.3f})",
                growth,
                "<=",
                allowed,
                "x",
            )
        )
    hf = cfg["stacks"].get("transformers", {})
    if name == "pytorch" and hf.get("available"):
        for ctx in ("128", "512"):
            if ctx in dec:
                ratio = dec[ctx]["median_s"] / hf["decode"][ctx]["median_s"]
                out.append(
                    c.target(f"{cfg_name} pytorch/transformers decode@{ctx}", ratio, "<=", 1.0, "x")
                )
    return out
