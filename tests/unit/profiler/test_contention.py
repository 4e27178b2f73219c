"""Contention verdicts on constructed samples (the rules themselves, no target)."""

from __future__ import annotations

import pytest

from idealrt.core.domain import ContentionObservation, Sample, SampleFlag
from idealrt.services.profiler.contention import (
    ContentionDetector,
    ContentionPolicy,
    robust_threshold,
)
from idealrt.services.profiler.plan import Config

WALL = 100_000_000  # 0.1 s


def sample(p: int, o: int, step_ns: float, prefill_ns: int = 1_000_000, **kw: object) -> Sample:
    steps = tuple(int(step_ns) for _ in range(o - 1))
    return Sample(p, o, prefill_ns, steps, prefill_ns + sum(steps), **kw)


def test_robust_threshold_takes_the_larger_rule() -> None:
    assert robust_threshold([100, 100, 100], 5, 0.25) == pytest.approx(125)
    # spread dominates: median 100, MAD 10 -> sigma 14.826 -> 100 + 5 * 14.826
    assert robust_threshold([90, 100, 110], 5, 0.25) == pytest.approx(100 + 5 * 14.826)


def test_own_baseline_flags_slow_total_only() -> None:
    det = ContentionDetector(ContentionPolicy(min_baseline=3))
    c = Config(8, 4)
    for step in (1e6, 1.01e6, 0.99e6):
        det.accept(c, sample(8, 4, step))
    assert not det.judge(c, sample(8, 4, 1.1e6), WALL).contended
    v = det.judge(c, sample(8, 4, 2e6), WALL)
    assert v.contended and v.slowdown > 1.5
    assert any("median" in r for r in v.reasons)
    assert (det.measured, det.contended) == (2, 1)


def test_shared_decode_model_judges_a_configurations_first_sample() -> None:
    det = ContentionDetector(ContentionPolicy(min_baseline=3))
    # accepted samples of *other* configurations at overlapping contexts
    for p in (8, 9, 10):
        det.accept(Config(p, 16), sample(p, 16, 1e6))
    fresh = Config(12, 8)  # no own baseline
    assert not det.judge(fresh, sample(12, 8, 1.05e6), WALL).contended
    v = det.judge(fresh, sample(12, 8, 1.8e6), WALL)
    assert v.contended and any("shared" in r for r in v.reasons)


def test_no_baseline_at_all_is_not_contended() -> None:
    det = ContentionDetector()
    assert not det.judge(Config(8, 4), sample(8, 4, 9e9), WALL).contended


def test_monitor_foreign_cpu_fraction() -> None:
    det = ContentionDetector(ContentionPolicy(foreign_cpu_frac=0.2, min_foreign_cpu_s=0.03))
    c = Config(8, 4)
    busy = sample(8, 4, 1e6, contention=ContentionObservation(foreign_cpu_s=0.05))
    assert det.judge(c, busy, WALL).contended  # 0.05 s of 0.1 s
    # one 10 ms tick in a 20 ms sample is quantisation, not evidence
    tick = sample(8, 4, 1e6, contention=ContentionObservation(foreign_cpu_s=0.01))
    assert not det.judge(c, tick, 20_000_000).contended
    gpu = sample(8, 4, 1e6, contention=ContentionObservation(gpu_foreign_processes=1))
    assert det.judge(c, gpu, WALL).contended
    ignored = ContentionDetector(ContentionPolicy(use_monitors=False))
    assert not ignored.judge(c, busy, WALL).contended


def test_disabled_policy_never_flags() -> None:
    det = ContentionDetector(ContentionPolicy(enabled=False))
    c = Config(8, 4)
    for _ in range(3):
        det.accept(c, sample(8, 4, 1e6))
    assert not det.judge(c, sample(8, 4, 9e6), WALL).contended
    assert not det.persistent()


def test_persistence_and_evidence() -> None:
    det = ContentionDetector(ContentionPolicy(max_contended_frac=0.25, min_baseline=3))
    c = Config(8, 4)
    for _ in range(3):
        det.accept(c, sample(8, 4, 1e6))
    for _ in range(3):
        det.judge(c, sample(8, 4, 1e6), WALL)
    det.judge(c, sample(8, 4, 3e6, contention=ContentionObservation(foreign_cpu_s=0.08)), WALL)
    assert not det.persistent()  # 1 of 4
    det.judge(c, sample(8, 4, 3e6), WALL)
    assert det.persistent()  # 2 of 5 > 25%
    text = det.evidence(abandoned=1)
    assert "2 of 5" in text and "p=8 o=4" in text and "foreign CPU up to 0.080s" in text


def test_seed_from_stored_samples() -> None:
    det = ContentionDetector(ContentionPolicy(min_baseline=3))
    c = Config(8, 4)
    for flag in (
        SampleFlag.OK,
        SampleFlag.OK,
        SampleFlag.OK,
        SampleFlag.CONTENDED,
        SampleFlag.WARMUP,
    ):
        det.seed(c, sample(8, 4, 1e6, flag=flag))
    assert (det.measured, det.contended) == (4, 1)
    assert det.judge(c, sample(8, 4, 3e6), WALL).contended  # the seeded baseline is used
