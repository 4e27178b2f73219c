"""Packaging and public API: every package folder is installed, every `__all__` is true."""

from __future__ import annotations

import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOTS = {
    "gen/idealrt": "idealrt",
    "core": "idealrt.core",
    "services": "idealrt.services",
    "clients": "idealrt.clients",
}


def _package_dirs() -> set[str]:
    found = set()
    for folder, name in ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(name if str(rel) == "." else f"{name}.{'.'.join(rel.parts)}")
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _package_dirs()
    for folder, name in ROOTS.items():
        assert cfg["package-dir"][name] == folder


def _modules() -> list[str]:
    out = []
    for name in ("idealrt.core", "idealrt.services", "idealrt.clients"):
        pkg = importlib.import_module(name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            if info.name.endswith("__main__") or ".tensorrt" in info.name:
                continue
            out.append(info.name)
    return out


@pytest.mark.parametrize("module", _modules())
def test_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", ()):
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it lacks"


def test_domain_modules_do_not_import_grpc() -> None:
    """pb2 types stay in servicers, servers, converters and clients (house style)."""
    allowed = (
        "servicer.py",
        "server.py",
        "convert.py",
        "grpc_server.py",
        "_grpc_aio.py",  # core/_grpc_aio.py: the grpc.aio model of the bootstrap above
        "grpc_client.py",
        "tls.py",  # core/tls.py: the grpc TLS credentials of the bootstrap above
        "rotating_channel.py",  # core/rotating_channel.py: client channels that follow TLS rotation
        "errors.py",
        "suite.py",
    )
    for folder in ("core", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in allowed or path.name == "__main__.py":
                continue
            text = path.read_text()
            assert "_pb2" not in text, f"{path} touches protobuf types"
            assert "import grpc\n" not in text, f"{path} imports grpc"
