"""The `idealrt` command line. Every command accepts `--json`.

Without --profiler/--metrics/--store (or IDEALRT_PROFILER/METRICS/STORE) the CLI starts the
embedded suite in-process, with a SQLite store under --data-dir (default .idealrt/).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from idealrt.clients.cli._parse import duration_s, int_list, percent
from idealrt.clients.cli._render import err_console
from idealrt.clients.cli._session import Session, client_tls, client_token, open_session
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP
from idealrt.core.errors import IdealrtError

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace, Session], int]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default $IDEALRT_DATA_DIR, else .idealrt)",
    )
    p.add_argument(
        "--store-url",
        default="",
        help="embedded store URL (default SQLite in "
        "--data-dir; postgresql://... for a shared store)",
    )
    p.add_argument("--profiler", default="", help="profiler host:port of a deployed suite")
    p.add_argument("--metrics", default="", help="metrics host:port of a deployed suite")
    p.add_argument("--store", default="", help="store host:port of a deployed suite")
    p.add_argument(
        "--log-level",
        default=None,
        help="default $IDEALRT_LOG_LEVEL, else warning (info for `serve`)",
    )


def _tls_args(p: argparse.ArgumentParser) -> None:
    """The client side of TLS, for commands that connect to a deployed suite (the
    embedded one is plaintext on loopback and ignores them)."""
    p.add_argument(
        "--ca",
        default="",
        help="PEM CA the services' certificates must chain to (default $IDEALRT_TLS_CA; "
        "given, the connections use TLS)",
    )
    p.add_argument(
        "--cert",
        default="",
        help="PEM client certificate for mTLS (default $IDEALRT_TLS_CLIENT_CERT)",
    )
    p.add_argument(
        "--key",
        default="",
        help="PEM private key of --cert (default $IDEALRT_TLS_CLIENT_KEY)",
    )
    p.add_argument(
        "--token-file",
        default="",
        help="file holding the bearer token sent to the services (default "
        "$IDEALRT_TOKEN_FILE, else the token in $IDEALRT_TOKEN)",
    )


def _queries_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int_list)
    p.add_argument("--output-tokens", type=int_list)
    p.add_argument("--queries", help="JSONL file of {prompt_tokens, output_tokens}")


def build_parser() -> argparse.ArgumentParser:
    from idealrt.clients.cli import _demo, _metrics, _profile, _service, _token

    root = argparse.ArgumentParser(prog="idealrt", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    def add(
        name: str,
        fn: Command | Callable[[argparse.Namespace], int],
        help: str,
        session: bool = True,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p)
        if session:
            _tls_args(p)
        p.set_defaults(fn=fn, needs_session=session)
        return p

    p = add(
        "up",
        _service.cmd_up,
        "run all four services in one process; prints the ports",
        session=False,
    )
    p.add_argument("--host", default="127.0.0.1")
    for svc in ("store", "serving", "profiler", "metrics"):
        p.add_argument(f"--{svc}-port", type=int, default=0)

    p = add("serve", _service.cmd_serve, "run one service", session=False)
    p.add_argument("service", choices=["store", "serving", "profiler", "metrics"])
    p.add_argument("--address", default="")
    p.add_argument("--store-target", default="", help="store host:port (profiler, metrics)")
    p.add_argument("--serving-target", default="", help="default serving host:port (profiler)")

    p = add("demo", _demo.cmd_demo, "profile GPT-2 small on pytorch/cpu, fit, check, estimate")
    p.add_argument("--model", default="gpt2")

    add("models", _service.cmd_models, "the architecture catalog", session=False)
    add(
        "token-hash",
        _token.cmd_token_hash,
        "print the sha256 of a token read from stdin, for IDEALRT_AUTH_TOKENS_FILE",
        session=False,
    )

    p = add("profile", _profile.cmd_profile, "measure a model on a stack over a grid")
    p.add_argument("--model", default="", help="catalog name (see `idealrt models`)")
    p.add_argument("--config", default="", help="a Hugging Face config.json")
    p.add_argument("--weights", default="", help="local safetensors file or HF directory")
    p.add_argument(
        "--backend",
        default="pytorch",
        choices=["pytorch", "onnxruntime", "tensorrt", "transformers"],
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--option", action="append", help="backend option KEY=VALUE (repeatable)")
    p.add_argument("--prompt-tokens", type=int_list, default=(1, 64, 256, 512))
    p.add_argument("--output-tokens", type=int_list, default=(1, 8, 32))
    p.add_argument(
        "--economical",
        action="store_true",
        help="the economical plan up to the largest --prompt-tokens and --output-tokens: six "
        "prompt sizes where alpha bends, outputs {1, max}, 1 repeat, no warm-ups",
    )
    p.add_argument("--holdout-prompt-tokens", type=int_list)
    p.add_argument("--holdout-output-tokens", type=int_list)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmups", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-randomize", action="store_true")
    p.add_argument("--until-ci", type=percent, help="repeat until CI half-width < this, e.g. 1%%")
    p.add_argument("--budget", type=duration_s, help="wall-clock budget, e.g. 10m")
    p.add_argument(
        "--adaptive-target",
        type=percent,
        help="add prompt sizes where alpha(p) is least certain until its 95%% CI half-width "
        "is within this everywhere, e.g. 2%% (below 50%%)",
    )
    p.add_argument(
        "--adaptive-max-sizes",
        type=int,
        help="at most this many added prompt sizes (0-64; default 8)",
    )
    p.add_argument(
        "--spread",
        type=duration_s,
        help="spread the rounds over this long, e.g. 30m (holds the device lease meanwhile; "
        "meant for HTTP targets)",
    )
    p.add_argument("--lease", choices=["wait", "fail"], default="wait")
    p.add_argument(
        "--namespace",
        default="",
        help="the namespace the profile (and its cost model) belongs to (default: default)",
    )
    p.add_argument("--target", default="", help="serving host:port to measure")
    p.add_argument("--target-kind", choices=["serving", "http"], default="serving")
    p.add_argument("--base-url", default="", help="http: OpenAI-compatible base URL")
    p.add_argument("--api-model", default="", help="http: model name for the API")
    p.add_argument(
        "--credential",
        default="",
        help="http: id of an API credential configured on the profiler (IDEALRT_OUTBOUND_CONFIG)",
    )
    p.add_argument("--tokenizer", default="", help="http: local tokenizer directory")
    p.add_argument(
        "--target-option",
        action="append",
        help="http: KEY=VALUE (stream=0, prompt_format=token_ids, ...)",
    )
    p.add_argument(
        "--gpu-product",
        default="",
        help="kubernetes executor: run on a node whose nvidia.com/gpu.product label is this, "
        "e.g. NVIDIA-H100-80GB-HBM3",
    )
    p.add_argument(
        "--node-pool",
        default="",
        help="kubernetes executor: run in this node pool (the value of the profiler's "
        "node-pool label)",
    )
    p.add_argument(
        "--whole-node",
        action="store_true",
        help="kubernetes executor: take every GPU of the node, not the configured count",
    )
    p.add_argument("--request-id", default="")
    p.add_argument("--no-wait", action="store_true", help="return once created")

    p = add("watch", _profile.cmd_watch, "follow a profile with a progress bar")
    p.add_argument("id")
    p = add("cancel", _profile.cmd_cancel, "stop a profile, keeping what was measured")
    p.add_argument("id")
    p = add("profiles", _profile.cmd_profiles, "list profiles")
    p.add_argument("--page-size", type=int, default=50)
    p.add_argument("--page-token", default="")

    p = add(
        "import-samples",
        _profile.cmd_import_samples,
        "import measurements from CSV (prompt_tokens, output_tokens, prefill_ns, "
        "decode_ns ';'-joined or total_ns) as a profile",
    )
    p.add_argument("file")
    p.add_argument("--name", default="")
    p.add_argument(
        "--backend",
        default="pytorch",
        choices=["pytorch", "onnxruntime", "tensorrt", "transformers"],
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--request-id", default="")

    p = add("fit", _metrics.cmd_fit, "fit the idealized-runtime cost model to a profile")
    p.add_argument("--profile", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--fit-overhead", action="store_true")
    p.add_argument("--constant-beta", action="store_true", help="the paper's constant beta")
    p.add_argument("--bootstrap", type=int, default=0, help="replicates (0: server default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-id", default="")

    p = add("estimate", _metrics.cmd_estimate, "estimate one query or a workload")
    p.add_argument("--cost-model", required=True)
    p.add_argument(
        "--intervals",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="95%% bootstrap intervals per query and on the total (--no-intervals: the "
        "point estimates alone, which cost the server less)",
    )
    _queries_args(p)

    p = add("denoise", _metrics.cmd_denoise, "denoised cost model of an API profile")
    p.add_argument("--profile", required=True)
    p.add_argument("--method", choices=["quantile", "min"], default="quantile")
    p.add_argument("--quantile", type=float, default=0.1)
    p.add_argument("--name", default="")
    p.add_argument("--request-id", default="")

    p = add("cost", _metrics.cmd_cost, "accelerators, dollars, energy and CO2 of a workload")
    p.add_argument("--cost-model", required=True)
    p.add_argument("--model", default="", help="catalog name (for accelerator memory)")
    p.add_argument("--accelerator", default="A100-80GB")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--max-context", type=int, default=0)
    p.add_argument("--reserve", type=float, default=0.1)
    p.add_argument("--no-power-of-two", action="store_true")
    p.add_argument("--price", action="append", help="ACCELERATOR=USD_PER_HOUR override")
    p.add_argument("--grid-intensity", type=float, default=0.0, help="g CO2 per kWh")
    _queries_args(p)

    p = add("roofline", _metrics.cmd_roofline, "roofline bounds and fraction reached")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--peak-flops", type=float, default=0.0)
    p.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s")
    p.add_argument("--prompt-tokens", type=int_list, default=(1, 128, 512))
    p.add_argument("--contexts", type=int_list, default=(128, 512))
    p.add_argument("--cost-model", default="")

    p = add("compare", _metrics.cmd_compare, "stack A vs stack B on a workload")
    p.add_argument("--a", required=True, help="profile id of A")
    p.add_argument("--b", required=True, help="profile id of B")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
    p.add_argument("--seed", type=int, default=0)
    _queries_args(p)

    p = add("pareto", _metrics.cmd_pareto, "efficiency-capability Pareto frontier")
    p.add_argument("--accuracies", required=True, help="CSV: model,accuracy")
    p.add_argument("--cost-model", action="append", required=True, help="MODEL=COST_MODEL_ID")
    p.add_argument("--plot", default="", help="write a PNG here")
    _queries_args(p)

    p = add("export-helm", _metrics.cmd_export_helm, "export fits as HELM efficiency JSON")
    p.add_argument("--cost-model", action="append", required=True, help="[HELM_NAME=]ID")
    p.add_argument("--prompt-tokens", type=int_list)
    p.add_argument("--output", "-o", default="")

    p = add("import-helm", _metrics.cmd_import_helm, "import HELM efficiency JSON")
    p.add_argument("file")
    p.add_argument("--kind", choices=["idealized", "denoised"], default="idealized")
    p.add_argument("--request-id", default="")
    p.add_argument("--namespace", default="", help="store the cost models there (default)")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    from idealrt.core.logging import configure_logging

    args = build_parser().parse_args(argv)
    serving_one = getattr(args, "command", "") == "serve"
    env_dir = os.environ.get("IDEALRT_DATA_DIR", "")
    args.data_dir_given = args.data_dir is not None
    args.data_dir = args.data_dir or Path(env_dir or ".idealrt")
    level = args.log_level or os.environ.get("IDEALRT_LOG_LEVEL", "")
    configure_logging(
        level or ("info" if serving_one else "warning"),
        service=args.service if serving_one else "cli",
    )
    try:
        if not args.needs_session:
            return int(args.fn(args))
        with open_session(
            data_dir=args.data_dir,
            store_url=args.store_url,
            profiler=args.profiler,
            metrics=args.metrics,
            store=args.store,
            serving_target=getattr(args, "target", "") or "",
            tls=client_tls(args.ca, args.cert, args.key),
            token=client_token(args.token_file),
        ) as session:
            return int(args.fn(args, session))
    except IdealrtError as err:
        where = f" (field {err.field})" if err.field else ""
        err_console.print(f"[red]error[/red] {err.code.name} {err.reason}{where}: {err.message}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
