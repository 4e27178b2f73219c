"""`idealrt up | serve | models`."""

from __future__ import annotations

import argparse
import signal
import threading

from idealrt.clients.cli._render import console, emit_json, print_table

__all__ = ["cmd_models", "cmd_serve", "cmd_up"]


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def cmd_up(args: argparse.Namespace) -> int:
    from idealrt.services.suite import start_suite

    ports = {k: getattr(args, f"{k}_port") for k in ("store", "serving", "profiler", "metrics")}
    with start_suite(
        data_dir=args.data_dir, store_url=args.store_url, host=args.host, ports=ports
    ) as suite:
        if args.json:
            emit_json(suite.addresses())
        else:
            print_table(
                "idealrt suite (Ctrl-C to stop)",
                ["service", "address"],
                sorted(suite.addresses().items()),
            )
            console.print(
                "use: idealrt <command> --profiler {profiler} --metrics {metrics} "
                "--store {store}".format(**suite.addresses())
            )
        _wait_for_signal()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from idealrt.services.serve import serve_service

    try:
        return serve_service(
            args.service,
            address=args.address,
            store_target=args.store_target,
            serving_target=args.serving_target,
            store_url=args.store_url,
            # only what was given: otherwise the service's own IDEALRT_DATA_DIR holds
            data_dir=str(args.data_dir) if args.data_dir_given else "",
        )
    except ValueError as exc:  # configuration (TLS files, a plaintext public address)
        raise SystemExit(f"error: {exc}") from None


def cmd_models(args: argparse.Namespace) -> int:
    from idealrt.core.catalog import CATALOG

    rows = []
    for name, s in CATALOG.items():
        rows.append(
            {
                "name": name,
                "family": s.family,
                "layers": s.layers,
                "d_model": s.d_model,
                "heads": s.heads,
                "kv_heads": s.kv_heads_effective,
                "d_ff": s.d_ff,
                "vocab": s.vocab,
                "max_positions": s.max_positions,
                "params": s.param_count(),
                "fp16_bytes": s.weight_bytes("fp16"),
            }
        )
    if args.json:
        emit_json(rows)
        return 0
    print_table(
        "catalog",
        ["name", "family", "layers", "d_model", "heads", "kv", "params"],
        [
            (
                r["name"],
                r["family"],
                r["layers"],
                r["d_model"],
                r["heads"],
                r["kv_heads"],
                f"{int(str(r['params'])) / 1e9:.3f}B",
            )
            for r in rows
        ],
    )
    return 0
