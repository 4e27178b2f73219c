"""The internal consistency of a cost model: what a record must satisfy before it is stored
or evaluated, so that every later prediction on it is a finite number of seconds.

`check_cost_model(cm)` raises InvalidArgument(COST_MODEL_INCONSISTENT) naming the first field
that breaks a rule (fields are the `CostModel` attribute names, `alpha_knots_s[2]`,
`intervals[beta0]`, `quality.mean_rel`, ...):

- `kind` is one of KINDS;
- every number is finite, and no time exceeds MAX_SECONDS in magnitude: above anything
  a fit of stored samples can produce (int64 nanoseconds are at most ~9.2e9 s), and small
  enough that no prediction over int32 token counts, summed over any workload a request
  can carry, overflows a double;
- alpha has at least one knot; knot prompt sizes are integers in [1, 2**31 - 1] (the
  contract's int32), strictly increasing (the predictor interpolates between them and
  divides by the last gap); one time per knot, each >= 0;
- beta0 >= 0; beta1 finite; overhead >= 0;
- except in denoised models, whose knot times and overhead need only be finite: the
  paper's minimum rule (metrics `denoise_min`) is reproduced unclipped, and a lucky-fast
  trial or a context-dependent beta puts alpha(p_min) or the overhead slightly below 0;
- intervals: finite, low <= high;
- validity ranges: integers, 0 <= low <= high <= 2**31 - 1 ((0, 0): unknown);
- quality: points >= 0, errors finite and >= 0;
- fit_options, when recorded, are FitOptions that `FitOptions.from_record` reads and that
  validate (they re-derive the model's bootstrap replicates).

What it does not require otherwise: alpha need not be monotone (a HELM table is imported
exactly, and the paper's minimum rule is not smoothed), nor beta1 >= 0 (our fits never
produce a negative slope, but a record from elsewhere may carry one; predictions stay
finite either way).
Models produced by our fit (`fit`), denoising (metrics `denoise`) and HELM import pass.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

from idealrt.core.costmodel.options import FitOptions
from idealrt.core.domain import CostModel
from idealrt.core.errors import IdealrtError, InvalidArgument, invalid
from idealrt.core.reasons import COST_MODEL_INCONSISTENT

__all__ = ["KINDS", "MAX_KNOT_TOKENS", "MAX_SECONDS", "check_cost_model"]

KINDS = ("idealized", "denoised", "imported")
MAX_SECONDS = 1e12  # ~31,700 years; see the module doc
MAX_KNOT_TOKENS = 2**31 - 1  # int32, as the contract carries token counts
_MAX_OPTION_TEXT = 256  # characters of one recorded fit option's value


def _shown(name: object) -> str:
    """A record's key as an error names it: cut to 64 characters, so errors stay small."""
    text = str(name)
    return text if len(text) <= 64 else f"{text[:64]}..."


def _bad(field: str, message: str) -> InvalidArgument:
    return invalid(field, COST_MODEL_INCONSISTENT, f"{field} {message}")


def _seconds(value: object, field: str, *, lo: float | None = 0.0) -> float:
    """A finite time in seconds, |value| <= MAX_SECONDS and >= lo (None: any sign)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # type: ignore[arg-type]  # numpy scalars
        except (TypeError, ValueError):
            raise _bad(field, f"must be a number of seconds, got {_shown(repr(value))}") from None
    v = float(value)
    low = -MAX_SECONDS if lo is None else lo
    if not (math.isfinite(v) and low <= v <= MAX_SECONDS):
        raise _bad(
            field, f"must be a finite number of seconds in [{low:g}, {MAX_SECONDS:g}], got {v}"
        )
    return v


def _integer(value: object, field: str, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise _bad(field, f"must be an integer, got {_shown(repr(value))}") from None
    if not lo <= n <= hi:
        raise _bad(field, f"must be in [{lo}, {hi}], got {n}")
    return n


def _sequence(value: object, field: str) -> Sequence[object]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _bad(field, f"must be a sequence, got {type(value).__name__}")
    return value


def _alpha(cm: CostModel) -> None:
    kp = _sequence(cm.alpha_knots_p, "alpha_knots_p")
    ks = _sequence(cm.alpha_knots_s, "alpha_knots_s")
    if not kp:
        raise _bad("alpha_knots_p", "must hold at least one knot (alpha(p) has no value)")
    if len(kp) != len(ks):
        raise _bad(
            "alpha_knots_s", f"must hold one time per knot: {len(ks)} times for {len(kp)} knots"
        )
    prev = 0
    for i, p in enumerate(kp):
        n = _integer(p, f"alpha_knots_p[{i}]", 1, MAX_KNOT_TOKENS)
        if n <= prev:
            raise _bad(
                f"alpha_knots_p[{i}]",
                f"must be strictly increasing: {n} follows {prev}",
            )
        prev = n
    lo = None if cm.kind == "denoised" else 0.0
    for i, s in enumerate(ks):
        _seconds(s, f"alpha_knots_s[{i}]", lo=lo)


def _range(value: object, field: str) -> None:
    pair = _sequence(value, field)
    if len(pair) != 2:
        raise _bad(field, f"must be a (low, high) pair, got {len(pair)} values")
    lo = _integer(pair[0], f"{field}[0]", 0, MAX_KNOT_TOKENS)
    hi = _integer(pair[1], f"{field}[1]", 0, MAX_KNOT_TOKENS)
    if lo > hi:
        raise _bad(field, f"must have low <= high, got ({lo}, {hi})")


def _intervals(value: object) -> None:
    if not isinstance(value, Mapping):
        raise _bad("intervals", f"must be a mapping, got {type(value).__name__}")
    for name, pair in value.items():
        field = f"intervals[{_shown(name)}]"
        if not isinstance(name, str):
            raise _bad("intervals", f"names must be strings, got {_shown(repr(name))}")
        bounds = _sequence(pair, field)
        if len(bounds) != 2:
            raise _bad(field, f"must be a (low, high) pair, got {len(bounds)} values")
        lo = _seconds(bounds[0], f"{field}.low", lo=None)
        hi = _seconds(bounds[1], f"{field}.high", lo=None)
        if lo > hi:
            raise _bad(field, f"must have low <= high, got ({lo}, {hi})")


def _quality(cm: CostModel) -> None:
    q = cm.quality
    _integer(q.points, "quality.points", 0, 2**63 - 1)
    for name in ("mean_rel", "p95_rel", "max_rel"):
        v = getattr(q, name)
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or not (math.isfinite(v) and v >= 0.0)
        ):
            raise _bad(f"quality.{name}", f"must be a finite number >= 0, got {v!r}")


def _fit_options(value: object) -> None:
    if not isinstance(value, Mapping):
        raise _bad("fit_options", f"must be a mapping, got {type(value).__name__}")
    for name, text in value.items():
        if not isinstance(name, str) or not isinstance(text, str) or len(text) > _MAX_OPTION_TEXT:
            raise _bad(
                f"fit_options[{_shown(name)}]",
                f"must be a string of at most {_MAX_OPTION_TEXT} characters",
            )
    if not value:
        return
    try:
        FitOptions.from_record(value).validate()
    except ValueError as e:
        raise _bad("fit_options", f"is not a readable FitOptions record: {e}") from None
    except IdealrtError as e:
        raise _bad(f"fit_{e.field}", f"is not a valid fit option: {e.message}") from None


def check_cost_model(cm: CostModel) -> None:
    """Raise InvalidArgument(COST_MODEL_INCONSISTENT, field) unless `cm` is internally
    consistent (see the module doc); return None when it is."""
    if not isinstance(cm, CostModel):
        raise invalid("cost_model", COST_MODEL_INCONSISTENT, "cost_model must be a CostModel")
    if cm.kind not in KINDS:
        raise _bad("kind", f"must be one of {', '.join(KINDS)}; got {_shown(repr(cm.kind))}")
    _alpha(cm)
    _seconds(cm.beta0_s, "beta0_s")
    _seconds(cm.beta1_s, "beta1_s", lo=None)
    _seconds(cm.overhead_s, "overhead_s", lo=None if cm.kind == "denoised" else 0.0)
    _intervals(cm.intervals)
    _range(cm.valid_prompt_tokens, "valid_prompt_tokens")
    _range(cm.valid_output_tokens, "valid_output_tokens")
    _quality(cm)
    _fit_options(cm.fit_options)
