"""The images' package sets (k8s/Dockerfile, pyproject's extras, k8s/README.md "Images"):
what each image installs, resolved with pip's own resolver.

No Docker engine runs in the development environment, so the images are never built here;
what is checked is what `pip install` would put in each: the static sets first (the
Dockerfile's CPU_EXTRAS / GPU_EXTRAS expanded through pyproject.toml), then a dry-run
resolution of each against PyPI (`pip install --dry-run --report`, marked `network`).

What the resolution does not cover: the CPU image takes torch from PyTorch's CPU index,
which is unreachable here, so the CPU set is resolved with this machine's pip
configuration, whose local CPU wheel stands in for it (the check is that nothing else in
the CPU set pulls CUDA); and `tensorrt-cu13` on PyPI is a stub whose metadata build
downloads from pypi.nvidia.com (unreachable here), so the GPU set is resolved without it
and TensorRT's CUDA major is checked against torch's by name only.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "k8s" / "Dockerfile").read_text()
README = (REPO / "k8s" / "README.md").read_text()
EXTRAS: dict[str, list[str]] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]
CUDA_MAJOR = "13"  # torch 2.13's PyPI build (Dockerfile TORCH_VERSION)


def _dockerfile_extras(variant: str) -> list[str]:
    m = re.search(rf"^ARG {variant}_EXTRAS=(\S+)$", DOCKERFILE, re.M)
    assert m, f"k8s/Dockerfile has no ARG {variant}_EXTRAS"
    return m.group(1).split(",")


def _requirements(extras: list[str]) -> list[Requirement]:
    out: list[Requirement] = []
    for extra in extras:
        for line in EXTRAS[extra]:
            req = Requirement(line)
            if req.name == "idealrt":
                out += _requirements(sorted(req.extras))
            else:
                out.append(req)
    return out


def _names(extras: list[str]) -> set[str]:
    return {r.name.lower() for r in _requirements(extras)}


def test_the_gpu_image_has_every_gpu_stack_and_no_cpu_onnxruntime() -> None:
    names = _names(_dockerfile_extras("GPU"))
    assert {"onnxruntime-gpu", f"tensorrt-cu{CUDA_MAJOR}", "transformers"} <= names
    assert "onnxruntime" not in names  # the same `onnxruntime` package as onnxruntime-gpu
    assert "onnx" not in _dockerfile_extras("GPU")  # the extra that brings it


def test_the_cpu_image_has_the_cpu_stacks_and_nothing_for_cuda() -> None:
    names = _names(_dockerfile_extras("CPU"))
    assert {"onnxruntime", "transformers"} <= names
    assert not {n for n in names if n.startswith(("onnxruntime-gpu", "tensorrt", "nvidia-"))}


def test_the_extras_install_exactly_their_stack() -> None:
    """`pip install idealrt[gpu]` / `[tensorrt]` (the README's and the errors' advice) bring
    the GPU builds, and nothing in them the CPU onnxruntime."""
    assert "onnxruntime-gpu" in _names(["gpu"]) and "onnxruntime" not in _names(["gpu"])
    assert f"tensorrt-cu{CUDA_MAJOR}" in _names(["tensorrt"])
    assert "onnxruntime" not in _names(["tensorrt"])
    assert "onnxruntime-gpu" not in _names(["onnx"])


def test_the_readme_says_what_the_dockerfile_installs() -> None:
    table = README[README.index("## Images") :].split("\n\n")[1]
    cpu_row = next(line for line in table.splitlines() if line.startswith("| CPU"))
    gpu_row = next(line for line in table.splitlines() if line.startswith("| GPU"))
    assert "`onnxruntime`" in cpu_row and "onnxruntime-gpu" not in cpu_row
    assert "`onnxruntime-gpu`" in gpu_row and f"`tensorrt-cu{CUDA_MAJOR}`" in gpu_row
    assert f"CUDA {CUDA_MAJOR} torch" in gpu_row and "CPU torch" in cpu_row


# ---- resolution (pip's resolver against PyPI)


def _pypi_reachable() -> bool:
    try:
        socket.getaddrinfo("pypi.org", 443)
    except OSError:
        return False
    return True


def _resolve(tmp_path: Path, args: list[str], env: dict[str, str]) -> dict[str, str]:
    """{name: version} that `pip install args` would install into an empty environment."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
    out = subprocess.run(
        [*cmd, "--report", str(report), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(report.read_text())
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in doc["install"]}


network = pytest.mark.skipif(not _pypi_reachable(), reason="PyPI (pypi.org) is unreachable")


@pytest.mark.network
@pytest.mark.slow
@network
def test_the_cpu_set_resolves_without_cuda(tmp_path: Path) -> None:
    """With this machine's pip configuration (its local CPU torch wheel, standing in for
    PyTorch's CPU index): nothing else in the CPU image pulls a CUDA package."""
    got = _resolve(
        tmp_path,
        ["torch==2.13.0", f"{REPO}[{','.join(_dockerfile_extras('CPU'))}]"],
        dict(os.environ),
    )
    assert got["torch"].endswith("+cpu"), got["torch"]
    assert "onnxruntime" in got and "onnxruntime-gpu" not in got
    cuda = sorted(n for n in got if n.startswith(("nvidia-", "cuda-", "triton", "tensorrt")))
    assert not cuda, cuda


@pytest.mark.network
@pytest.mark.slow
@network
def test_the_gpu_set_resolves_to_cuda_builds_only(tmp_path: Path) -> None:
    """From PyPI alone (this machine's pip configuration, with its CPU torch, switched off):
    torch's CUDA build and onnxruntime-gpu agree on one CUDA runtime, and no CPU
    onnxruntime comes in. tensorrt-cu13 is left out (module docstring)."""
    reqs = [
        str(r)
        for r in _requirements(_dockerfile_extras("GPU"))
        if not r.name.lower().startswith("tensorrt")
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    got = _resolve(tmp_path, ["torch==2.13.0", str(REPO), *reqs], env)
    assert not got["torch"].endswith("+cpu"), got["torch"]
    assert "onnxruntime-gpu" in got and "onnxruntime" not in got
    assert got["nvidia-cuda-runtime"].split(".")[0] == CUDA_MAJOR
    assert "nvidia-cudnn-cu13" in got
