"""Every profiler domain module exports what its __all__ claims, and imports no gRPC."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

MODULES = [
    "plan",
    "stopping",
    "contention",
    "monitors",
    "_device_monitors",
    "lease",
    "fingerprint",
    "serving_target",
    "runner",
    "manager",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_what_it_claims(name: str) -> None:
    module = importlib.import_module(f"idealrt.services.profiler.{name}")
    exported = module.__all__
    assert sorted(exported) == sorted(set(exported))
    for symbol in exported:
        assert hasattr(module, symbol), symbol
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    }
    assert public <= set(exported), public - set(exported)


@pytest.mark.parametrize("name", MODULES)
def test_domain_modules_do_not_import_grpc_directly(name: str) -> None:
    module = importlib.import_module(f"idealrt.services.profiler.{name}")
    source = Path(module.__file__ or "").read_text(encoding="utf-8")
    assert "import grpc" not in source and "_pb2" not in source
    assert "grpc" not in vars(module)
    assert sys.modules.get(module.__name__) is module
