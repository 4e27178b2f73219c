"""Checks of the metrics service's requests, before any work: every number finite and in
its range, queries within the per-call limit, JSON documents within their size and depth.
The engine calls them (the servicer only converts); each raises InvalidArgument naming the
request field, with the reason clients already match for that field where one exists.

The limits of one request (`RequestLimits`) come from `MetricsConfig`; the server builds
them with `RequestLimits.from_config` and hands them to the engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from idealrt.core.config import MetricsConfig
from idealrt.core.costmodel.options import FitOptions
from idealrt.core.errors import invalid
from idealrt.core.model_spec import check_max_context
from idealrt.services.metrics.reasons import (
    BOOTSTRAP_INVALID,
    GRID_INTENSITY_INVALID,
    HARDWARE_LIMITS_INVALID,
    INVALID_HELM_JSON,
    JSON_TOO_DEEP,
    JSON_TOO_LARGE,
    KIND_INVALID,
    PRICE_INVALID,
    QUANTILE_INVALID,
    QUERIES_TOO_MANY,
    RESERVE_FRAC_INVALID,
    SEED_INVALID,
    TOKENS_INVALID,
)

if TYPE_CHECKING:
    from idealrt.services.metrics.engine import CostRequest, RooflineRequest

__all__ = [
    "MAX_COMPARE_BOOTSTRAP",
    "MAX_FIT_BOOTSTRAP",
    "MAX_TOKENS",
    "RequestLimits",
    "check_compare",
    "check_cost",
    "check_fit_options",
    "check_import_kind",
    "check_quantile",
    "check_queries",
    "check_roofline",
    "json_depth",
    "parse_json",
]

MAX_FIT_BOOTSTRAP = 10_000  # replicates of one fit
MAX_COMPARE_BOOTSTRAP = 5_000  # replicates of each side of a comparison
MAX_TOKENS = 2**31 - 1  # token counts travel as int32


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may carry (see MetricsConfig): queries in a unary call, and the
    size (UTF-8 bytes) and nesting depth of a JSON document."""

    max_queries_per_call: int = MetricsConfig.max_queries_per_call
    max_json_bytes: int = MetricsConfig.max_json_bytes
    max_json_depth: int = MetricsConfig.max_json_depth

    @classmethod
    def from_config(cls, cfg: MetricsConfig) -> RequestLimits:
        return cls(
            max_queries_per_call=cfg.max_queries_per_call,
            max_json_bytes=cfg.max_json_bytes,
            max_json_depth=cfg.max_json_depth,
        )


def _shown(name: str) -> str:
    """A request's key as an error names it: cut to 64 characters, so errors stay small."""
    return name if len(name) <= 64 else f"{name[:64]}..."


def _finite(value: float, field: str, reason: str, what: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise invalid(field, reason, f"{field} must be {what}, got {v}")
    return v


def check_queries(count: int, limits: RequestLimits, field: str = "queries") -> None:
    """At most limits.max_queries_per_call queries in one unary call (`field`: where the
    request carries them, `queries` or the `prompt_tokens` column)."""
    if count > limits.max_queries_per_call:
        raise invalid(
            field,
            QUERIES_TOO_MANY,
            f"{field}: a unary call takes at most {limits.max_queries_per_call} queries, got "
            f"{count}; estimate larger workloads with StreamEstimateRuntime",
        )


def check_fit_options(options: FitOptions) -> None:
    """FitOptions.validate (every float finite, seed >= 0, ...) and at most
    MAX_FIT_BOOTSTRAP replicates."""
    if options.bootstrap > MAX_FIT_BOOTSTRAP:
        raise invalid(
            "options.bootstrap",
            BOOTSTRAP_INVALID,
            f"options.bootstrap must be <= {MAX_FIT_BOOTSTRAP}, got {options.bootstrap}",
        )
    options.validate()


def check_quantile(quantile: float) -> None:
    """The denoising quantile: in (0, 0.5) (a low quantile; NaN is refused)."""
    if not 0.0 < quantile < 0.5:
        raise invalid("quantile", QUANTILE_INVALID, f"quantile must be in (0, 0.5), got {quantile}")


def check_compare(bootstrap: int, seed: int) -> None:
    """Replicates per side in [0, MAX_COMPARE_BOOTSTRAP] (0: the default) and a seed >= 0."""
    if not 0 <= bootstrap <= MAX_COMPARE_BOOTSTRAP:
        raise invalid(
            "bootstrap",
            BOOTSTRAP_INVALID,
            f"bootstrap must be in [0, {MAX_COMPARE_BOOTSTRAP}], got {bootstrap}",
        )
    if seed < 0:
        raise invalid("seed", SEED_INVALID, f"seed must be an integer >= 0, got {seed}")


def check_import_kind(kind: str) -> None:
    """ImportHelm's kind: idealized, denoised or "" (the table says which it is)."""
    if kind not in ("idealized", "denoised", ""):
        raise invalid("kind", KIND_INVALID, "kind must be idealized or denoised")


def check_cost(req: CostRequest) -> None:
    """ComputeCost's numbers: reserve_fraction in [0, 1), every price finite and >= 0,
    grid intensity finite and >= 0, max_context >= 0 (its upper end is the model's)."""
    if not 0.0 <= req.reserve_fraction < 1.0:
        raise invalid(
            "reserve_fraction",
            RESERVE_FRAC_INVALID,
            f"reserve_fraction must be in [0, 1), got {req.reserve_fraction}",
        )
    for name, price in (req.prices or {}).items():
        field = f"price_per_hour_usd[{_shown(name)}]"
        if not _finite(price, field, PRICE_INVALID, "a finite number >= 0 USD") >= 0.0:
            raise invalid(field, PRICE_INVALID, f"{field} must be >= 0 USD, got {price}")
    if req.grid_g_co2_per_kwh is not None:
        g = _finite(req.grid_g_co2_per_kwh, "grid_g_co2_per_kwh", GRID_INTENSITY_INVALID, "finite")
        if g < 0.0:
            raise invalid(
                "grid_g_co2_per_kwh",
                GRID_INTENSITY_INVALID,
                f"grid_g_co2_per_kwh must be >= 0 g CO2e/kWh, got {g}",
            )
    check_max_context(req.max_context)


def _tokens(values: Sequence[int], field: str) -> None:
    for i, v in enumerate(values):
        if not 1 <= v <= MAX_TOKENS:
            raise invalid(
                f"{field}[{i}]",
                TOKENS_INVALID,
                f"{field}[{i}] must be in [1, {MAX_TOKENS}], got {v}",
            )


def check_roofline(req: RooflineRequest) -> None:
    """Measured limits finite and >= 0 (both > 0 to use them); sizes in [1, 2**31 - 1]."""
    for field, value in (
        ("peak_flops", req.peak_flops),
        ("bandwidth_bytes_per_second", req.bandwidth_bytes_s),
    ):
        if not 0.0 <= value < math.inf:
            raise invalid(
                field, HARDWARE_LIMITS_INVALID, f"{field} must be a finite number >= 0, got {value}"
            )
    _tokens(req.prompt_tokens, "prompt_tokens")
    _tokens(req.contexts, "contexts")


# ---- JSON ----

_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, counting brackets outside
    strings, without recursion (so a hostile document cannot exhaust the stack here):
    escapes are dropped, then strings, then the running bracket balance is taken. On text
    that is not JSON the count is only an estimate, and json.loads refuses the text anyway;
    an unterminated string ends the scan where the parser would stop."""
    bare = _STRING.sub("", _ESCAPE.sub("", text))
    quote = bare.find('"')
    if quote >= 0:
        bare = bare[:quote]
    raw = np.frombuffer(bare.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    if raw.size == 0:
        return 0
    step = np.isin(raw, _OPEN).astype(np.int64) - np.isin(raw, _CLOSE).astype(np.int64)
    return int(max(0, np.cumsum(step).max()))


def parse_json(
    text: str, limits: RequestLimits, field: str = "json", reason: str = INVALID_HELM_JSON
) -> object:
    """json.loads of a request's document, within limits.max_json_bytes (UTF-8) and
    limits.max_json_depth (nesting of arrays/objects, checked before parsing);
    InvalidArgument naming `field` otherwise (`reason` when it is not JSON at all)."""
    # a character is at least one byte: only text short enough in characters is encoded
    size = len(text)
    if size <= limits.max_json_bytes:
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_json_bytes:
        raise invalid(
            field,
            JSON_TOO_LARGE,
            f"{field}: documents are at most {limits.max_json_bytes} bytes (UTF-8), got "
            f"at least {size}",
        )
    depth = json_depth(text)
    if depth > limits.max_json_depth:
        raise invalid(
            field,
            JSON_TOO_DEEP,
            f"{field}: documents nest at most {limits.max_json_depth} levels of arrays and "
            f"objects, got {depth}",
        )
    try:
        return json.loads(text)
    except ValueError as err:  # JSONDecodeError, and integers beyond Python's digit limit
        raise invalid(field, reason, f"{field}: not valid JSON ({err})") from None
