"""Run every benchmark and write results/<name>.json plus results/SUMMARY.md.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME[,NAME]] [--queries N]
    .venv/bin/python bench/run_all.py --summary-only     # rebuild SUMMARY.md from the JSONs

Each bench runs in its own process (each pins itself to cores and loads its own models), one
after another: never two at once, they would contend for the same cores and memory bus.
A failing bench is reported and the rest still run; the exit status is non-zero if any
failed. --quick runs every bench as a smoke test on tiny grids and writes to results/quick/
(so a smoke run never overwrites a full run's results).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _common as c

BENCHES = (
    "estimate",
    "accuracy",
    "backends",
    "agreement",
    "contention",
    "denoise",
    "profiling_cost",
    "service",
)
# Results of non-default variants (--grid knee of accuracy, profiling_cost): summarised if present.
OPTIONAL = ("accuracy_knee", "profiling_cost_knee")
PLOTS = {
    "accuracy": ["accuracy_alpha.png"],
    "accuracy_knee": ["accuracy_knee_alpha.png"],
    "backends": ["backends_decode.png"],
}


def bench_command(name: str, quick: bool, out: Path, extra: dict[str, str]) -> list[str]:
    script = str(c.BENCH_DIR / f"bench_{name}.py")
    if name == "estimate":  # its own flags (the module predates this runner)
        args = ["--out", str(out / "estimate.json")]
        return [
            sys.executable,
            script,
            *args,
            *(["--queries", "200000", "--repeats", "3"] if quick else []),
        ]
    args = ["--out-dir", str(out), *(["--quick"] if quick else [])]
    if "core" in extra:
        args += ["--core", extra["core"]]
    if name == "profiling_cost" and "queries" in extra:
        args += ["--queries", extra["queries"]]
    return [sys.executable, script, *args]


def _estimate_lines(doc: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    qps = float(doc["headline_queries_per_s"])
    goal = float(doc["target_queries_per_s"])
    lines = [
        f"- {name}: {r['queries_per_s_median']:,.0f} queries/s median "
        f"({r['queries']:,} queries, {r['repeats']} repeats)"
        for name, r in doc.get("results", {}).items()
    ]
    return lines, [c.target("estimate_workload queries/s (median)", qps, ">=", goal)]


def _machine_line(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    env = m.get("environment")
    if env is None:  # bench_estimate's own machine description
        return (
            f"{m.get('cpu_model')}, {m.get('logical_cpus')} logical CPUs, load (1 min) "
            f"{m.get('loadavg_1m', 0):.2f}; numpy {m.get('numpy')}"
        )
    libs = ", ".join(
        f"{k.removesuffix('.version')} {v}"
        for k, v in env.items()
        if k.endswith(".version") and v != "absent" and not k.startswith("idealrt")
    )
    return (
        f"{env.get('cpu.model')} ({env.get('cpu.flags')}), {env.get('cpu.logical_cores')} "
        f"logical cores; load 1/5/15 min {m.get('loadavg_1_5_15')} at start, "
        f"{m.get('loadavg_end_1_5_15')} at end; git {env.get('idealrt.git_rev')}; {libs}"
    )


def summary(out: Path, runs: dict[str, dict[str, Any]]) -> Path:
    lines = [
        "# idealrt benchmarks: summary",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} from {out}/*.json "
        "(see bench/README.md for what each bench measures and how to read it).",
        "Absolute times hold for the machine named under each bench at the load shown; "
        "ratios measured side by side in one run are what carries across machines.",
        "",
        "| bench | target | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    sections: list[str] = []
    present = [n for n in OPTIONAL if (out / f"{n}.json").exists()]
    for name in (*BENCHES, *present):
        path = out / f"{name}.json"
        if not path.exists():
            sections += [f"## {name}", "", "not run (no result file)", ""]
            continue
        doc = json.loads(path.read_text())
        if name == "estimate":
            body, targets = _estimate_lines(doc)
        else:
            body, targets = list(doc.get("summary_md", [])), list(doc.get("targets", []))
        for t in targets:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            unit = t.get("unit", "")
            lines.append(
                f"| {name} | {t['name']} | {c.fmt(t['value'], unit)} | {t['op']} "
                f"{c.fmt(t['threshold'], unit)} | {met} |"
            )
        when = doc.get("time_end") or doc.get("time", "?")
        run = runs.get(name)
        status = f"; this invocation: exit {run['rc']} in {run['seconds']:.0f} s" if run else ""
        sections += [
            f"## {name}",
            "",
            f"Result of {when}{' (quick smoke run)' if doc.get('quick') else ''}{status}.  ",
            f"Machine: {_machine_line(doc)}",
            "",
            *body,
            "",
            *[f"![{p}]({p})" for p in PLOTS.get(name, []) if (out / p).exists()],
            "",
        ]
    path = out / "SUMMARY.md"
    path.write_text("\n".join([*lines, "", *sections]).rstrip() + "\n")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny grids: a smoke run")
    ap.add_argument("--only", action="append", default=[], help=f"one of {', '.join(BENCHES)}")
    ap.add_argument("--queries", type=int, default=0, help="profiling_cost: direct queries")
    ap.add_argument("--core", type=int, default=None, help="core for pinned measurements")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        ap.error(f"unknown bench(es) {unknown}; choose from {', '.join(BENCHES)}")
    out = c.out_dir(args.quick)
    extra: dict[str, str] = {}
    if args.queries > 0:
        extra["queries"] = str(args.queries)
    if args.core is not None:
        extra["core"] = str(args.core)
    runs: dict[str, dict[str, Any]] = {}
    if not args.summary_only:
        for name in only or BENCHES:
            cmd = bench_command(name, args.quick, out, extra)
            print(f"=== {name}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, cwd=c.BENCH_DIR.parent)
            runs[name] = {"rc": rc, "seconds": time.perf_counter() - t0}
            print(f"=== {name}: exit {rc} after {runs[name]['seconds']:.0f} s", flush=True)
    summary(out, runs)
    failed = [n for n, r in runs.items() if r["rc"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
