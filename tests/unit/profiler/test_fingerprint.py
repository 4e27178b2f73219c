"""Environment fingerprint on this machine (real /proc, real importlib.metadata, real git)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from idealrt.core.domain import LeasePolicy, Profile, ProfilePlan, StackSpec
from idealrt.services.profiler import fingerprint as F


def test_fingerprint_entries(kit) -> None:  # type: ignore[no-untyped-def]
    profile = dataclasses.replace(
        kit.make_profile(),
        stack=StackSpec(options={"threads": "2"}),
        start_time=datetime(2025, 1, 2, tzinfo=UTC),
    )
    prov = F.collect_fingerprint(profile, target_env={"kind": "x"}, extra={"monitor.cpu": "y"})
    e = prov.entries
    for key in (
        "cpu.model",
        "cpu.logical_cores",
        "cpu.affinity",
        "mem.total_bytes",
        "os.kernel",
        "python.version",
        "numpy.version",
        "torch.version",
        "grpcio.version",
        "tensorrt.version",
        "gpu.count",
        "idealrt.version",
        "idealrt.git_rev",
        "model.spec_hash",
        "plan",
        "stack.backend",
    ):
        assert e[key], key
    assert e["numpy.version"] != "absent"
    assert e["tensorrt.version"] == "absent"  # not installed here: said, not omitted
    assert e["stack.option.threads"] == "2"
    assert e["target.kind"] == "x" and e["monitor.cpu"] == "y"
    assert e["profile.start_time"].startswith("2025-01-02")
    assert json.loads(e["plan"])["prompt_tokens"] == [8, 32]
    assert all(isinstance(v, str) for v in e.values())


def test_plan_json_is_canonical() -> None:
    plan = ProfilePlan((8,), (4,), lease=LeasePolicy.FAIL)
    text = F.plan_json(plan)
    assert json.loads(text)["lease"] == "fail"
    assert text == F.plan_json(dataclasses.replace(plan))


def test_spec_hash_tracks_the_shape(kit) -> None:  # type: ignore[no-untyped-def]
    spec = kit.TINY_SPEC
    assert F.spec_hash(spec) == F.spec_hash(dataclasses.replace(spec))
    assert F.spec_hash(spec) != F.spec_hash(dataclasses.replace(spec, layers=3))


def test_git_revision(tmp_path: Path) -> None:
    rev = F.git_revision()
    here = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    if here.returncode == 0:
        assert rev.removesuffix("-dirty") == here.stdout.strip()
    assert F.git_revision(tmp_path) == "unknown"


def test_profile_without_spec(kit) -> None:  # type: ignore[no-untyped-def]
    profile = dataclasses.replace(
        kit.make_profile(), model=dataclasses.replace(kit.make_profile().model, spec=None)
    )
    assert isinstance(profile, Profile)
    assert F.collect_fingerprint(profile).entries["model.spec_hash"] == "unknown"
