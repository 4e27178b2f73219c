"""Contention detection from the samples themselves and from the monitors.

A sample is CONTENDED when any of these holds:

1. Monitors: CPU time taken from us during the sample (`foreign_cpu_s`, see monitors.py)
   is at least `foreign_cpu_frac` of the sample's wall time and at least
   `min_foreign_cpu_s` (scheduler noise of a millisecond is no evidence), or another
   process is on the GPU.
2. Own baseline: once a configuration has `min_baseline` accepted samples, its total_ns is
   above median + k_mad x MAD (MAD scaled to sigma, x1.4826) *and* more than
   `min_slowdown` slower than the median. Both, so a configuration with almost no spread
   does not flag a 1% wobble, and a noisy one does not flag its own spread.
3. Shared decode model (judges a configuration's first samples too): decode steps cost
   about the same at the same context length whatever the configuration, so accepted
   samples of *all* configurations build a baseline of mean step time per context bucket
   (quarter-octave buckets of p + i). A sample whose steps are, in the median over its
   buckets, slower than that baseline by the same two-sided rule is contended. Used when
   the configuration's own baseline is not ready yet.

The runner stores contended samples (flagged), waits the contention out (blocking waits
until the monitors see the measured cores quiet, `quiet_window_s`, or a back-off without
monitors; INVALID when it lasts `patience_s`), then re-measures the repeat (bounded by
`max_retries`), and ends the profile INVALID when the fraction of contended samples among
all measured ones exceeds `max_contended_frac`; `evidence()` is the human-readable reason
kept in Profile.error.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence

from idealrt.core.domain import Sample, SampleFlag
from idealrt.services.profiler.plan import Config

__all__ = ["ContentionDetector", "ContentionPolicy", "Verdict", "robust_threshold"]

MAD_TO_SIGMA = 1.4826


@dataclasses.dataclass(frozen=True)
class ContentionPolicy:
    enabled: bool = True
    k_mad: float = 5.0
    min_slowdown: float = 0.25
    min_baseline: int = 3
    # two runnable processes share a core about evenly, so load present for a fraction f of
    # a sample takes about f/2 of its wall time: 0.05 flags a sample from ~10% overlap
    # (0.2 needed ~40%, and missed samples slowed 10-25%)
    foreign_cpu_frac: float = 0.05
    min_foreign_cpu_s: float = 0.002
    use_monitors: bool = True
    max_retries: int = 3
    retry_backoff_s: float = 0.25
    max_contended_frac: float = 0.25
    # waiting contention out (runner._wait_out): before a contended sample is measured
    # again, the measured cores must be quiet: windows of quiet_window_s (a blocking wait,
    # then one read of the monitors) until one shows less foreign CPU than
    # foreign_cpu_frac of it and no foreign GPU process; without a monitor, a back-off
    # (quiet_window_s doubling, up to 8x) and the re-measurement judges. Contention that
    # lasts patience_s (from its first contended sample to the next accepted one) ends
    # the profile INVALID.
    quiet_window_s: float = 0.5
    patience_s: float = 120.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    contended: bool
    reasons: tuple[str, ...] = ()
    slowdown: float = 1.0  # value / baseline median of the rule that judged it (1: none)


def robust_threshold(values: Sequence[float], k_mad: float, min_slowdown: float) -> float:
    """The smallest value judged an outlier above `values`: max(median + k*sigma_MAD,
    median * (1 + min_slowdown))."""
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values) * MAD_TO_SIGMA
    return max(med + k_mad * mad, med * (1.0 + min_slowdown))


def _bucket(context: int) -> int:
    return math.floor(4 * math.log2(max(1, context)))


def _step_means(sample: Sample) -> dict[int, float]:
    """Mean decode-step ns per context bucket (step i runs at context p + i + 1)."""
    sums: dict[int, list[int]] = defaultdict(list)
    for i, ns in enumerate(sample.decode_ns):
        sums[_bucket(sample.prompt_tokens + i + 1)].append(ns)
    return {b: sum(v) / len(v) for b, v in sums.items()}


class ContentionDetector:
    """Baselines of accepted samples and the tally of verdicts of one profile."""

    def __init__(self, policy: ContentionPolicy | None = None) -> None:
        self.policy = policy or ContentionPolicy()
        self._totals: dict[Config, list[int]] = defaultdict(list)
        self._steps: dict[int, list[float]] = defaultdict(list)
        self.measured = 0
        self.contended = 0
        self.max_slowdown = 1.0
        self.max_slowdown_at: Config | None = None
        self.max_foreign_cpu_s = 0.0
        self.max_foreign_wall_s = 0.0
        self.gpu_foreign_samples = 0
        self.reason_counts: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------ baselines

    def accept(self, config: Config, sample: Sample) -> None:
        """Add an accepted (OK) sample to the baselines."""
        self._totals[config].append(sample.total_ns)
        for b, mean in _step_means(sample).items():
            self._steps[b].append(mean)

    def seed(self, config: Config, sample: Sample) -> None:
        """Take in a sample stored by an earlier run of the same profile (resume)."""
        if sample.flag == SampleFlag.WARMUP:
            return
        self.measured += 1
        if sample.flag == SampleFlag.CONTENDED:
            self.contended += 1
            self.reason_counts["earlier_run"] += 1
        elif sample.flag == SampleFlag.OK:
            self.accept(config, sample)

    # ------------------------------------------------------------ judging

    def _by_monitors(self, sample: Sample, wall_ns: int) -> list[str]:
        p, obs = self.policy, sample.contention
        reasons: list[str] = []
        wall_s = max(wall_ns, 1) / 1e9
        if obs.foreign_cpu_s >= max(p.min_foreign_cpu_s, p.foreign_cpu_frac * wall_s):
            reasons.append(f"foreign_cpu {obs.foreign_cpu_s:.3f}s in {wall_s:.3f}s")
            self.reason_counts["foreign_cpu"] += 1
        if obs.gpu_foreign_processes > 0:
            reasons.append(f"gpu_foreign_processes {obs.gpu_foreign_processes}")
            self.reason_counts["gpu_foreign_processes"] += 1
        return reasons

    def _by_baseline(self, config: Config, sample: Sample) -> tuple[list[str], float]:
        p = self.policy
        own = self._totals.get(config, [])
        if len(own) >= p.min_baseline:
            limit = robust_threshold(own, p.k_mad, p.min_slowdown)
            ratio = sample.total_ns / statistics.median(own)
            if sample.total_ns > limit:
                self.reason_counts["slow_vs_own_baseline"] += 1
                return [f"total {ratio:.2f}x the median of {len(own)} samples"], ratio
            return [], ratio
        ratios: list[float] = []
        slow: list[bool] = []
        for b, mean in _step_means(sample).items():
            base = self._steps.get(b, [])
            if len(base) < p.min_baseline:
                continue
            ratios.append(mean / statistics.median(base))
            slow.append(mean > robust_threshold(base, p.k_mad, p.min_slowdown))
        if not ratios:
            return [], 1.0
        ratio = statistics.median(ratios)
        if sum(slow) * 2 > len(slow):
            self.reason_counts["slow_vs_shared_decode"] += 1
            return [f"decode steps {ratio:.2f}x the shared per-context baseline"], ratio
        return [], ratio

    def judge(self, config: Config, sample: Sample, wall_ns: int) -> Verdict:
        """Judge one freshly measured sample (not yet accepted) and count it."""
        self.measured += 1
        if not self.policy.enabled:
            return Verdict(False)
        reasons = self._by_monitors(sample, wall_ns) if self.policy.use_monitors else []
        if sample.contention.foreign_cpu_s > self.max_foreign_cpu_s:
            self.max_foreign_cpu_s = sample.contention.foreign_cpu_s
            self.max_foreign_wall_s = wall_ns / 1e9
        if sample.contention.gpu_foreign_processes:
            self.gpu_foreign_samples += 1
        slow, ratio = self._by_baseline(config, sample)
        reasons += slow
        if not reasons:
            return Verdict(False, (), ratio)
        self.contended += 1
        if ratio > self.max_slowdown:
            self.max_slowdown, self.max_slowdown_at = ratio, config
        return Verdict(True, tuple(reasons), ratio)

    # ------------------------------------------------------------ the profile's verdict

    @property
    def contended_fraction(self) -> float:
        return self.contended / self.measured if self.measured else 0.0

    def persistent(self) -> bool:
        return self.policy.enabled and self.contended_fraction > self.policy.max_contended_frac

    def evidence(self, abandoned: int = 0) -> str:
        """What the runner writes into Profile.error for an INVALID profile."""
        p = self.policy
        parts = [
            f"contention persisted: {self.contended} of {self.measured} measured samples "
            f"({self.contended_fraction:.0%}) were contended (limit {p.max_contended_frac:.0%},"
            f" up to {p.max_retries} re-measurements each; {abandoned} repeats abandoned)"
        ]
        if self.reason_counts:
            parts.append(
                "reasons: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.reason_counts.items()))
            )
        if self.max_slowdown_at is not None:
            c = self.max_slowdown_at
            parts.append(
                f"worst slowdown {self.max_slowdown:.2f}x at p={c.prompt_tokens} "
                f"o={c.output_tokens}"
            )
        if self.max_foreign_cpu_s > 0:
            parts.append(
                f"foreign CPU up to {self.max_foreign_cpu_s:.3f}s in a "
                f"{self.max_foreign_wall_s:.3f}s sample"
            )
        if self.gpu_foreign_samples:
            parts.append(f"foreign GPU processes during {self.gpu_foreign_samples} samples")
        return "; ".join(parts)
