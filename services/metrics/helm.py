"""HELM's efficiency JSON (stanford-crfm/helm, src/helm/benchmark/efficiency_data/):

    {"<model>": {"runtime_per_output_token": s,
                 "runtime_for_prompt_tokens": {"<p>": s, ...},
                 "overhead": s}}          # overhead: denoised (API) tables only

Import keeps the table exactly: alpha's knots are the table's keys and values (even where a
measured table is not monotone), beta0 = runtime_per_output_token, beta1 = 0. An imported
model is evaluated with our interpolation between the keys (idealrt.services.metrics.
predict), not HELM's proportional rule (evaluate.helm_proportional_predict has that).

Export writes alpha(p) at the model's knots (or the sizes asked for); a value at a knot is
the knot's value exactly, so import -> export reproduces a HELM file. HELM has one constant
per-output-token time; with beta1 != 0 we export beta at the mean decode context of the
query in the middle of the validity domain, c = p_mid + o_mid/2 (p_mid, o_mid the midpoints
of valid_prompt_tokens, valid_output_tokens): the average step of that query. With beta1 = 0
it is beta0 exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from idealrt.core.costmodel.predict import alpha_at
from idealrt.core.costmodel.validate import MAX_KNOT_TOKENS, MAX_SECONDS
from idealrt.core.domain import CostModel
from idealrt.core.errors import InvalidArgument
from idealrt.services.metrics.reasons import INVALID_HELM_JSON, INVALID_PROMPT_SIZES

__all__ = ["export_helm", "import_helm", "representative_context"]

_REASON = INVALID_HELM_JSON


def representative_context(cm: CostModel) -> float:
    """The context at which an exported model's constant beta is taken (module doc)."""
    p_mid = 0.5 * (cm.valid_prompt_tokens[0] + cm.valid_prompt_tokens[1])
    if cm.valid_prompt_tokens == (0, 0) and cm.alpha_knots_p:
        p_mid = 0.5 * (cm.alpha_knots_p[0] + cm.alpha_knots_p[-1])
    o_mid = 0.5 * (cm.valid_output_tokens[0] + cm.valid_output_tokens[1])
    return p_mid + 0.5 * o_mid


def export_helm(
    models: Mapping[str, CostModel], prompt_sizes: Sequence[int] | None = None
) -> dict[str, dict[str, object]]:
    """HELM efficiency JSON for the models (keyed by the given names). runtime_for_prompt_tokens
    is keyed by each model's knots, or by prompt_sizes when given; "overhead" is written for
    denoised models and any model with overhead > 0."""
    out: dict[str, dict[str, object]] = {}
    for name, cm in models.items():
        sizes = sorted(
            {int(p) for p in (cm.alpha_knots_p if prompt_sizes is None else prompt_sizes)}
        )
        if not sizes or sizes[0] < 1:
            raise InvalidArgument(
                INVALID_PROMPT_SIZES,
                "prompt sizes must be >= 1 and not empty",
                field="prompt_sizes",
            )
        at_knot = dict(zip(cm.alpha_knots_p, cm.alpha_knots_s, strict=True))
        interp = alpha_at(cm, np.asarray(sizes, dtype=np.float64))
        table = {
            str(p): float(at_knot.get(p, v)) for p, v in zip(sizes, interp.tolist(), strict=True)
        }
        beta = (
            cm.beta0_s if cm.beta1_s == 0 else cm.beta0_s + cm.beta1_s * representative_context(cm)
        )
        entry: dict[str, object] = {
            "runtime_per_output_token": float(beta),
            "runtime_for_prompt_tokens": table,
        }
        if cm.kind == "denoised" or cm.overhead_s > 0:
            entry["overhead"] = float(cm.overhead_s)
        out[name] = entry
    return out


_SHOWN = 64  # characters of a request's key or value echoed in an error


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}..."


def _path(*parts: str) -> str:
    """The JSON path of a value; keys longer than _SHOWN are cut (errors stay small)."""
    return "$" + "".join(f"[{json.dumps(_shown(p))}]" for p in parts)


def _seconds(value: object, *parts: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(
            _REASON,
            f"{_path(*parts)} must be a number of seconds, got {_shown(repr(value))}",
            field=_path(*parts),
        )
    v = float(value) if isinstance(value, float) or abs(value) <= MAX_SECONDS else math.inf
    if not (math.isfinite(v) and 0 <= v <= MAX_SECONDS):
        raise InvalidArgument(
            _REASON,
            f"{_path(*parts)} must be finite, in [0, {MAX_SECONDS:g}] seconds, got "
            f"{_shown(repr(value))}",
            field=_path(*parts),
        )
    return v


def _mapping(value: object, *parts: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(
            _REASON,
            f"{_path(*parts)} must be a JSON object, got {type(value).__name__}",
            field=_path(*parts),
        )
    return value


def import_helm(doc: Mapping[str, object]) -> dict[str, CostModel]:
    """Cost models (kind "imported", name = the JSON key) from a HELM efficiency document.
    Malformed input raises InvalidArgument (reason INVALID_HELM_JSON) whose field is the
    JSON path of the offending value, e.g. $["together/opt-66b"]["runtime_for_prompt_tokens"]:
    prompt sizes are integers in [1, 2**31 - 1], times finite seconds in [0, MAX_SECONDS]
    (core.costmodel.validate), so every imported model is a consistent one."""
    root = _mapping(doc)
    models: dict[str, CostModel] = {}
    for name, raw in root.items():
        entry = _mapping(raw, name)
        for key in ("runtime_per_output_token", "runtime_for_prompt_tokens"):
            if key not in entry:
                raise InvalidArgument(
                    _REASON, f"{_path(name)} lacks {key!r}", field=_path(name, key)
                )
        beta = _seconds(entry["runtime_per_output_token"], name, "runtime_per_output_token")
        overhead = _seconds(entry["overhead"], name, "overhead") if "overhead" in entry else 0.0
        table = _mapping(entry["runtime_for_prompt_tokens"], name, "runtime_for_prompt_tokens")
        if not table:
            raise InvalidArgument(
                _REASON,
                f"{_path(name, 'runtime_for_prompt_tokens')} is empty",
                field=_path(name, "runtime_for_prompt_tokens"),
            )
        knots: dict[int, float] = {}
        for key, value in table.items():
            where = (name, "runtime_for_prompt_tokens", str(key))
            text = str(key).strip()
            if (
                not (text.isascii() and text.isdigit())
                or len(text) > len(str(MAX_KNOT_TOKENS))  # before int(): no huge numbers
                or not 1 <= int(text) <= MAX_KNOT_TOKENS
            ):
                raise InvalidArgument(
                    _REASON,
                    f"{_path(*where)}: prompt sizes are integers in [1, {MAX_KNOT_TOKENS}], "
                    f"got key {_shown(repr(key))}",
                    field=_path(*where),
                )
            if int(text) in knots:
                raise InvalidArgument(
                    _REASON,
                    f"{_path(*where)}: prompt size {int(text)} appears twice",
                    field=_path(*where),
                )
            knots[int(text)] = _seconds(value, *where)
        kp = tuple(sorted(knots))
        models[name] = CostModel(
            id="",
            profile_id="",
            alpha_knots_p=kp,
            alpha_knots_s=tuple(knots[p] for p in kp),
            beta0_s=beta,
            beta1_s=0.0,
            overhead_s=overhead,
            name=name,
            model_name=name,
            kind="imported",
            valid_prompt_tokens=(kp[0], kp[-1]),
            valid_output_tokens=(0, 0),
        )
    return models
