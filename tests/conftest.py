"""Shared fixtures: the real suite on 127.0.0.1 port 0 with a SQLite store in tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    from idealrt.core.logging import configure_logging

    configure_logging("warning", json=True)


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """All four services, each its own gRPC server on a free loopback port. Its profiles run
    unpinned on a shared machine, where other load is expected and says nothing about what
    these tests check (the pipeline, not contention): contention checks are off, so other
    load cannot make a profile INVALID at random. Contention detection is tested with
    injected contention in tests/unit/profiler (test_contention, test_runner,
    test_real_serving)."""
    from idealrt.services.suite import start_suite

    data = tmp_path_factory.mktemp("suite")
    s = start_suite(data_dir=Path(data), contention_monitors=False, contention_checks=False)
    try:
        yield s
    finally:
        s.stop(1.0)
