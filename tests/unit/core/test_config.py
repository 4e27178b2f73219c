"""ProfilerConfig.from_env: the profiler's robustness switches read from the environment."""

from __future__ import annotations

from idealrt.core.config import ProfilerConfig


def test_defaults_write_in_background_and_judge_contention() -> None:
    cfg = ProfilerConfig.from_env({})
    assert cfg.background_writes and cfg.contention_checks and cfg.contention_monitors
    assert cfg.outage_window_s == 300.0


def test_switches_are_read_from_the_environment() -> None:
    cfg = ProfilerConfig.from_env(
        {
            "IDEALRT_BACKGROUND_WRITES": "0",
            "IDEALRT_CONTENTION_CHECKS": "0",
            "IDEALRT_CONTENTION_MONITORS": "0",
            "IDEALRT_OUTAGE_WINDOW_S": "12.5",
        }
    )
    assert not cfg.background_writes
    assert not cfg.contention_checks and not cfg.contention_monitors
    assert cfg.outage_window_s == 12.5
