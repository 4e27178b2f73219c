"""The metrics engine over a real SQLite store: a fitted model's intervals after a restart."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from idealrt.core.costmodel.fit import FitOptions
from idealrt.core.domain import (
    Backend,
    ModelRef,
    Profile,
    ProfilePlan,
    ProfileState,
    StackSpec,
)
from idealrt.services.metrics.engine import MetricsEngine
from idealrt.services.store.repository import Store, open_store

from ..costmodel.test_fit import Truth, make_samples

PROMPTS = [1, 200, 700, 1000]
OUTPUTS = [2, 50, 100, 128]
# far from the defaults in every way that moves the replicates
OPTIONS = FitOptions(
    robust_centre="trimmed", trim=0.2, bootstrap=24, seed=7, confidence=0.8, max_knots=5
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path}/idealrt.db")
    yield st
    st.close()


def _profiled(store: Store) -> str:
    prof = Profile(
        id="",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(backend=Backend.PYTORCH, device="cpu", dtype="fp32"),
        plan=ProfilePlan(prompt_tokens=(1, 64, 128, 256, 512, 1024), output_tokens=(2, 64, 128)),
    )
    prof = store.create_profile(prof)[0]
    samples = make_samples(Truth(), noise=0.01, seed=3)
    store.append_samples(prof.id, "b0", samples)
    store.update_profile(dataclasses.replace(prof, state=ProfileState.SUCCEEDED))
    return prof.id


def test_options_round_trip_exactly() -> None:
    assert FitOptions.from_record(OPTIONS.to_record()) == OPTIONS
    assert FitOptions.from_record({}) == FitOptions()
    assert FitOptions.from_record({"seed": "3", "from_a_newer_idealrt": "x"}).seed == 3
    with pytest.raises(ValueError):
        FitOptions.from_record({"trim": "a lot"})


def test_intervals_after_a_restart_come_from_the_fits_own_options(store: Store) -> None:
    """Before the options were stored with the model, a restarted engine re-derived the
    replicates with default options (200 replicates, seed 0, median centres): the
    intervals of the same model changed with the process that served them."""
    pid = _profiled(store)
    first = MetricsEngine(store)
    cm = first.fit(pid, OPTIONS)
    # the options, and the timing evidence the fit rested on (FitOptions ignores it)
    assert store.get_cost_model(cm.id).fit_options == {
        **OPTIONS.to_record(),
        "timing": "server_steps:96",
        "timing_used": "beta=decode_steps:96 alpha=prefill",
    }
    before = first.estimate(cm.id, PROMPTS, OUTPUTS, per_query=True, intervals=True)

    restarted = MetricsEngine(store)  # nothing cached: replicates re-derived from the store
    assert len(restarted.replicates(store.get_cost_model(cm.id))) == OPTIONS.bootstrap
    after = restarted.estimate(cm.id, PROMPTS, OUTPUTS, per_query=True, intervals=True)
    assert before.low_s is not None and after.low_s is not None
    assert before.high_s is not None and after.high_s is not None
    np.testing.assert_array_equal(after.low_s, before.low_s)
    np.testing.assert_array_equal(after.high_s, before.high_s)
    assert after.sum_interval == before.sum_interval

    defaults = MetricsEngine(store)  # the old behaviour, for contrast: the test can fail
    old = dataclasses.replace(store.get_cost_model(cm.id), fit_options={})
    assert len(defaults.replicates(old)) == FitOptions().bootstrap


def test_unreadable_options_fall_back_to_the_defaults(store: Store) -> None:
    pid = _profiled(store)
    cm = MetricsEngine(store).fit(pid, dataclasses.replace(OPTIONS, bootstrap=8))
    broken = dataclasses.replace(cm, id=cm.id, fit_options={"bootstrap": "many"})
    assert len(MetricsEngine(store).replicates(broken)) == FitOptions().bootstrap


@pytest.mark.parametrize("method", ["min", "quantile"])
def test_denoised_models_store_their_method_options_and_quality(store: Store, method: str) -> None:
    """Issue 15: a denoised model was stored with empty fit options and quality "none"."""
    pid = _profiled(store)
    cm = MetricsEngine(store).denoise(pid, method, 0.2)
    stored = store.get_cost_model(cm.id)
    assert stored.fit_options["denoise_method"] == repr(method)
    assert ("denoise_quantile" in stored.fit_options) == (method == "quantile")
    assert stored.fit_options["denoise_alpha_floor"] == "'ttft_min'"  # prefill was measured
    assert stored.quality.method == "kfold" and stored.quality.points > 0
    floor = min(s.prefill_ns for s in store.all_samples(pid) if s.prompt_tokens == 1) * 1e-9
    assert stored.alpha_knots_s[0] >= floor
