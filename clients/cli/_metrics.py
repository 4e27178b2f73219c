"""`idealrt fit | estimate | denoise | cost | roofline | compare | pareto | export-helm |
import-helm | cost-models`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idealrt.clients.cli._render import console, cost_model_rows, emit_json, ms, print_table
from idealrt.clients.cli._session import Session
from idealrt.clients.reasons import COST_MODEL_INVALID
from idealrt.core.errors import InvalidArgument
from idealrt.core.reasons import QUERIES_INVALID, QUERIES_REQUIRED

__all__ = [
    "cmd_compare",
    "cmd_cost",
    "cmd_denoise",
    "cmd_estimate",
    "cmd_export_helm",
    "cmd_fit",
    "cmd_import_helm",
    "cmd_pareto",
    "cmd_roofline",
    "read_queries",
]


def read_queries(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    if getattr(args, "queries", None):
        ps: list[int] = []
        os_: list[int] = []
        for n, line in enumerate(Path(args.queries).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                ps.append(int(q["prompt_tokens"]))
                os_.append(int(q["output_tokens"]))
            except (ValueError, KeyError, TypeError):
                raise InvalidArgument(
                    QUERIES_INVALID,
                    f"{args.queries}:{n}: expected a JSON object with integer prompt_tokens and "
                    "output_tokens",
                    field="queries",
                ) from None
        return ps, os_
    if args.prompt_tokens is None or args.output_tokens is None:
        raise InvalidArgument(
            QUERIES_REQUIRED,
            "give --prompt-tokens P --output-tokens O, or --queries FILE.jsonl",
            field="queries",
        )
    ps, os_ = list(args.prompt_tokens), list(args.output_tokens)
    if len(ps) != len(os_):
        if len(ps) == 1:
            ps = ps * len(os_)
        elif len(os_) == 1:
            os_ = os_ * len(ps)
        else:
            raise InvalidArgument(
                QUERIES_INVALID,
                "--prompt-tokens and --output-tokens need equal lengths",
                field="output_tokens",
            )
    return ps, os_


def cmd_fit(args: argparse.Namespace, s: Session) -> int:
    cm = s.metrics.fit(
        args.profile,
        request_id=args.request_id or "",
        name=args.name or "",
        fit_overhead=args.fit_overhead,
        bootstrap=args.bootstrap,
        constant_beta=args.constant_beta,
        seed=args.seed,
    )
    if args.json:
        emit_json(cm)
    else:
        print_table("cost model", ["quantity", "value"], cost_model_rows(cm))
    return 0


def cmd_estimate(args: argparse.Namespace, s: Session) -> int:
    ps, os_ = read_queries(args)
    if len(ps) > 100_000:
        summary = s.metrics.stream_estimate(args.cost_model, [(ps, os_)])
        if args.json:
            emit_json({"summary": summary})
            return 0
        est = None
    else:
        est = s.metrics.estimate(args.cost_model, ps, os_, per_query=True, intervals=args.intervals)
        summary = est.summary
    if args.json and est is not None:
        emit_json(
            {
                "summary": summary,
                "queries": [
                    {
                        "prompt_tokens": p,
                        "output_tokens": o,
                        "runtime_s": r,
                        "low_s": lo,
                        "high_s": hi,
                        "out_of_domain": bool(ood),
                    }
                    for p, o, r, lo, hi, ood in zip(
                        ps,
                        os_,
                        est.runtime_s.tolist(),
                        est.low_s.tolist(),
                        est.high_s.tolist(),
                        est.out_of_domain.tolist(),
                        strict=True,
                    )
                ],
            }
        )
        return 0
    if est is not None and len(ps) <= 20:
        print_table(
            "estimates",
            ["prompt", "output", "runtime ms", "95% interval ms", "domain"],
            [
                (
                    p,
                    o,
                    ms(r),
                    f"[{ms(lo)}, {ms(hi)}]" if hi > 0 else "",
                    "extrapolated" if ood else "ok",
                )
                for p, o, r, lo, hi, ood in zip(
                    ps, os_, est.runtime_s, est.low_s, est.high_s, est.out_of_domain, strict=True
                )
            ],
        )
    rows = [
        ("queries", str(summary.count)),
        ("total s", f"{summary.sum_s:.4f}"),
        ("mean ms", ms(summary.mean_s)),
        ("p50 ms", ms(summary.p50_s)),
        ("p90 ms", ms(summary.p90_s)),
        ("p99 ms", ms(summary.p99_s)),
        ("out of domain", str(summary.out_of_domain)),
    ]
    if summary.sum_high_s > 0:
        rows.insert(
            2, ("total 95% interval s", f"[{summary.sum_low_s:.4f}, {summary.sum_high_s:.4f}]")
        )
    print_table("workload (idealized runtime)", ["quantity", "value"], rows)
    return 0


def cmd_denoise(args: argparse.Namespace, s: Session) -> int:
    cm = s.metrics.denoise(
        args.profile,
        method=args.method,
        quantile=args.quantile,
        request_id=args.request_id or "",
        name=args.name or "",
    )
    if args.json:
        emit_json(cm)
    else:
        print_table("denoised cost model", ["quantity", "value"], cost_model_rows(cm))
    return 0


def cmd_cost(args: argparse.Namespace, s: Session) -> int:
    from idealrt.core.catalog import resolve

    ps, os_ = read_queries(args)
    spec = resolve(args.model) if args.model else None
    prices = {}
    for item in args.price or []:
        name, _, value = item.partition("=")
        prices[name] = float(value)
    rep = s.metrics.cost(
        args.cost_model,
        ps,
        os_,
        accelerator=args.accelerator,
        spec=spec,
        dtype=args.dtype,
        max_context=args.max_context,
        reserve_fraction=args.reserve,
        power_of_two=not args.no_power_of_two,
        prices=prices,
        grid_g_co2_per_kwh=args.grid_intensity,
    )
    if args.json:
        emit_json(rep)
    else:
        print_table(
            "cost",
            ["quantity", "value"],
            [
                ("accelerators", rep.accelerators),
                ("runtime s", f"{rep.runtime_s:.4f}"),
                ("accelerator-seconds", f"{rep.accelerator_s:.4f}"),
                ("dollars", f"{rep.dollars:.6f}"),
                (f"energy J ({rep.energy_source})", f"{rep.energy_j:.2f}"),
                ("CO2 g", f"{rep.co2_g:.3f}"),
                *([("energy not measured", rep.energy_error)] if rep.energy_error else []),
            ],
        )
    return 0


def cmd_roofline(args: argparse.Namespace, s: Session) -> int:
    from idealrt.core.catalog import resolve

    res = s.metrics.roofline(
        resolve(args.model),
        dtype=args.dtype,
        accelerator=args.accelerator,
        peak_flops=args.peak_flops,
        bandwidth=args.bandwidth,
        prompt_tokens=args.prompt_tokens,
        contexts=args.contexts,
        cost_model_id=args.cost_model or "",
    )
    if args.json:
        emit_json(res)
        return 0
    for phase in ("prefill", "decode"):
        print_table(
            f"roofline: {phase}",
            ["tokens", "bound ms", "fitted ms", "fraction"],
            [
                (
                    x["tokens"],
                    ms(x["lower_bound_s"]),
                    ms(x["fitted_s"]) if x["fitted_s"] else "",
                    f"{x['fraction_of_bound']:.1%}" if x["fitted_s"] else "",
                )
                for x in res[phase]
            ],
        )
    return 0


def cmd_compare(args: argparse.Namespace, s: Session) -> int:
    ps, os_ = read_queries(args)
    c = s.metrics.compare(args.a, args.b, ps, os_, bootstrap=args.bootstrap, seed=args.seed)
    if args.json:
        emit_json(c)
    else:
        print_table(
            "comparison (A / B)",
            ["quantity", "value"],
            [
                ("A total s", f"{c.a_total_s:.4f}"),
                ("B total s", f"{c.b_total_s:.4f}"),
                ("ratio A/B", f"{c.ratio:.4f}"),
                ("95% interval", f"[{c.low:.4f}, {c.high:.4f}]"),
                ("significant", "yes" if c.significant else "no"),
            ],
        )
    return 0


def cmd_export_helm(args: argparse.Namespace, s: Session) -> int:
    ids = {}
    for item in args.cost_model:
        name, sep, cid = item.partition("=")
        ids[name if sep else item] = cid if sep else item
    doc = s.metrics.export_helm(ids, args.prompt_tokens or ())
    text = json.dumps(doc, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        if not args.json:
            console.print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_import_helm(args: argparse.Namespace, s: Session) -> int:
    doc = json.loads(Path(args.file).read_text())
    cms = s.metrics.import_helm(
        doc,
        kind=args.kind,
        request_id=args.request_id or "",
        namespace=getattr(args, "namespace", "") or "",
    )
    if args.json:
        emit_json(cms)
    else:
        print_table(
            "imported cost models",
            ["id", "name", "beta0 ms", "knots", "overhead ms"],
            [(c.id, c.name, ms(c.beta0_s), len(c.alpha_knots_p), ms(c.overhead_s)) for c in cms],
        )
    return 0


def cmd_pareto(args: argparse.Namespace, s: Session) -> int:
    from idealrt.clients.cli._plots import plot_pareto

    ps, os_ = read_queries(args)
    ids: dict[str, str] = {}
    for item in args.cost_model:
        name, sep, cid = item.partition("=")
        if not sep:
            raise InvalidArgument(
                COST_MODEL_INVALID,
                f"--cost-model takes MODEL=ID, got {item!r}",
                field="cost_model",
            )
        ids[name] = cid
    result = s.metrics.pareto(ids, ps, os_, Path(args.accuracies).read_text())
    if args.plot:
        plot_pareto(
            result,
            Path(args.plot),
            cost_label="idealized runtime of the workload (s)",
            accuracy_label="accuracy",
            title="efficiency-capability frontier",
            log_cost=True,
        )
    if args.json:
        emit_json(result)
        return 0
    print_table(
        "efficiency-capability frontier",
        ["model", "accuracy", "runtime s", "frontier"],
        [
            (r.model, f"{r.accuracy:.4f}", f"{r.cost:.4f}", "*" if r.on_frontier else "")
            for r in result.rows
        ],
    )
    if args.plot:
        console.print(f"plot: {args.plot}")
    return 0
