"""Per-namespace quotas of the profiler: what one team may take of a shared profiler.

IDEALRT_QUOTAS_FILE (TOML) sets, per namespace (a table named after it; `"*"` for every
namespace without its own), any of:

    ["*"]
    max_concurrent_profiles = 4       # QUEUED + RUNNING at once
    device_seconds_per_day = 28800    # device time of the namespace's profiles in one UTC day
    max_planned_samples = 5000000     # samples planned by the namespace's stored profiles
    max_running_profiles = 2          # RUNNING at once (GPU nodes held; kubernetes executor)

    [team-a]
    max_concurrent_profiles = 1

A key that is absent means no limit. max_running_profiles is applied by the kubernetes
executor's queue: a namespace that has that many running waits (its profiles stay QUEUED,
keeping its turn) while other namespaces' profiles take free nodes. The others are checked
when a profile is created, before it is stored: a create that would exceed one is
RESOURCE_EXHAUSTED QUOTA_EXCEEDED naming the namespace, the quota, its limit and the
current use. What they count:
- max_concurrent_profiles: the namespace's profiles QUEUED or RUNNING (this one included).
- device_seconds_per_day: the running time (start to end, or to now while running) of the
  namespace's profiles within the current UTC day: a profile holds one device lease for its
  whole run. A profile already running is not stopped when the day's budget is spent; the
  next create is refused until the day turns.
- max_planned_samples: the planned samples (Profile.total_samples, an upper bound of what a
  run stores as OK samples) of the namespace's profiles that did not end CANCELLED or
  FAILED, plus the new plan's.
Without a file nothing is limited.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from idealrt.core.domain import Profile, ProfileState
from idealrt.core.errors import ResourceExhausted
from idealrt.services.profiler.reasons import QUOTA_EXCEEDED

__all__ = ["Quota", "Quotas", "Usage", "usage_of"]

_KEYS = (
    "max_concurrent_profiles",
    "device_seconds_per_day",
    "max_planned_samples",
    "max_running_profiles",
)


@dataclasses.dataclass(frozen=True)
class Quota:
    max_concurrent_profiles: int | None = None
    device_seconds_per_day: float | None = None
    max_planned_samples: int | None = None
    max_running_profiles: int | None = None


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a namespace uses now (see the module docstring for what each counts)."""

    active_profiles: int = 0
    device_seconds_today: float = 0.0
    planned_samples: int = 0


def _day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def usage_of(profiles: Iterable[Profile], namespace: str, now: datetime) -> Usage:
    """The usage of `namespace` from its profiles (others are skipped)."""
    day0 = _day_start(now)
    day1 = day0 + timedelta(days=1)
    active = 0
    seconds = 0.0
    planned = 0
    for p in profiles:
        if p.namespace != namespace:
            continue
        if p.state in (ProfileState.QUEUED, ProfileState.RUNNING):
            active += 1
        if p.start_time is not None:
            end = p.end_time or now
            lo, hi = max(p.start_time, day0), min(end, day1)
            seconds += max(0.0, (hi - lo).total_seconds())
        if p.state not in (ProfileState.CANCELLED, ProfileState.FAILED):
            planned += p.total_samples
    return Usage(active, seconds, planned)


def _positive(value: Any, where: str, integer: bool) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{where} must be {kind}, got {value!r}")
    return value


def _optional(table: Mapping[str, Any], ns: str, key: str, integer: bool) -> float | None:
    return _positive(table[key], f"{ns}.{key}", integer) if key in table else None


@dataclasses.dataclass(frozen=True)
class Quotas:
    by_namespace: Mapping[str, Quota] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> Quotas:
        """From IDEALRT_QUOTAS_FILE (None: no limits); a bad file is a ValueError naming it."""
        if path is None:
            return cls()
        try:
            return cls.from_toml(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
            raise ValueError(f"IDEALRT_QUOTAS_FILE {path}: {exc}") from exc

    @classmethod
    def from_toml(cls, text: str) -> Quotas:
        out: dict[str, Quota] = {}
        for ns, table in tomllib.loads(text).items():
            if not isinstance(table, dict):
                raise ValueError(f"[{ns}] must be a table of quotas")
            unknown = set(table) - set(_KEYS)
            if unknown:
                raise ValueError(f"[{ns}]: unknown quotas {sorted(unknown)}; known: {list(_KEYS)}")

            concurrent = _optional(table, ns, "max_concurrent_profiles", True)
            seconds = _optional(table, ns, "device_seconds_per_day", False)
            samples = _optional(table, ns, "max_planned_samples", True)
            running = _optional(table, ns, "max_running_profiles", True)
            out[ns] = Quota(
                max_concurrent_profiles=None if concurrent is None else int(concurrent),
                device_seconds_per_day=seconds,
                max_planned_samples=None if samples is None else int(samples),
                max_running_profiles=None if running is None else int(running),
            )
        return cls(out)

    @property
    def enabled(self) -> bool:
        return bool(self.by_namespace)

    def quota(self, namespace: str) -> Quota:
        return self.by_namespace.get(namespace) or self.by_namespace.get("*") or Quota()

    def running_limit(self, namespace: str) -> int | None:
        """max_running_profiles of `namespace` (None: no limit): the executor's queue."""
        return self.quota(namespace).max_running_profiles

    def check_create(self, namespace: str, usage: Usage, new_planned_samples: int) -> None:
        """RESOURCE_EXHAUSTED QUOTA_EXCEEDED when one more profile of `new_planned_samples`
        would exceed a quota of `namespace`."""
        q = self.quota(namespace)
        checks = [
            (
                "max_concurrent_profiles",
                q.max_concurrent_profiles,
                usage.active_profiles + 1,
                f"{usage.active_profiles} profiles QUEUED or RUNNING",
            ),
            (
                "device_seconds_per_day",
                q.device_seconds_per_day,
                usage.device_seconds_today,
                f"{usage.device_seconds_today:.0f} device-seconds used today (UTC)",
            ),
            (
                "max_planned_samples",
                q.max_planned_samples,
                usage.planned_samples + new_planned_samples,
                f"{usage.planned_samples} samples planned by stored profiles, "
                f"{new_planned_samples} by this one",
            ),
        ]
        for name, limit, would_be, in_use in checks:
            if limit is None:
                continue
            over = would_be >= limit if name == "device_seconds_per_day" else would_be > limit
            if over:
                raise ResourceExhausted(
                    QUOTA_EXCEEDED,
                    f"namespace {namespace!r} is at its quota {name}={limit:g}: {in_use}",
                    field="profile.namespace",
                )
