"""Read measurements made by other tools from CSV, so they can be fitted too.

Columns (header required): prompt_tokens, output_tokens, prefill_ns, and either decode_ns
(the o-1 per-step times joined with ';') or total_ns (or both). Optional: heldout (0/1),
batch_size, and timing: how the row's times were obtained (core.domain.SampleTiming:
server_steps, stream_tokens, stream_chunks, totals_only). Without a timing column, a row
with its o-1 steps (or o = 1) is server_steps, one with a total and no steps
stream_chunks (its prefill is the tool's measured time to first token, the steps are
unknown); a timing with per-step times needs the steps and a prefill_ns >= 1 (0 means
unknown, allowed for stream_chunks and totals_only). Every row is checked; the first
bad row is an InvalidArgument naming line and column, and nothing is imported.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from idealrt.clients.reasons import CSV_COLUMNS_MISSING, CSV_EMPTY, CSV_VALUE_INVALID
from idealrt.core.domain import Sample, SampleTiming
from idealrt.core.errors import InvalidArgument

__all__ = ["read_samples_csv"]

REQUIRED = ("prompt_tokens", "output_tokens", "prefill_ns")


def _int(row: dict[str, str], col: str, line: int, minimum: int) -> int:
    raw = (row.get(col) or "").strip()
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(
            CSV_VALUE_INVALID,
            f"line {line}: column {col} must be an integer >= {minimum}, got {raw!r}",
            field=col,
        ) from None
    if value < minimum:
        raise InvalidArgument(
            CSV_VALUE_INVALID,
            f"line {line}: column {col} must be >= {minimum}, got {value}",
            field=col,
        )
    return value


_TIMINGS = {t.value: t for t in SampleTiming}


def _timing(row: dict[str, str], line: int, *, has_steps: bool) -> SampleTiming:
    raw = (row.get("timing") or "").strip().lower()
    if not raw:
        return SampleTiming.SERVER_STEPS if has_steps else SampleTiming.STREAM_CHUNKS
    timing = _TIMINGS.get(raw)
    if timing is None:
        raise InvalidArgument(
            CSV_VALUE_INVALID,
            f"line {line}: column timing must be one of {', '.join(_TIMINGS)}, got {raw!r}",
            field="timing",
        )
    if timing.has_steps and not has_steps:
        raise InvalidArgument(
            CSV_VALUE_INVALID,
            f"line {line}: timing {raw} has per-step times, but decode_ns is empty",
            field="timing",
        )
    return timing


def read_samples_csv(text: str | Iterable[str]) -> list[Sample]:
    reader = csv.DictReader(io.StringIO(text) if isinstance(text, str) else text)
    cols = set(reader.fieldnames or ())
    missing = [c for c in REQUIRED if c not in cols]
    if missing or not ({"decode_ns", "total_ns"} & cols):
        need = missing + ([] if {"decode_ns", "total_ns"} & cols else ["decode_ns or total_ns"])
        raise InvalidArgument(
            CSV_COLUMNS_MISSING,
            f"CSV header lacks {', '.join(need)}; have {sorted(cols)}",
            field="header",
        )
    out: list[Sample] = []
    for line, row in enumerate(reader, start=2):
        p = _int(row, "prompt_tokens", line, 1)
        o = _int(row, "output_tokens", line, 1)
        prefill = _int(row, "prefill_ns", line, 0)  # 0: unknown (see the timing below)
        steps: tuple[int, ...] = ()
        raw_steps = (row.get("decode_ns") or "").strip()
        if raw_steps:
            try:
                steps = tuple(int(x) for x in raw_steps.split(";") if x.strip())
            except ValueError:
                raise InvalidArgument(
                    CSV_VALUE_INVALID,
                    f"line {line}: decode_ns must be ';'-joined integers",
                    field="decode_ns",
                ) from None
            if len(steps) != o - 1 or any(s <= 0 for s in steps):
                raise InvalidArgument(
                    CSV_VALUE_INVALID,
                    f"line {line}: decode_ns must hold output_tokens-1 = {o - 1} positive step "
                    f"times, got {len(steps)}",
                    field="decode_ns",
                )
        raw_total = (row.get("total_ns") or "").strip()
        total = _int(row, "total_ns", line, 1) if raw_total else prefill + sum(steps)
        if not raw_steps and not raw_total and not (o == 1 and "decode_ns" in cols):
            raise InvalidArgument(
                CSV_VALUE_INVALID, f"line {line}: give decode_ns or total_ns", field="total_ns"
            )
        if total < prefill + sum(steps):
            raise InvalidArgument(
                CSV_VALUE_INVALID,
                f"line {line}: total_ns {total} is less than prefill_ns + sum(decode_ns) "
                f"= {prefill + sum(steps)}",
                field="total_ns",
            )
        timing = _timing(row, line, has_steps=bool(steps) or o == 1)
        if prefill == 0 and timing.has_steps:
            raise InvalidArgument(
                CSV_VALUE_INVALID,
                f"line {line}: column prefill_ns must be >= 1 for timing {timing.value} (0 "
                "means unknown: only stream_chunks and totals_only rows may leave it out)",
                field="prefill_ns",
            )
        heldout = (row.get("heldout") or "0").strip().lower() in ("1", "true", "yes")
        batch = _int(row, "batch_size", line, 1) if (row.get("batch_size") or "").strip() else 1
        out.append(
            Sample(
                prompt_tokens=p,
                output_tokens=o,
                prefill_ns=prefill,
                decode_ns=steps,
                total_ns=total,
                batch_size=batch,
                heldout=heldout,
                timing=timing,
            )
        )
    if not out:
        raise InvalidArgument(CSV_EMPTY, "the CSV file has no rows", field="file")
    return out
