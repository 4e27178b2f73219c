"""`idealrt profile | watch | cancel | profiles | import-samples`."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from idealrt.clients.cli._render import console, emit_json, err_console, print_table
from idealrt.clients.cli._session import Session
from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.samples_csv import read_samples_csv
from idealrt.core.domain import (
    DEFAULT_NAMESPACE,
    Backend,
    LeasePolicy,
    ModelRef,
    Placement,
    Profile,
    ProfilePlan,
    ProfileState,
    StackSpec,
    Target,
    TargetKind,
)
from idealrt.core.errors import InvalidArgument
from idealrt.core.plans import economical_plan
from idealrt.core.reasons import MODEL_REQUIRED, OPTION_INVALID

__all__ = [
    "build_profile",
    "cmd_cancel",
    "cmd_import_samples",
    "cmd_profile",
    "cmd_profiles",
    "cmd_watch",
    "watch_with_progress",
]


def _options(items: list[str] | None, field: str = "stack.options") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(
                OPTION_INVALID, f"options take KEY=VALUE, got {item!r}", field=field
            )
        out[key] = value
    return out


def build_profile(args: argparse.Namespace) -> Profile:
    if args.target_kind == "http":
        model = ModelRef(name=args.model or args.api_model or "http-api")
    elif args.config:
        from idealrt.core.hf_config import spec_from_hf_config

        spec = spec_from_hf_config(Path(args.config))
        model = ModelRef(name=spec.name, spec=spec, seed=args.seed, weights_path=args.weights or "")
    elif args.model:
        model = ModelRef(name=args.model, seed=args.seed, weights_path=args.weights or "")
    else:
        raise InvalidArgument(MODEL_REQUIRED, "give --model NAME or --config PATH", field="model")
    stack = StackSpec(
        backend=Backend(args.backend),
        device=args.device,
        dtype=args.dtype,
        options=_options(args.option),
    )
    grid = ProfilePlan(args.prompt_tokens, args.output_tokens, args.repeats, args.warmups)
    if args.economical:
        grid = economical_plan(max(args.prompt_tokens), max(args.output_tokens))
    plan = ProfilePlan(
        prompt_tokens=grid.prompt_tokens,
        output_tokens=grid.output_tokens,
        repeats=grid.repeats,
        warmups=grid.warmups,
        holdout_prompt_tokens=args.holdout_prompt_tokens or (),
        holdout_output_tokens=args.holdout_output_tokens or (),
        seed=args.seed,
        randomize=not args.no_randomize,
        until_ci_rel=args.until_ci or 0.0,
        budget_s=args.budget or 0.0,
        lease=LeasePolicy(args.lease),
        adaptive_target_rel=args.adaptive_target or 0.0,
        adaptive_max_prompt_sizes=args.adaptive_max_sizes or 0,
        spread_s=args.spread or 0.0,
    )
    if args.target_kind == "http":
        target = Target(
            kind=TargetKind.HTTP,
            base_url=args.base_url or "",
            api_model=args.api_model or "",
            credential=args.credential or "",
            tokenizer=args.tokenizer or "",
            options=_options(getattr(args, "target_option", None), "profile.target.options"),
        )
    else:
        target = Target(kind=TargetKind.SERVING, address=args.target or "")
    return Profile(
        id="",
        model=model,
        stack=stack,
        plan=plan,
        target=target,
        request_id=args.request_id or uuid.uuid4().hex,
        namespace=getattr(args, "namespace", "") or DEFAULT_NAMESPACE,
        placement=Placement(
            gpu_product=getattr(args, "gpu_product", "") or "",
            node_pool=getattr(args, "node_pool", "") or "",
            whole_node=bool(getattr(args, "whole_node", False)),
        ),
    )


def _state(p: Profile) -> str:
    """The state as a list or a progress bar prints it: a queued profile's with its place
    in the profiler's queue ("queued #3": two profiles run before it)."""
    if p.state == ProfileState.QUEUED and p.queue_position > 0:
        return f"{p.state.value} #{p.queue_position}"
    return p.state.value


def _placement(p: Profile) -> str:
    parts = [
        f"gpu_product={p.placement.gpu_product}" if p.placement.gpu_product else "",
        f"node_pool={p.placement.node_pool}" if p.placement.node_pool else "",
        "whole_node" if p.placement.whole_node else "",
    ]
    return " ".join(x for x in parts if x)


def watch_with_progress(client: ProfilerClient, profile: Profile, quiet: bool = False) -> Profile:
    """Follow a profile to its end with a progress bar on stderr (server-streamed, no polling)."""
    last = profile
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    ) as bar:
        task = bar.add_task(f"profiling {profile.id}", total=profile.total_samples or None)
        try:
            for update in client.watch(profile.id):
                last = update
                bar.update(
                    task,
                    total=update.total_samples or None,
                    completed=update.completed_samples,
                    description=f"{update.id} {_state(update)}",
                )
        except KeyboardInterrupt:
            err_console.print(f"cancelling {profile.id} (measured samples are kept)")
            last = client.cancel(profile.id)
    return last


def _print_profile(p: Profile) -> None:
    rows = [
        ("id", p.id),
        ("state", p.state.value),
        ("model", p.model.name),
        ("stack", f"{p.stack.backend.value} {p.stack.device} {p.stack.dtype}"),
        ("samples", f"{p.completed_samples}/{p.total_samples}"),
    ]
    if p.state == ProfileState.QUEUED and p.queue_position > 0:
        rows.insert(2, ("queue position", f"{p.queue_position} (1: runs next)"))
    if not p.placement.empty:
        rows.append(("placement", _placement(p)))
    if p.error:
        rows.append(("error", p.error))
    print_table("profile", ["field", "value"], rows)


def cmd_profile(args: argparse.Namespace, s: Session) -> int:
    created = s.profiler.create_profile(build_profile(args))
    final = created if args.no_wait else watch_with_progress(s.profiler, created, args.json)
    if args.json:
        emit_json(final)
    else:
        _print_profile(final)
    return (
        0
        if final.state in (ProfileState.SUCCEEDED, ProfileState.QUEUED, ProfileState.RUNNING)
        else 1
    )


def cmd_watch(args: argparse.Namespace, s: Session) -> int:
    final = watch_with_progress(s.profiler, s.profiler.get_profile(args.id), quiet=args.json)
    if args.json:
        emit_json(final)
    else:
        _print_profile(final)
    return 0 if final.state == ProfileState.SUCCEEDED else 1


def cmd_cancel(args: argparse.Namespace, s: Session) -> int:
    p = s.profiler.cancel(args.id)
    if args.json:
        emit_json(p)
    else:
        _print_profile(p)
    return 0


def cmd_profiles(args: argparse.Namespace, s: Session) -> int:
    items, token = s.profiler.list_profiles(args.page_size, args.page_token)
    if args.json:
        emit_json({"profiles": items, "next_page_token": token})
        return 0
    print_table(
        "profiles",
        ["id", "state", "model", "stack", "samples", "created"],
        [
            (
                p.id,
                _state(p),
                p.model.name,
                f"{p.stack.backend.value}/{p.stack.device}/{p.stack.dtype}",
                f"{p.completed_samples}/{p.total_samples}",
                p.create_time.isoformat(timespec="seconds") if p.create_time else "",
            )
            for p in items
        ],
    )
    if token:
        console.print(f"next page: --page-token {token}")
    return 0


def cmd_import_samples(args: argparse.Namespace, s: Session) -> int:
    samples = read_samples_csv(Path(args.file).read_text())
    ps = sorted({x.prompt_tokens for x in samples if not x.heldout})
    os_ = sorted({x.output_tokens for x in samples if not x.heldout})
    prof = Profile(
        id="",
        model=ModelRef(name=args.name or Path(args.file).stem),
        stack=StackSpec(backend=Backend(args.backend), device=args.device, dtype=args.dtype),
        plan=ProfilePlan(
            prompt_tokens=tuple(ps) or (1,), output_tokens=tuple(os_) or (1,), repeats=1, warmups=0
        ),
        state=ProfileState.QUEUED,
        request_id=args.request_id or uuid.uuid4().hex,
        total_samples=len(samples),
    )
    stored, _ = s.store.create_profile(prof)
    s.store.append_samples(stored.id, f"{stored.id}-import", samples)
    stored.state = ProfileState.SUCCEEDED
    stored.completed_samples = len(samples)
    stored.provenance.entries["source"] = f"import-samples {Path(args.file).name}"
    final = s.store.update_profile(stored)
    if args.json:
        emit_json({"profile_id": final.id, "samples": len(samples)})
    else:
        console.print(f"imported {len(samples)} samples as profile {final.id}")
    return 0
