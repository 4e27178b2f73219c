"""The environment fingerprint of a profile: flat Provenance entries.

Keys (values are strings; "absent"/"unknown" rather than missing where a reader would
otherwise wonder):
  cpu.model, cpu.logical_cores, cpu.affinity, cpu.flags (the SIMD ones), cpu.governor,
  mem.total_bytes, os.system, os.kernel, os.release, python.version,
  python.implementation, <lib>.version for torch, onnxruntime, tensorrt, transformers,
  numpy, grpcio, gpu.count and gpu.<i>.{name,uuid,memory_bytes} + gpu.driver,
  gpu.cuda_driver (NVML, when available), idealrt.version, idealrt.git_rev,
  model.spec_hash, model.name, plan (JSON), stack.backend, stack.device, stack.dtype,
  stack.option.<k>, profile.start_time, plus target.<k> for what the target reports.

Library versions come from importlib.metadata: nothing heavy is imported.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from idealrt.core.clock import utcnow
from idealrt.core.domain import Profile, ProfilePlan, Provenance
from idealrt.core.fingerprint import LIBRARIES, git_revision, machine_environment
from idealrt.core.model_spec import ModelSpec

__all__ = [
    "LIBRARIES",
    "collect_fingerprint",
    "git_revision",
    "plan_json",
    "spec_hash",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def plan_json(plan: ProfilePlan) -> str:
    return json.dumps(_jsonable(dataclasses.asdict(plan)), sort_keys=True, separators=(",", ":"))


def spec_hash(spec: ModelSpec) -> str:
    """sha256 of the spec's canonical JSON (`ModelSpec.spec_hash()` when the spec defines
    one, so every service agrees)."""
    own = getattr(spec, "spec_hash", None)
    if callable(own):
        return str(own())
    canonical = json.dumps(
        _jsonable(dataclasses.asdict(spec)), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def collect_fingerprint(
    profile: Profile,
    *,
    spec: ModelSpec | None = None,
    target_env: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> Provenance:
    """Everything that can change a measurement, as Provenance entries."""
    e: dict[str, str] = machine_environment()
    resolved = spec or profile.model_spec or profile.model.spec
    e["model.name"] = resolved.name if resolved else profile.model.name
    e["model.spec_hash"] = spec_hash(resolved) if resolved else "unknown"
    e["model.seed"] = str(profile.model.seed)
    e["model.weights_path"] = profile.model.weights_path or "random-init"
    e["plan"] = plan_json(profile.plan)
    e["stack.backend"] = str(profile.stack.backend.value)
    e["stack.device"] = profile.stack.device
    e["stack.dtype"] = profile.stack.dtype
    for k, v in sorted(profile.stack.options.items()):
        e[f"stack.option.{k}"] = v
    start = profile.start_time or utcnow()
    e["profile.start_time"] = start.isoformat()
    for k, v in (target_env or {}).items():
        e[f"target.{k}"] = str(v)
    e.update(extra or {})
    return Provenance(entries=e)
