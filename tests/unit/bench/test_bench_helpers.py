"""The benches' pure helpers (bench/_common.py, bench/_hog.py, bench/run_all.py): workloads,
sample files, target checks, hog schedules and overlaps, the summary. No timing here:
benchmarks report numbers, tests check behaviour."""

from __future__ import annotations

import itertools
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from idealrt.core.domain import ContentionObservation, Sample, SampleFlag

BENCH = Path(__file__).resolve().parents[3] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _common as c  # noqa: E402
import _hog  # noqa: E402
import run_all  # noqa: E402


def test_workload_is_seeded_and_in_range() -> None:
    p, o = c.workload(5000, 3, (16, 960), (1, 64))
    p2, o2 = c.workload(5000, 3, (16, 960), (1, 64))
    assert np.array_equal(p, p2) and np.array_equal(o, o2)
    assert p.min() >= 16 and p.max() <= 960 and o.min() >= 1 and o.max() <= 64
    assert set(np.unique(o).tolist()) == set(range(1, 65))
    # log-uniform: as many prompts in [16, 124) as in [124, 960] (log midpoint ~124)
    low = float(np.mean(p < 124))
    assert 0.45 < low < 0.55
    assert not np.array_equal(p, c.workload(5000, 4, (16, 960), (1, 64))[0])


def test_sample_round_trip() -> None:
    s = Sample(
        prompt_tokens=7,
        output_tokens=3,
        prefill_ns=100,
        decode_ns=(20, 30),
        total_ns=150,
        start_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        rpc_ns=170,
        heldout=True,
        repeat=2,
        flag=SampleFlag.CONTENDED,
        contention=ContentionObservation(foreign_cpu_s=0.25),
    )
    back = c.sample_from_dict(json.loads(json.dumps(c.sample_to_dict(s))))
    assert back == s


def test_save_and_load_samples(tmp_path: Path) -> None:
    s = Sample(prompt_tokens=1, output_tokens=1, prefill_ns=5, decode_ns=(), total_ns=5)
    path = tmp_path / "x.json"
    c.save_samples(path, [s, s], {"plan": {"repeats": 2}})
    samples, meta = c.load_samples(path)
    assert samples == [s, s] and meta == {"plan": {"repeats": 2}}
    assert c.device_seconds(samples) == pytest.approx(10e-9)
    assert c.flag_counts(samples) == {"ok": 2}


@pytest.mark.parametrize(
    ("value", "op", "threshold", "met"),
    [
        (0.01, "<=", 0.02, True),
        (0.03, "<=", 0.02, False),
        (6.0, ">=", 5.0, True),
        (4.0, ">=", 5.0, False),
        (None, ">=", 5.0, None),
        (float("nan"), "<=", 1.0, None),
    ],
)
def test_target(value: float | None, op: str, threshold: float, met: bool | None) -> None:
    t = c.target("x", value, op, threshold, "%")
    assert t["met"] is met and t["unit"] == "%" and t["op"] == op


def test_fmt() -> None:
    assert c.fmt(0.0123, "%") == "1.23%"
    assert c.fmt(5.0, "x") == "5.00x"
    assert c.fmt(None, "") == "n/a"
    assert c.fmt(1234567.0, "") == "1.235e+06"


def test_error_stats() -> None:
    e = c.error_stats([1.1, 2.0, 2.7], [1.0, 2.0, 3.0])
    assert e["points"] == 3
    assert e["mean_rel"] == pytest.approx((0.1 + 0.0 + 0.1) / 3)
    assert e["max_rel"] == pytest.approx(0.1)


def test_hog_segments_are_seeded_and_reach_the_duty() -> None:
    a = list(itertools.islice(_hog.segments(5, 0.4, 0.3, 2.0), 4000))
    assert a == list(itertools.islice(_hog.segments(5, 0.4, 0.3, 2.0), 4000))
    assert all(0.3 <= d <= 2.0 for _, d in a)
    on = sum(d for is_on, d in a if is_on) / sum(d for _, d in a)
    assert 0.37 < on < 0.43
    assert not any(on for on, _ in itertools.islice(_hog.segments(1, 0.0, 0.3, 2.0), 100))


def test_overlap_fraction() -> None:
    spans = [(1.0, 2.0), (3.0, 4.0)]
    assert _hog.overlap_fraction(spans, 0.0, 1.0) == 0.0
    assert _hog.overlap_fraction(spans, 1.5, 3.5) == pytest.approx(0.5)
    assert _hog.overlap_fraction(spans, 1.2, 1.8) == 1.0
    assert _hog.overlap_fraction(spans, 2.0, 2.0) == 0.0
    assert _hog.overlap_fraction([], 0.0, 5.0) == 0.0


def test_bench_command() -> None:
    out = Path("/tmp/r")
    cmd = run_all.bench_command("profiling_cost", True, out, {"queries": "7", "core": "0"})
    assert cmd[1].endswith("bench_profiling_cost.py")
    assert cmd[2:] == ["--out-dir", "/tmp/r", "--quick", "--core", "0", "--queries", "7"]
    est = run_all.bench_command("estimate", False, out, {"core": "0"})
    assert est[2:] == ["--out", "/tmp/r/estimate.json"]
    assert "--queries" not in run_all.bench_command("accuracy", False, out, {"queries": "7"})


def test_summary_tables_targets_and_missing_benches(tmp_path: Path) -> None:
    doc = {
        "benchmark": "accuracy",
        "quick": True,
        "time_end": "2026-01-01T00:00:00+00:00",
        "machine": {"environment": {"cpu.model": "TestCPU", "torch.version": "9"}},
        "summary_md": ["- a line"],
        "targets": [c.target("mean error", 0.05, "<=", 0.02, "%")],
    }
    (tmp_path / "accuracy.json").write_text(json.dumps(doc))
    (tmp_path / "estimate.json").write_text(
        json.dumps(
            {
                "machine": {"cpu_model": "TestCPU", "logical_cpus": 2, "loadavg_1m": 0.5},
                "headline_queries_per_s": 2e6,
                "target_queries_per_s": 1e6,
                "results": {
                    "estimate_workload": {"queries": 10, "repeats": 1, "queries_per_s_median": 2e6}
                },
            }
        )
    )
    text = run_all.summary(tmp_path, {"accuracy": {"rc": 0, "seconds": 3.0}}).read_text()
    assert "| accuracy | mean error | 5.00% | <= 2.00% | **no** |" in text
    assert "| estimate | estimate_workload queries/s (median) | 2e+06 | >= 1e+06 | yes |" in text
    assert "- a line" in text and "quick smoke run" in text and "TestCPU" in text
    assert "## denoise\n\nnot run" in text


def test_run_all_rejects_unknown_bench() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope", "--summary-only"])


def test_confusion_sorts_judged_samples_by_flag_and_hog_overlap() -> None:
    from _hog import confusion

    def sample(start: float, seconds: float, flag: SampleFlag) -> Sample:
        return Sample(
            prompt_tokens=1,
            output_tokens=1,
            prefill_ns=int(seconds * 1e9),
            decode_ns=(),
            total_ns=int(seconds * 1e9),
            start_time=datetime.fromtimestamp(start, UTC),
            flag=flag,
        )

    hog = [(100.0, 110.0)]
    samples = [
        sample(101, 1, SampleFlag.CONTENDED),  # under the hog, flagged
        sample(109.5, 1, SampleFlag.OK),  # half under it, missed
        sample(120, 1, SampleFlag.CONTENDED),  # no hog, flagged
        sample(130, 1, SampleFlag.OK),  # clean
        sample(105, 1, SampleFlag.WARMUP),  # not judged
    ]
    assert confusion(samples, hog) == {
        "flagged_and_hog": 1,
        "flagged_no_hog": 1,
        "missed_hog": 1,
        "clean_ok": 1,
    }
