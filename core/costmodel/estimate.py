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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from idealrt.core.costmodel.predict import predict_runtime
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
    out = tuple(float(q) for q in percentiles)
    for q in out:
        if not (0.0 <= q <= 100.0) or math.isnan(q):
            raise InvalidArgument(
                PERCENTILE_OUT_OF_RANGE,
                f"percentiles must lie in [0, 100], got {q}",
                field="percentiles",
            )
    return out


def _as_tokens(values: npt.ArrayLike, name: str, offset: int) -> IntArray:
    """Validate one token-count column: 1-D, integral, >= 1. Errors name the first bad query
    by its index in the whole workload (`offset` = queries seen before this chunk)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InvalidArgument(
            QUERIES_SHAPE_INVALID,
            f"{name} must be a 1-D sequence of token counts, got shape {arr.shape}",
            field=f"queries.{name}",
        )
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        bad = arr < 1
    elif np.issubdtype(arr.dtype, np.floating):
        # NaN compares False, so `~(arr >= 1)` catches it along with values below 1.
        bad = ~(arr >= 1) | (arr != np.floor(arr)) | ~np.isfinite(arr)
    else:
        raise InvalidArgument(
            QUERIES_TYPE_INVALID,
            f"{name} must be integers, got dtype {arr.dtype}",
            field=f"queries.{name}",
        )
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(
            QUERY_TOKENS_INVALID,
            f"queries[{offset + i}].{name} must be an integer >= 1, got {arr[i].item()!r}",
            field=f"queries[{offset + i}].{name}",
        )
    return arr.astype(np.int64, copy=False)


def validate_queries(
    p: npt.ArrayLike, o: npt.ArrayLike, offset: int = 0
) -> tuple[IntArray, IntArray]:
    """Token-count columns of a workload as int64 arrays, or InvalidArgument naming the
    first bad query (`offset` = queries that came before, for streamed chunks)."""
    pa = _as_tokens(p, "prompt_tokens", offset)
    oa = _as_tokens(o, "output_tokens", offset)
    if pa.shape != oa.shape:
        raise InvalidArgument(
            QUERIES_SHAPE_INVALID,
            f"prompt_tokens and output_tokens differ in length ({pa.size} vs {oa.size})",
            field="queries",
        )
    return pa, oa


def _out_of_domain(cm: CostModel, p: IntArray, o: IntArray) -> int:
    mask = np.zeros(p.shape, dtype=bool)
    plo, phi = cm.valid_prompt_tokens
    if (plo, phi) != (0, 0):
        mask |= (p < plo) | (p > phi)
    olo, ohi = cm.valid_output_tokens
    if (olo, ohi) != (0, 0):
        mask |= (o < olo) | (o > ohi)
    return int(np.count_nonzero(mask))


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
    pct = np.percentile(runtimes, percentiles) if percentiles else np.zeros(0)
    return WorkloadEstimate(
        count=n,
        total_s=total,
        mean_s=total / n,
        percentiles={q: float(v) for q, v in zip(percentiles, np.atleast_1d(pct), strict=True)},
        out_of_domain=out_of_domain,
        runtimes_s=runtimes if keep_runtimes else None,
    )


def estimate_workload(
    cm: CostModel,
    p: npt.ArrayLike,
    o: npt.ArrayLike,
    *,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    keep_runtimes: bool = False,
) -> WorkloadEstimate:
    """Runtime of the workload {(p[i], o[i])} under `cm`: total, mean, percentiles over
    queries, and how many queries lie outside the profiled domain.

    Raises InvalidArgument (field `queries[i].prompt_tokens` / `queries[i].output_tokens`,
    naming the first bad index) when a token count is not an integer >= 1, and
    `WORKLOAD_EMPTY` for an empty workload."""
    pcts = _check_percentiles(percentiles)
    pa, oa = validate_queries(p, o)
    runtimes = np.asarray(predict_runtime(cm, pa, oa), dtype=np.float64)
    return _summarise(
        runtimes, float(runtimes.sum()), _out_of_domain(cm, pa, oa), pcts, keep_runtimes
    )


class WorkloadAccumulator:
    """Streaming form of `estimate_workload`: `add()` chunks as they arrive, `result()` once.

    Chunks are validated as they come (errors name the query's index in the whole stream), so
    a bad query is reported without waiting for the end of the stream."""

    def __init__(
        self,
        cm: CostModel,
        *,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        max_queries: int = MAX_ACCUMULATED_QUERIES,
    ) -> None:
        self._cm = cm
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
        runtimes = np.asarray(predict_runtime(self._cm, pa, oa), dtype=np.float64)
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
