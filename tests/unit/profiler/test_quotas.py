"""Per-namespace quotas (services/profiler/quotas.py): parsing, what is counted, refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from idealrt.core.domain import ModelRef, Profile, ProfilePlan, ProfileState, StackSpec
from idealrt.core.errors import ResourceExhausted
from idealrt.services.profiler.quotas import Quotas, Usage, usage_of

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _p(
    ns: str,
    state: ProfileState,
    total: int = 10,
    start_h: float | None = None,
    hours: float | None = None,
) -> Profile:
    start = None if start_h is None else NOW - timedelta(hours=start_h)
    end = None if start is None or hours is None else start + timedelta(hours=hours)
    return Profile(
        id=f"p-{ns}-{state.value}-{start_h}",
        model=ModelRef(name="m"),
        stack=StackSpec(),
        plan=ProfilePlan(prompt_tokens=(8,), output_tokens=(2,)),
        namespace=ns,
        state=state,
        total_samples=total,
        start_time=start,
        end_time=end,
    )


def test_usage_counts_active_profiles_todays_device_time_and_planned_samples() -> None:
    profiles = [
        _p("a", ProfileState.RUNNING, 100, start_h=1.0),  # 1 h so far
        _p("a", ProfileState.QUEUED, 50),
        _p("a", ProfileState.SUCCEEDED, 30, start_h=14.0, hours=4.0),  # 2 h of it today
        _p("a", ProfileState.CANCELLED, 1000, start_h=3.0, hours=1.0),  # device time counts
        _p("a", ProfileState.FAILED, 1000),
        _p("b", ProfileState.RUNNING, 7, start_h=5.0),  # another namespace
    ]
    u = usage_of(profiles, "a", NOW)
    assert u.active_profiles == 2
    assert u.device_seconds_today == pytest.approx(3600 + 2 * 3600 + 3600)
    assert u.planned_samples == 100 + 50 + 30


def test_each_quota_refuses_with_its_name_limit_and_use() -> None:
    q = Quotas.from_toml(
        """
        ["*"]
        max_concurrent_profiles = 2
        [team-a]
        device_seconds_per_day = 3600
        max_planned_samples = 1000
        """
    )
    q.check_create("other", Usage(active_profiles=1), 10)
    with pytest.raises(ResourceExhausted) as e:
        q.check_create("other", Usage(active_profiles=2), 10)
    assert e.value.reason == "QUOTA_EXCEEDED" and e.value.field == "profile.namespace"
    assert "max_concurrent_profiles=2" in str(e.value) and "2 profiles" in str(e.value)
    q.check_create("team-a", Usage(active_profiles=50), 10)  # its own table: no such limit
    with pytest.raises(ResourceExhausted, match="device_seconds_per_day=3600"):
        q.check_create("team-a", Usage(device_seconds_today=3600.0), 1)
    q.check_create("team-a", Usage(planned_samples=990), 10)
    with pytest.raises(ResourceExhausted, match="max_planned_samples=1000: 990 samples"):
        q.check_create("team-a", Usage(planned_samples=990), 11)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[a]\nmax_profiles = 1\n", "unknown quotas"),
        ("[a]\nmax_concurrent_profiles = 0\n", "positive integer"),
        ("[a]\nmax_concurrent_profiles = 1.5\n", "positive integer"),
        ("[a]\ndevice_seconds_per_day = -1\n", "positive number"),
        ("[a]\ndevice_seconds_per_day = nan\n", "positive number"),
        ("a = 1\n", "must be a table"),
    ],
)
def test_bad_files_are_refused_naming_the_key(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Quotas.from_toml(text)


def test_no_file_no_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert not Quotas.load(None).enabled
    Quotas.load(None).check_create("any", Usage(10**6, 10.0**9, 10**12), 10**9)
    bad = tmp_path / "q.toml"
    bad.write_text("[a\n")
    with pytest.raises(ValueError, match=str(bad)):
        Quotas.load(bad)


def test_the_manager_refuses_a_create_over_quota_before_storing_it(  # type: ignore[no-untyped-def]
    kit, store, lease_dir
) -> None:
    """A real SQLite store and manager; the device lease is held by the test, so created
    profiles stay QUEUED (active) for as long as it needs."""
    import dataclasses

    from idealrt.services.profiler.lease import acquire_lease
    from idealrt.services.profiler.manager import ProfileManager

    quotas = Quotas.from_toml(
        "[team-a]\nmax_concurrent_profiles = 1\n[team-c]\nmax_planned_samples = 20\n"
    )
    lease = acquire_lease(lease_dir, "cpu", profile_id="the-test")
    m = ProfileManager(
        store,
        lambda p: kit.SyntheticTarget(),
        lease_dir,
        options=kit.quiet_options(lease_dir),
        quotas=quotas,
    )
    try:
        first = m.create(dataclasses.replace(kit.make_profile(), namespace="team-a"))
        assert first.state == ProfileState.QUEUED and first.total_samples == 12
        with pytest.raises(ResourceExhausted) as e:
            m.create(dataclasses.replace(kit.make_profile(), namespace="team-a"))
        assert "max_concurrent_profiles=1: 1 profiles QUEUED or RUNNING" in str(e.value)
        assert len(store.list_profiles(100, "")[0]) == 1  # nothing stored for it
        # another namespace has no such quota
        m.create(dataclasses.replace(kit.make_profile(), namespace="team-b"))
        m.cancel(first.id)
        kit.wait_until(lambda: store.get_profile(first.id).state.terminal, "cancel stored")
        m.create(dataclasses.replace(kit.make_profile(), namespace="team-a"))  # room again
        # planned samples: 12 + 12 > 20 while the first is not CANCELLED/FAILED
        m.create(dataclasses.replace(kit.make_profile(), namespace="team-c"))
        with pytest.raises(ResourceExhausted, match="max_planned_samples=20: 12 samples"):
            m.create(dataclasses.replace(kit.make_profile(), namespace="team-c"))
    finally:
        lease.release()
        m.shutdown(timeout=20)
