"""Output of the CLI: rich tables for people, JSON (`--json`) for scripts."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from idealrt.core.domain import CostModel, Profile

__all__ = ["console", "cost_model_rows", "emit_json", "jsonable", "print_table", "profile_dict"]

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def emit_json(obj: Any) -> None:
    json.dump(jsonable(obj), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if c[:1].islower() is False else "left")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    console.print(table)


def profile_dict(p: Profile) -> dict[str, Any]:
    out: dict[str, Any] = jsonable(p)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def cost_model_rows(cm: CostModel) -> list[tuple[str, str]]:
    rows = [("cost model", cm.id), ("profile", cm.profile_id), ("kind", cm.kind)]
    for p, s in zip(cm.alpha_knots_p, cm.alpha_knots_s, strict=True):
        ci = cm.intervals.get(f"alpha@{p}")
        rows.append((f"alpha({p}) ms", ms(s) + (f"  [{ms(ci[0])}, {ms(ci[1])}]" if ci else "")))
    ci = cm.intervals.get("beta0")
    rows.append(
        ("beta0 ms/token", ms(cm.beta0_s) + (f"  [{ms(ci[0])}, {ms(ci[1])}]" if ci else ""))
    )
    ci = cm.intervals.get("beta1")
    rows.append(
        (
            "beta1 us/token/ctx",
            f"{cm.beta1_s * 1e6:.4f}" + (f"  [{ci[0] * 1e6:.4f}, {ci[1] * 1e6:.4f}]" if ci else ""),
        )
    )
    if cm.overhead_s:
        rows.append(("overhead ms", ms(cm.overhead_s)))
    q = cm.quality
    rows.append(
        (
            f"{q.method} error (n={q.points})",
            f"mean {q.mean_rel:.2%}  p95 {q.p95_rel:.2%}  max {q.max_rel:.2%}",
        )
    )
    rows.append(
        (
            "valid p / o",
            f"{cm.valid_prompt_tokens[0]}-{cm.valid_prompt_tokens[1]} / "
            f"{cm.valid_output_tokens[0]}-{cm.valid_output_tokens[1]}",
        )
    )
    return rows
