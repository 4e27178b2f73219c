"""The layer rules of the house style hold, and import-linter catches a break of them.

The contracts live in pyproject.toml ([tool.importlinter]); `make lint` runs them on the
tree (scripts/lint-imports.sh). Here they run on a copy of the source with one forbidden
import added per contract, to show each contract fails when it should."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")
FOLDERS = {"core": "core", "services": "services", "clients": "clients"}


def _tree(tmp: Path) -> Path:
    """A copy of the `idealrt` namespace as import-linter sees it (package-dir mapping)."""
    pkg = tmp / "src" / "idealrt"
    shutil.copytree(ROOT / "gen" / "idealrt", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in FOLDERS.items():
        shutil.copytree(ROOT / folder, pkg / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    return pkg


def _lint(tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(tmp / "pyproject.toml"), "--no-cache"],
        cwd=tmp,
        env={"PYTHONPATH": str(tmp / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    _tree(tmp_path)
    r = _lint(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BROKEN" not in r.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "core/domain.py",
            "import idealrt.services.store.repository",
            "idealrt.core imports no service and no client",
        ),
        (
            "core/costmodel/fit.py",
            "import idealrt.clients.metrics",
            "idealrt.core imports no service and no client",
        ),
        (
            "services/profiler/adaptive.py",
            "import idealrt.services.metrics.engine",
            "no service imports another service",
        ),
        (
            "clients/serving.py",
            "import idealrt.services.serving.registry",
            "the client library imports core and gen only, never a service or the CLI",
        ),
        (
            "clients/cli/_metrics.py",
            "import idealrt.services.metrics.pareto",
            "the CLI imports services only through the embedded suite's entry points",
        ),
        (
            "services/store/repository.py",
            "import idealrt.services.suite",
            "services import neither the CLI nor the suite's entry points",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    pkg = _tree(tmp_path)
    target = pkg / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert f"{contract} BROKEN" in r.stdout, r.stdout
