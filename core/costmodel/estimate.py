"""Workload estimation: the idealized (or denoised) runtime of one query or millions.

A workload is a list of queries, each (prompt_tokens p, output_tokens o). Its runtime under a
cost model is the per-query prediction of `predict_runtime`, summarised as total, mean and
percentiles *over queries* (numpy's default linear interpolation between order statistics).

Two entry points share one definition:
- `estimate_workload(cm, p, o)`: the whole workload at once, vectorized.
- `WorkloadAccumulator`: the same result built chunk by chunk (client-streaming RPCs). It keeps
  every per-query runtime (8 bytes each; tens of millions are fine) so its percentiles are
  exact and identical to the one-shot function's; the total is summed exactly
  (`math.fsum` over chunk totals, each chunk summed pairwise by numpy).

A query outside the model's profiled domain (cm.valid_prompt_tokens / valid_output_tokens;
(0, 0) means "unknown" and never counts) is still estimated by extrapolation, and counted in
`out_of_domain` so callers can say how much of the answer is extrapolated.

Both take a `CostModel` or its `PreparedModel` (`predict.prepare`, what a service caching
models holds). Errors about a query name it as a request carries it: `queries[i].<name>`
for a list of query messages, `<name>[i]` for the packed columns (`columns=True`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from idealrt.core.costmodel.predict import PreparedModel, prepare
from idealrt.core.domain import CostModel
from idealrt.core.errors import InvalidArgument, ResourceExhausted
from idealrt.core.reasons import (
    PERCENTILE_OUT_OF_RANGE,
    QUERIES_SHAPE_INVALID,
    QUERIES_TYPE_INVALID,
    QUERY_TOKENS_INVALID,
    WORKLOAD_EMPTY,
    WORKLOAD_TOO_LARGE,
)

__all__ = [
    "DEFAULT_PERCENTILES",
    "MAX_ACCUMULATED_QUERIES",
    "WorkloadAccumulator",
    "WorkloadEstimate",
    "estimate_workload",
    "validate_queries",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
# Per-query runtimes kept by the accumulator: 50M x 8 bytes = 400 MB.
MAX_ACCUMULATED_QUERIES = 50_000_000


@dataclasses.dataclass(frozen=True)
class WorkloadEstimate:
    """Runtime of a workload, seconds. `percentiles` maps the requested percentile (0-100) to
    the per-query runtime at it. `runtimes_s` holds every query's runtime when requested."""

    count: int
    total_s: float
    mean_s: float
    percentiles: dict[float, float]
    out_of_domain: int
    runtimes_s: FloatArray | None = None


def _check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    if percentiles is DEFAULT_PERCENTILES:
        return DEFAULT_PERCENTILES
    out = tuple(float(q) for q in percentiles)
    for q in out:
        if not (0.0 <= q <= 100.0) or math.isnan(q):
            raise InvalidArgument(
                PERCENTILE_OUT_OF_RANGE,
                f"percentiles must lie in [0, 100], got {q}",
                field="percentiles",
            )
    return out


def _query_field(name: str, index: int, columns: bool) -> str:
    return f"{name}[{index}]" if columns else f"queries[{index}].{name}"


def _as_tokens(values: npt.ArrayLike, name: str, offset: int, columns: bool = False) -> IntArray:
    """Validate one token-count column: 1-D, integral, >= 1. Errors name the first bad query
    by its index in the whole workload (`offset` = queries seen before this chunk)."""
    arr = np.asarray(values)
    column = name if columns else f"queries.{name}"
    if arr.ndim != 1:
        raise InvalidArgument(
            QUERIES_SHAPE_INVALID,
            f"{name} must be a 1-D sequence of token counts, got shape {arr.shape}",
            field=column,
        )
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind  # np.issubdtype's answer, a good deal cheaper on one query
    if kind in "iu":
        bad = arr < 1 if arr.min() < 1 else None
    elif kind == "f":
        # NaN compares False, so `~(arr >= 1)` catches it along with values below 1.
        bad = ~(arr >= 1) | (arr != np.floor(arr)) | ~np.isfinite(arr)
    else:
        raise InvalidArgument(
            QUERIES_TYPE_INVALID,
            f"{name} must be integers, got dtype {arr.dtype}",
            field=column,
        )
    if bad is not None and bad.any():
        i = int(np.argmax(bad))
        field = _query_field(name, offset + i, columns)
        raise InvalidArgument(
            QUERY_TOKENS_INVALID,
            f"{field} must be an integer >= 1, got {arr[i].item()!r}",
            field=field,
        )
    return arr.astype(np.int64, copy=False)


def validate_queries(
    p: npt.ArrayLike, o: npt.ArrayLike, offset: int = 0, *, columns: bool = False
) -> tuple[IntArray, IntArray]:
    """Token-count columns of a workload as int64 arrays, or InvalidArgument naming the
    first bad query (`offset` = queries that came before, for streamed chunks; `columns`:
    name it as the packed request columns do, `prompt_tokens[i]`)."""
    pa = _as_tokens(p, "prompt_tokens", offset, columns)
    oa = _as_tokens(o, "output_tokens", offset, columns)
    if pa.shape != oa.shape:
        raise InvalidArgument(
            QUERIES_SHAPE_INVALID,
            f"prompt_tokens and output_tokens differ in length ({pa.size} vs {oa.size})",
            field="output_tokens" if columns else "queries",
        )
    return pa, oa


def _out_of_domain(cm: PreparedModel, p: IntArray, o: IntArray) -> int:
    return int(np.count_nonzero(cm.out_of_domain(p, o)))


def _summarise(
    runtimes: FloatArray,
    total: float,
    out_of_domain: int,
    percentiles: tuple[float, ...],
    keep_runtimes: bool,
) -> WorkloadEstimate:
    n = int(runtimes.size)
    if n == 0:
        raise InvalidArgument(
            WORKLOAD_EMPTY, "a workload needs at least one query", field="queries"
        )
    if n == 1:  # every percentile of one value is that value (np.percentile's too, exactly)
        only = float(runtimes[0])
        pcts = {q: only for q in percentiles}
    else:
        pct = np.percentile(runtimes, percentiles) if percentiles else np.zeros(0)
        pcts = {q: float(v) for q, v in zip(percentiles, np.atleast_1d(pct), strict=True)}
    return WorkloadEstimate(
        count=n,
        total_s=total,
        mean_s=total / n,
        percentiles=pcts,
        out_of_domain=out_of_domain,
        runtimes_s=runtimes if keep_runtimes else None,
    )


def estimate_workload(
    cm: CostModel | PreparedModel,
    p: npt.ArrayLike,
    o: npt.ArrayLike,
    *,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    keep_runtimes: bool = False,
    columns: bool = False,
) -> WorkloadEstimate:
    """Runtime of the workload {(p[i], o[i])} under `cm`: total, mean, percentiles over
    queries, and how many queries lie outside the profiled domain.

    Raises InvalidArgument (field `queries[i].prompt_tokens` / `queries[i].output_tokens`,
    naming the first bad index; `prompt_tokens[i]` with `columns`) when a token count is
    not an integer >= 1, and `WORKLOAD_EMPTY` for an empty workload."""
    pcts = _check_percentiles(percentiles)
    model = prepare(cm)
    pa, oa = validate_queries(p, o, columns=columns)
    runtimes = np.asarray(model.runtime(pa, oa), dtype=np.float64)
    return _summarise(
        runtimes, float(runtimes.sum()), _out_of_domain(model, pa, oa), pcts, keep_runtimes
    )


class WorkloadAccumulator:
    """Streaming form of `estimate_workload`: `add()` chunks as they arrive, `result()` once.

    Chunks are validated as they come (errors name the query's index in the whole stream), so
    a bad query is reported without waiting for the end of the stream."""

    def __init__(
        self,
        cm: CostModel | PreparedModel,
        *,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        max_queries: int = MAX_ACCUMULATED_QUERIES,
    ) -> None:
        self._cm = prepare(cm)
        self._percentiles = _check_percentiles(percentiles)
        self._max = max_queries
        self._chunks: list[FloatArray] = []
        self._chunk_totals: list[float] = []
        self._count = 0
        self._out_of_domain = 0

    @property
    def count(self) -> int:
        return self._count

    def add(self, p_chunk: npt.ArrayLike, o_chunk: npt.ArrayLike) -> None:
        pa, oa = validate_queries(p_chunk, o_chunk, offset=self._count)
        if pa.size == 0:
            return
        if self._count + pa.size > self._max:
            raise ResourceExhausted(
                WORKLOAD_TOO_LARGE,
                f"a streamed workload may hold at most {self._max} queries; "
                f"split it or estimate it in parts",
                field="queries",
            )
        runtimes = np.asarray(self._cm.runtime(pa, oa), dtype=np.float64)
        self._chunks.append(runtimes)
        self._chunk_totals.append(float(runtimes.sum()))
        self._count += int(pa.size)
        self._out_of_domain += _out_of_domain(self._cm, pa, oa)

    def result(self, *, keep_runtimes: bool = False) -> WorkloadEstimate:
        runtimes = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float64)
        return _summarise(
            runtimes,
            math.fsum(self._chunk_totals),
            self._out_of_domain,
            self._percentiles,
            keep_runtimes,
        )
