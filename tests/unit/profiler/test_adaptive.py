"""Adaptive planning (adaptive.py) on its own and inside run_profile, with the real store
(SQLite in memory) and the real fitting code of the metrics service.

`CurveTarget` is a deterministic stand-in for a model whose prefill cost bends: alpha(p) is
a function the test chooses (a kink at p = 100, or a smooth convex curve), so a test can say
where the fitted curve must be uncertain and how wrong it may be. Its noise is a seeded
function of the prompt seed, so an interrupted run and its resumption measure exactly what
one uninterrupted run measures. It never sleeps; a fake clock stands in for wall time where
the budget matters.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idealrt.clients.cli import build_parser
from idealrt.clients.cli._profile import build_profile
from idealrt.core.costmodel.fit import FitOptions, fit_cost_model
from idealrt.core.costmodel.predict import alpha_at
from idealrt.core.domain import Profile, ProfilePlan, ProfileState, Sample, SampleFlag
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler import adaptive as A
from idealrt.services.profiler import plan as P
from idealrt.services.profiler.runner import run_profile
from idealrt.services.store.repository import Store

KNEE = 100


def kinked(p: float) -> float:
    """ns: 10 us per prompt token up to the knee, 100 us per token beyond it."""
    return 1_000_000 + 10_000 * p + 90_000 * max(0.0, p - KNEE)


def convex(p: float) -> float:
    return 1_000_000 + 2_000 * p + 50 * p * p


class CurveTarget:
    """prefill = alpha(p) x f; decode step at context c = (2 ms + 1 us x c) x f;
    f = 1 + noise x u, u uniform in [-1, 1] seeded by the prompt seed."""

    def __init__(
        self,
        alpha: Callable[[float], float] = kinked,
        *,
        noise: float = 0.004,
        spec: ModelSpec | None = None,
        on_generate: Callable[[int], None] | None = None,
    ) -> None:
        self.alpha = alpha
        self.noise = noise
        self.spec = spec
        self.on_generate = on_generate
        self.calls: list[tuple[int, int, int]] = []

    def prepare(self) -> ModelSpec | None:
        return self.spec

    def generate(self, prompt_tokens: int, output_tokens: int, seed: int) -> Sample:
        i = len(self.calls)
        self.calls.append((prompt_tokens, output_tokens, seed))
        if self.on_generate is not None:
            self.on_generate(i)
        f = 1.0 + self.noise * (2.0 * random.Random(seed).random() - 1.0)
        prefill = int(self.alpha(prompt_tokens) * f)
        steps = tuple(
            int((2_000_000 + 1_000 * (prompt_tokens + k + 1)) * f) for k in range(output_tokens - 1)
        )
        return Sample(
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            prefill_ns=prefill,
            decode_ns=steps,
            total_ns=prefill + sum(steps),
            start_time=datetime.now(UTC),
        )

    def environment(self) -> dict[str, str]:
        return {"kind": "curve"}

    def close(self) -> None:
        pass


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


GRID = (8, 32, 64, 160, 256)  # the kink at 100 lies in the gap (64, 160)
OUTPUTS = (2, 6)


def adaptive_profile(kit: Any, store: Store, **plan_kw: Any) -> Profile:
    args: dict[str, Any] = {
        "prompt_tokens": GRID,
        "output_tokens": OUTPUTS,
        "adaptive_target_rel": 0.02,
        "warmups": 1,
    }
    args.update(plan_kw)
    return kit.make_profile(store, **args)


def run(
    kit: Any,
    store: Store,
    lease_dir: Path,
    profile: Profile,
    target: Any,
    cancel: threading.Event | None = None,
    sink: Any = None,
    **opts: Any,
) -> tuple[Profile, list[Profile]]:
    progress: list[Profile] = []
    final = run_profile(
        profile,
        target,
        sink or store,
        cancel=cancel or threading.Event(),
        on_progress=progress.append,
        options=kit.quiet_options(lease_dir, **opts),
    )
    return final, progress


def ok_samples(store: Store, profile_id: str) -> list[Sample]:
    return [s for s in store.all_samples(profile_id) if s.flag == SampleFlag.OK]


def true_curve_error(samples: Sequence[Sample], alpha: Callable[[float], float]) -> float:
    """Largest |alpha_fit - alpha_true| / alpha_true over every integer p of the grid's span."""
    cm = fit_cost_model(samples, options=FitOptions(bootstrap=0, kfold=0))
    p = np.arange(min(GRID), max(GRID) + 1)
    truth = np.array([alpha(float(x)) for x in p]) * 1e-9
    return float(np.max(np.abs(alpha_at(cm, p) - truth) / truth))


def grid_samples(
    sizes: Sequence[int], alpha: Callable[[float], float] = kinked, noise: float = 0.0
) -> list[Sample]:
    target = CurveTarget(alpha, noise=noise)
    return [
        target.generate(p, o, seed=1000 * p + 10 * o + r)
        for p in sizes
        for o in OUTPUTS
        for r in range(3)
    ]


# ----------------------------------------------------------------- assess (pure)


def test_the_bend_bound_finds_the_kink_and_is_zero_where_straight() -> None:
    a = A.assess(grid_samples(GRID))
    by_gap = {(g.low, g.high): g for g in a.gaps}
    assert set(by_gap) == {(8, 32), (32, 64), (64, 160), (160, 256)}
    worst = a.worst
    assert worst is not None and (worst.low, worst.high) == (64, 160)
    assert worst.candidate == KNEE  # where the neighbouring segments, extended, meet
    # exact for a single kink: the chord's error at the kink, relative to the fitted alpha
    chord = kinked(64) + (kinked(160) - kinked(64)) * (KNEE - 64) / (160 - 64)
    assert worst.bend_rel == pytest.approx((chord - kinked(KNEE)) / chord, rel=1e-6)
    assert by_gap[(8, 32)].bend_rel == pytest.approx(0.0, abs=1e-9)
    assert by_gap[(32, 64)].bend_rel == pytest.approx(0.0, abs=1e-9)
    assert by_gap[(160, 256)].bend_rel > 0.1  # one-sided: its neighbour crosses the kink
    assert all(g.bootstrap_rel == pytest.approx(0.0, abs=1e-12) for g in a.gaps)  # no noise

    refined = A.assess(grid_samples((*GRID, KNEE)))
    assert refined.max_rel_halfwidth == pytest.approx(0.0, abs=1e-9)  # straight everywhere


def test_noise_shows_in_the_bootstrap_term_and_taken_sizes_are_avoided() -> None:
    noisy = A.assess(grid_samples((*GRID, KNEE), noise=0.03), seed=3)
    assert all(g.bootstrap_rel > 0.0 for g in noisy.gaps)
    assert noisy.max_rel_halfwidth == max(g.rel_halfwidth for g in noisy.gaps)
    moved = A.assess(grid_samples(GRID), taken={KNEE, KNEE - 1})
    worst = moved.worst
    assert worst is not None and worst.candidate == KNEE + 1
    # a gap with no free integer inside is complete: not judged
    dense = A.assess(grid_samples((8, 9, 10)))
    assert dense.gaps == () and dense.worst is None and dense.max_rel_halfwidth == 0.0


def test_noise_placement_is_the_geometric_midpoint() -> None:
    line = lambda p: 1_000_000 + 10_000 * p  # noqa: E731 (no bend anywhere)
    a = A.assess(grid_samples((4, 64, 1024), line, noise=0.05), seed=1)
    assert [g.candidate for g in a.gaps] == [16, 256]
    assert all(g.bend_rel < g.bootstrap_rel for g in a.gaps)


def test_assess_propagates_fit_errors() -> None:
    contended = [dataclasses.replace(s, flag=SampleFlag.CONTENDED) for s in grid_samples(GRID)]
    with pytest.raises(FailedPrecondition) as info:
        A.assess(contended)
    assert info.value.reason == "NOT_ENOUGH_SAMPLES"
    with pytest.raises(InvalidArgument) as bad:
        A.assess(grid_samples(GRID), options=A.AdaptiveOptions(bootstrap=1))
    assert (bad.value.reason, bad.value.field) == ("INVALID_ADAPTIVE_OPTIONS", "adaptive.bootstrap")


def test_added_sizes_are_recognised_from_stored_samples() -> None:
    plan = ProfilePlan(
        prompt_tokens=GRID,
        output_tokens=OUTPUTS,
        holdout_prompt_tokens=(48,),
        adaptive_target_rel=0.02,
    )
    s = grid_samples((8,))[0]
    stored = [
        dataclasses.replace(s, prompt_tokens=8),
        dataclasses.replace(s, prompt_tokens=48, heldout=True),  # held out, not added
        dataclasses.replace(s, prompt_tokens=100),
        dataclasses.replace(s, prompt_tokens=7, flag=SampleFlag.NONCONFORMING),  # wrong p
        dataclasses.replace(s, prompt_tokens=200, flag=SampleFlag.CONTENDED),
        dataclasses.replace(s, prompt_tokens=100),
        dataclasses.replace(s, prompt_tokens=80),
    ]
    assert A.added_prompt_sizes(plan, stored) == [100, 200, 80]
    off = dataclasses.replace(plan, adaptive_target_rel=0.0)
    assert A.added_prompt_sizes(off, stored) == []


def test_planner_stops_and_records_why() -> None:
    plan = ProfilePlan(prompt_tokens=GRID, output_tokens=OUTPUTS, adaptive_target_rel=0.02)
    planner = A.AdaptivePlanner(plan)
    assert planner.max_sizes == P.DEFAULT_ADAPTIVE_MAX_PROMPT_SIZES
    assert planner.next_size(grid_samples(GRID)) == KNEE
    assert planner.next_size(grid_samples((*GRID, KNEE))) is None
    assert planner.stop == A.AdaptiveStop.TARGET_MET
    e = planner.provenance()
    assert e["adaptive.added"] == "100" and e["adaptive.stop"] == "target_met"
    assert float(e["adaptive.added_rel_halfwidth"]) > 0.4
    assert float(e["adaptive.max_rel_halfwidth"]) < 1e-6 and e["adaptive.fits"] == "2"

    capped = A.AdaptivePlanner(dataclasses.replace(plan, adaptive_max_prompt_sizes=1), added=[5])
    assert capped.next_size(grid_samples(GRID)) is None
    assert capped.stop == A.AdaptiveStop.MAX_SIZES
    assert capped.provenance()["adaptive.added_rel_halfwidth"] == "nan"  # resumed: unknown

    broke = A.AdaptivePlanner(plan)
    contended = [dataclasses.replace(s, flag=SampleFlag.CONTENDED) for s in grid_samples(GRID)]
    assert broke.next_size(contended) is None and broke.stop == A.AdaptiveStop.FIT_FAILED
    assert broke.provenance()["adaptive.stop"].startswith("fit_failed: NOT_ENOUGH_SAMPLES")

    spent = A.AdaptivePlanner(plan)
    assert spent.next_size(grid_samples(GRID), budget_spent=True) is None
    assert spent.stop == A.AdaptiveStop.BUDGET and spent.fits == 0

    dropped = A.AdaptivePlanner(plan, added=[100, 200])
    dropped.drop_unmeasured([200])
    assert dropped.added == [100] and dropped.provenance()["adaptive.unmeasured"] == "200"

    none = A.AdaptivePlanner(dataclasses.replace(plan, prompt_tokens=(8, 9)))
    assert none.next_size(grid_samples((8, 9))) is None
    assert none.stop == A.AdaptiveStop.NO_CANDIDATES


# ----------------------------------------------------------------- plan helpers


TARGET = ("plan.adaptive_target_rel", "PLAN_ADAPTIVE_TARGET_OUT_OF_RANGE")
MAX_SIZES = ("plan.adaptive_max_prompt_sizes", "PLAN_ADAPTIVE_MAX_SIZES_OUT_OF_RANGE")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"adaptive_target_rel": -0.01}, TARGET),
        ({"adaptive_target_rel": 0.5}, TARGET),
        ({"adaptive_target_rel": math.nan}, TARGET),
        ({"adaptive_max_prompt_sizes": -1}, MAX_SIZES),
        ({"adaptive_max_prompt_sizes": 65}, MAX_SIZES),
        (
            {"adaptive_target_rel": 0.02, "prompt_tokens": (8, 8)},
            ("plan.prompt_tokens", "PLAN_ADAPTIVE_GRID_TOO_SMALL"),
        ),
    ],
)
def test_invalid_adaptive_plans(changes: dict[str, Any], expected: tuple[str, str]) -> None:
    base = ProfilePlan(prompt_tokens=GRID, output_tokens=OUTPUTS)
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(base, **changes))
    assert (info.value.field, info.value.reason) == expected


def test_adaptive_limits_are_stated_and_edges_allowed() -> None:
    base = ProfilePlan(prompt_tokens=GRID, output_tokens=OUTPUTS)
    P.validate_plan(
        dataclasses.replace(base, adaptive_target_rel=0.49, adaptive_max_prompt_sizes=64)
    )
    P.validate_plan(dataclasses.replace(base, adaptive_max_prompt_sizes=0))
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(base, adaptive_target_rel=0.7))
    assert "[0, 0.5)" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        P.validate_plan(dataclasses.replace(base, adaptive_max_prompt_sizes=100))
    assert "[0, 64]" in info.value.message


def test_configurations_and_totals_grow_with_added_sizes() -> None:
    plan = ProfilePlan(
        prompt_tokens=(8, 64), output_tokens=(6, 2, 2), holdout_prompt_tokens=(32,), repeats=3
    )
    base = P.configurations(plan)
    grown = P.configurations(plan, [40, 20, 40, 8])  # a repeat and a grid size are skipped
    assert grown[: len(base)] == base
    assert grown[len(base) :] == [
        P.Config(40, 2),
        P.Config(40, 6),
        P.Config(20, 2),
        P.Config(20, 6),
    ]
    assert P.total_samples(plan) == len(base) * 3
    assert P.total_samples(plan, 2) == len(grown) * 3
    assert P.effective_max_prompt_sizes(plan) == 0
    assert P.effective_max_prompt_sizes(dataclasses.replace(plan, adaptive_target_rel=0.1)) == 8
    on = dataclasses.replace(plan, adaptive_target_rel=0.1, adaptive_max_prompt_sizes=3)
    assert P.effective_max_prompt_sizes(on) == 3


def test_module_exports_what_it_claims() -> None:
    module = importlib.import_module("idealrt.services.profiler.adaptive")
    assert sorted(module.__all__) == sorted(set(module.__all__))
    assert all(hasattr(module, name) for name in module.__all__)
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    }
    assert public <= set(module.__all__)


def test_cli_flags_map_to_the_plan() -> None:
    flags = ["--adaptive-target", "2%", "--adaptive-max-sizes", "5", "--spread", "30m"]
    args = build_parser().parse_args(["profile", "--model", "gpt2-small", *flags])
    plan = build_profile(args).plan
    assert (plan.adaptive_target_rel, plan.adaptive_max_prompt_sizes) == (0.02, 5)
    assert plan.spread_s == 1800.0
    default = build_profile(build_parser().parse_args(["profile", "--model", "gpt2-small"])).plan
    assert (default.adaptive_target_rel, default.adaptive_max_prompt_sizes, default.spread_s) == (
        0.0,
        0,
        0.0,
    )


# ----------------------------------------------------------------- run_profile


def test_adaptive_run_adds_the_kink_and_meets_the_target(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = adaptive_profile(kit, store)
    target = CurveTarget()
    final, progress = run(kit, store, lease_dir, profile, target)
    assert final.state == ProfileState.SUCCEEDED, final.error
    e = final.provenance.entries
    added = [int(x) for x in e["adaptive.added"].split(",")]
    assert len(added) == 1 and abs(added[0] - KNEE) <= 2
    assert e["adaptive.stop"] == "target_met"
    assert float(e["adaptive.max_rel_halfwidth"]) <= 0.02
    assert float(e["adaptive.added_rel_halfwidth"]) > 0.3  # the chord missed by ~50%
    assert e["stopping.reason"] == "repeats"
    samples = store.all_samples(profile.id)
    counts = Counter((s.prompt_tokens, s.output_tokens) for s in samples if s.flag == SampleFlag.OK)
    assert set(counts.values()) == {3} and {p for p, _ in counts} == {*GRID, added[0]}
    # the grid alone misses the kink badly; with the added size the fit is within target
    grid_only = [s for s in samples if s.prompt_tokens in GRID]
    assert true_curve_error(grid_only, kinked) > 0.3
    assert true_curve_error(samples, kinked) < 0.02
    # total_samples grew when the size was added: the progress bar's total
    assert final.total_samples == final.completed_samples == (len(GRID) + 1) * len(OUTPUTS) * 3
    totals = [p.total_samples for p in progress if p.total_samples]
    assert totals[0] == len(GRID) * len(OUTPUTS) * 3 and totals[-1] == final.total_samples
    # the added size's configurations were measured after the whole grid, in rounds
    ok = [(s.prompt_tokens, s.repeat) for s in samples if s.flag == SampleFlag.OK]
    first_added = next(i for i, (p, _) in enumerate(ok) if p == added[0])
    assert first_added == len(GRID) * len(OUTPUTS) * 3
    assert [r for _, r in ok[first_added:]] == [0, 0, 1, 1, 2, 2]


def test_adaptive_off_measures_the_grid_only(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = adaptive_profile(kit, store, adaptive_target_rel=0.0)
    final, _ = run(kit, store, lease_dir, profile, CurveTarget())
    assert final.state == ProfileState.SUCCEEDED, final.error
    assert not any(k.startswith("adaptive.") for k in final.provenance.entries)
    assert {s.prompt_tokens for s in ok_samples(store, profile.id)} == set(GRID)


def test_the_size_cap_stops_a_curve_that_never_straightens(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    profile = adaptive_profile(
        kit, store, adaptive_target_rel=0.001, adaptive_max_prompt_sizes=2, repeats=2
    )
    final, _ = run(kit, store, lease_dir, profile, CurveTarget(convex))
    assert final.state == ProfileState.SUCCEEDED, final.error
    e = final.provenance.entries
    added = [int(x) for x in e["adaptive.added"].split(",")]
    assert len(added) == 2 and len(set(added) | set(GRID)) == len(GRID) + 2
    assert all(min(GRID) < p < max(GRID) for p in added)
    assert e["adaptive.stop"] == "max_sizes" and float(e["adaptive.max_rel_halfwidth"]) > 0.001
    assert e["adaptive.fits"] == "3"
    assert final.total_samples == final.completed_samples == (len(GRID) + 2) * len(OUTPUTS) * 2


def test_budget_ends_adaptive_planning_midway(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()

    def tick(i: int) -> None:
        clock.t += 1.0  # every generation takes one (fake) second

    # 10 warm-ups (before the budget starts), 30 grid samples, then 3.5 s for the kink
    profile = adaptive_profile(kit, store, budget_s=33.5)
    final, _ = run(kit, store, lease_dir, profile, CurveTarget(on_generate=tick), clock=clock)
    assert final.state == ProfileState.SUCCEEDED, final.error
    e = final.provenance.entries
    assert e["stopping.reason"] == "budget" and e["adaptive.stop"] == "budget"
    assert e["adaptive.added"] == str(KNEE) and e["adaptive.unmeasured"] == ""
    added = [s for s in ok_samples(store, profile.id) if s.prompt_tokens == KNEE]
    assert len(added) == 4  # rounds 0 and 1 of both output lengths, then the budget
    assert final.completed_samples == 34


def test_budget_spent_while_fitting_drops_the_unmeasured_size(  # type: ignore[no-untyped-def]
    kit, store, lease_dir, monkeypatch
) -> None:
    clock = FakeClock()
    real_fit = A.fit_with_replicates

    def slow_fit(*args: Any, **kw: Any) -> Any:
        clock.t += 5.0  # a fit that takes 5 (fake) seconds
        return real_fit(*args, **kw)

    monkeypatch.setattr(A, "fit_with_replicates", slow_fit)

    def tick(i: int) -> None:
        clock.t += 1.0

    profile = adaptive_profile(kit, store, budget_s=32.0)
    final, _ = run(kit, store, lease_dir, profile, CurveTarget(on_generate=tick), clock=clock)
    assert final.state == ProfileState.SUCCEEDED, final.error
    e = final.provenance.entries
    assert e["adaptive.stop"] == "budget" and e["stopping.reason"] == "budget"
    assert e["adaptive.added"] == "" and e["adaptive.unmeasured"] == str(KNEE)
    assert {s.prompt_tokens for s in store.all_samples(profile.id)} == set(GRID)
    assert final.total_samples == final.completed_samples == len(GRID) * len(OUTPUTS) * 3


def test_resumed_adaptive_run_measures_nothing_twice(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    whole = adaptive_profile(kit, store)
    done, _ = run(kit, store, lease_dir, whole, CurveTarget())
    assert done.state == ProfileState.SUCCEEDED, done.error

    parted = adaptive_profile(kit, store)
    cancel = threading.Event()
    # calls: 10 warm-ups, 30 grid samples, then the added size: stop inside its rounds
    first = CurveTarget(on_generate=lambda i: cancel.set() if i == 42 else None)
    stopped, _ = run(kit, store, lease_dir, parted, first, cancel=cancel, batch_samples=4)
    assert stopped.state == ProfileState.CANCELLED
    assert stopped.provenance.entries["adaptive.added"] == str(KNEE)
    second = CurveTarget()
    final, progress = run(kit, store, lease_dir, parted, second)
    assert final.state == ProfileState.SUCCEEDED, final.error
    e = final.provenance.entries
    assert e["profile.resumed_adaptive_sizes"] == str(KNEE)
    assert e["adaptive.added"] == str(KNEE) and e["adaptive.stop"] == "target_met"
    assert progress[1].total_samples == done.total_samples  # known at once after a restart
    # the resumed run re-did its warm-ups (the plan's grid) and only the 3 missing samples
    assert len(second.calls) == 10 + 3
    assert {(p, o) for p, o, _ in second.calls[10:]} <= {(KNEE, 2), (KNEE, 6)}

    def measured(pid: str) -> list[tuple[int, int, int, int]]:
        return [
            (s.prompt_tokens, s.output_tokens, s.repeat, s.prefill_ns)
            for s in ok_samples(store, pid)
        ]

    assert measured(parted.id) == measured(whole.id)  # what one run measures, in order
    assert final.completed_samples == final.total_samples == done.total_samples
