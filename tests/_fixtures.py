"""Shared test plumbing: the modules of tests/fixtures (fake servers), loaded once under a
package name of their own, and waiting for a condition with a deadline."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_fixture(name: str) -> ModuleType:
    """tests/fixtures/NAME.py as module idealrt_test_fixtures.NAME (loaded once)."""
    full = f"idealrt_test_fixtures.{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, FIXTURES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """cond()'s first truthy value within `timeout` seconds; AssertionError after."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s")
