"""Kubernetes test plumbing: the manifests under k8s/, the Kubernetes versions they are
validated against, and a strict offline validator (kubernetes-validate: unknown fields are
errors). Test modules cannot import a conftest, so what they share comes as fixtures and as
parameters from `pytest_generate_tests`:
- `k8s_version`: each version in VERSIONS;
- `schema_version`: each version in SCHEMA_VERSIONS (1.30 through 1.37, those the package
  ships);
- `resource`: (label, document) for every Kubernetes object in every YAML under k8s/,
  except kustomize patches (k8s/overlays/*/patches/: partial objects, validated only as
  part of the rendered overlay, tests/unit/k8s/test_overlays.py);
- `workload`: the same for idealrt's own objects with a pod template (Deployments, Jobs:
  label app.kubernetes.io/name=idealrt, the image k8s/Dockerfile builds); third-party
  workloads such as dev-cpu's PostgreSQL have their own tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S_DIR = Path(__file__).resolve().parents[3] / "k8s"
# 1.29: the first release with native sidecars on by default (the Job needs them);
# and the newest release whose schemas kubernetes-validate ships
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# the range tests/unit/k8s/test_executor_manifests.py validates the executor's Jobs for
# (the same rule: 1.30 through 1.37, where kubernetes-validate ships the schemas)
_SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
SCHEMA_VERSIONS = tuple(
    v for v in (f"1.{m}.0" for m in range(30, 38)) if (_SCHEMA_DIR / f"v{v}-local-strict").is_dir()
)
NOT_API_KINDS = {"Kustomization"}  # kustomize's own file: no API schema
PATCH_DIR = "patches"  # k8s/overlays/<name>/patches/: kustomize patches, not whole objects

Doc = dict[str, Any]


def is_patch(path: Path) -> bool:
    rel = path.relative_to(K8S_DIR).parts
    return len(rel) > 3 and rel[0] == "overlays" and rel[2] == PATCH_DIR


def manifest_files() -> list[Path]:
    return sorted(
        p for p in K8S_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and not is_patch(p)
    )


def is_idealrt_workload(doc: Doc) -> bool:
    labels = doc.get("metadata", {}).get("labels", {})
    return "template" in doc.get("spec", {}) and labels.get("app.kubernetes.io/name") == "idealrt"


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_resources() -> list[tuple[str, Doc]]:
    out = []
    for path in manifest_files():
        for doc in load_docs(path):
            if doc.get("kind") not in NOT_API_KINDS:
                label = f"{path.relative_to(K8S_DIR)}:{doc['kind']}/{doc['metadata']['name']}"
                out.append((label, doc))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "k8s_version" in metafunc.fixturenames:
        metafunc.parametrize("k8s_version", VERSIONS)
    if "schema_version" in metafunc.fixturenames:
        metafunc.parametrize("schema_version", SCHEMA_VERSIONS)
    if "resource" in metafunc.fixturenames:
        items = all_resources()
        metafunc.parametrize("resource", items, ids=[label for label, _ in items])
    if "workload" in metafunc.fixturenames:
        items = [(label, d) for label, d in all_resources() if is_idealrt_workload(d)]
        metafunc.parametrize("workload", items, ids=[label for label, _ in items])


@pytest.fixture
def validate() -> Callable[[Doc, str], str]:
    """Strict schema validation; raises kubernetes_validate.ValidationError, or
    SchemaNotFoundError for a kind it has no schema for (never a silent skip)."""

    def run(doc: Doc, version: str) -> str:
        return str(kubernetes_validate.validate(doc, version, strict=True))

    return run


@pytest.fixture
def k8s_dir() -> Path:
    return K8S_DIR


@pytest.fixture
def load() -> Callable[[str], list[Doc]]:
    """The documents of k8s/<relative path>."""
    return lambda rel: load_docs(K8S_DIR / rel)


@pytest.fixture
def job_template() -> Doc:
    (job,) = load_docs(K8S_DIR / "jobs" / "profile-job.yaml")
    return job


@pytest.fixture
def workloads() -> list[Doc]:
    """Every idealrt object with a pod template (Deployments, Jobs) under k8s/."""
    return [d for _, d in all_resources() if is_idealrt_workload(d)]
