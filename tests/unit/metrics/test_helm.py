"""HELM efficiency JSON: import, export, round trips, validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idealrt.core.costmodel.predict import alpha_at, predict_runtime
from idealrt.core.domain import CostModel
from idealrt.core.errors import InvalidArgument
from idealrt.services.metrics import helm
from idealrt.services.metrics.helm import export_helm, import_helm, representative_context

ROOT = Path(__file__).resolve().parents[3]
SHARED_FILES = (
    "helm_inference_idealized_runtimes_sample.json",
    "helm_inference_denoised_runtimes_sample.json",
)

INLINE: dict[str, Any] = {
    "openai/text-ada-001": {
        "runtime_per_output_token": 0.006,
        "runtime_for_prompt_tokens": {"1": 0.006, "256": 0.01, "512": 0.014, "1536": 0.033},
        "overhead": 0.076,
    },
    "together/gpt-neox-20b": {
        "runtime_per_output_token": 0.033,
        "runtime_for_prompt_tokens": {"1": 0.035, "428": 0.118, "472": 0.11, "1920": 0.442},
    },
}


def shared(name: str) -> dict[str, Any]:
    for d in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):
        if (d / name).exists():
            doc: dict[str, Any] = json.loads((d / name).read_text())
            return doc
    pytest.skip(f"shared/data/{name} is not beside this checkout")


def test_all_is_what_it_claims() -> None:
    assert sorted(helm.__all__) == ["export_helm", "import_helm", "representative_context"]


@pytest.mark.parametrize("name", SHARED_FILES)
def test_round_trip_shared_files_exactly(name: str) -> None:
    doc = shared(name)
    models = import_helm(doc)
    assert export_helm(models) == doc
    # and through JSON text, as a file would travel
    assert json.loads(json.dumps(export_helm(import_helm(json.loads(json.dumps(doc)))))) == doc


def test_round_trip_inline() -> None:
    assert export_helm(import_helm(INLINE)) == INLINE


def test_import_semantics() -> None:
    models = import_helm(INLINE)
    ada = models["openai/text-ada-001"]
    assert ada.kind == "imported" and ada.name == "openai/text-ada-001"
    assert ada.alpha_knots_p == (1, 256, 512, 1536)
    assert ada.alpha_knots_s == (0.006, 0.01, 0.014, 0.033)
    assert (ada.beta0_s, ada.beta1_s, ada.overhead_s) == (0.006, 0.0, 0.076)
    assert ada.valid_prompt_tokens == (1, 1536)
    neox = models["together/gpt-neox-20b"]
    assert neox.overhead_s == 0.0
    # our interpolation between the keys, not HELM's proportional rule:
    assert alpha_at(ada, 384) == pytest.approx(0.012)
    assert alpha_at(neox, 450) == pytest.approx(0.114)  # measured table kept, non-monotone
    assert predict_runtime(ada, 384, 11) == pytest.approx(0.076 + 0.012 + 0.06)


def test_export_of_a_fitted_model() -> None:
    cm = CostModel(
        id="f",
        profile_id="p",
        alpha_knots_p=(1, 256, 1024),
        alpha_knots_s=(0.02, 0.02, 0.1),
        beta0_s=0.01,
        beta1_s=2e-6,
        valid_prompt_tokens=(1, 1023),
        valid_output_tokens=(2, 128),
    )
    out = export_helm({"m": cm})
    c = 512 + 65 / 2  # p_mid + o_mid / 2
    assert representative_context(cm) == c
    assert out["m"]["runtime_per_output_token"] == pytest.approx(0.01 + 2e-6 * c)
    assert out["m"]["runtime_for_prompt_tokens"] == {"1": 0.02, "256": 0.02, "1024": 0.1}
    assert "overhead" not in out["m"]
    dense = export_helm({"m": cm}, prompt_sizes=[640, 2048, 1])["m"]
    table = dense["runtime_for_prompt_tokens"]
    assert isinstance(table, dict)
    assert list(table) == ["1", "640", "2048"]
    np.testing.assert_allclose(list(table.values()), alpha_at(cm, [1, 640, 2048]))


def test_export_overhead_for_denoised() -> None:
    cm = CostModel(
        id="",
        profile_id="",
        alpha_knots_p=(1,),
        alpha_knots_s=(0.01,),
        beta0_s=0.01,
        overhead_s=0.0,
        kind="denoised",
    )
    assert export_helm({"api": cm})["api"]["overhead"] == 0.0


def test_export_rejects_bad_prompt_sizes() -> None:
    cm = import_helm(INLINE)["openai/text-ada-001"]
    with pytest.raises(InvalidArgument) as err:
        export_helm({"m": cm}, prompt_sizes=[0, 5])
    assert (err.value.reason, err.value.field) == ("INVALID_PROMPT_SIZES", "prompt_sizes")


def entry(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "runtime_per_output_token": 0.01,
        "runtime_for_prompt_tokens": {"1": 0.1},
    }
    base.update(kw)
    return {"m/x": {k: v for k, v in base.items() if v is not None}}


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([1, 2], "$"),
        ({"m/x": 3}, '$["m/x"]'),
        (entry(runtime_per_output_token=None), '$["m/x"]["runtime_per_output_token"]'),
        (entry(runtime_for_prompt_tokens=None), '$["m/x"]["runtime_for_prompt_tokens"]'),
        (entry(runtime_per_output_token="0.1"), '$["m/x"]["runtime_per_output_token"]'),
        (entry(runtime_per_output_token=True), '$["m/x"]["runtime_per_output_token"]'),
        (entry(runtime_per_output_token=-1.0), '$["m/x"]["runtime_per_output_token"]'),
        (entry(overhead=float("nan")), '$["m/x"]["overhead"]'),
        (entry(runtime_for_prompt_tokens=[0.1]), '$["m/x"]["runtime_for_prompt_tokens"]'),
        (entry(runtime_for_prompt_tokens={}), '$["m/x"]["runtime_for_prompt_tokens"]'),
        (
            entry(runtime_for_prompt_tokens={"1": 0.1, "abc": 0.2}),
            '$["m/x"]["runtime_for_prompt_tokens"]["abc"]',
        ),
        (
            entry(runtime_for_prompt_tokens={"0": 0.1}),
            '$["m/x"]["runtime_for_prompt_tokens"]["0"]',
        ),
        (
            entry(runtime_for_prompt_tokens={"16": None}),
            '$["m/x"]["runtime_for_prompt_tokens"]["16"]',
        ),
        (
            entry(runtime_for_prompt_tokens={"16": 0.1, "016": 0.2}),
            '$["m/x"]["runtime_for_prompt_tokens"]["016"]',
        ),
    ],
)
def test_malformed_documents_name_the_json_path(doc: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        import_helm(doc)
    assert (err.value.reason, err.value.field) == ("INVALID_HELM_JSON", field)
