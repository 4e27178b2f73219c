"""The kustomize overlays k8s/overlays/dev-cpu and k8s/overlays/gpu, rendered with
`kubectl kustomize` (offline: nothing is applied): every rendered object validates strictly
(kubernetes-validate, unknown fields fail) for Kubernetes 1.30 through 1.37, every pod is
admissible under the namespace's Pod Security "restricted" level, and each overlay has the
properties it exists for:
- dev-cpu: one replica per Deployment, PostgreSQL as a StatefulSet on a PersistentVolumeClaim
  behind a headless Service, the store's URL (a generated, dev-only Secret) pointing at it,
  profiles run in the profiler (local executor) against a CPU serving Deployment, no GPUs;
- gpu: the kubernetes executor configured, the profiler alone mounting its ServiceAccount
  token and knowing its pod name and namespace, read access to Nodes, and the store's URL
  from the user's Secret idealrt-store-db."""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from idealrt.core.auth import AuthConfig
from idealrt.core.config import ProfilerConfig, ServingConfig
from idealrt.core.tls import TlsConfig
from idealrt.services.serve import DEFAULT_PORTS

Doc = dict[str, Any]
K8S_DIR = Path(__file__).resolve().parents[3] / "k8s"
OVERLAYS = ("dev-cpu", "gpu")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
POSTGRES_IMAGE = "postgres:17"

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not installed: the overlays are rendered with `kubectl kustomize`",
)


@functools.cache
def _render_text(path: str) -> str:
    return subprocess.run(
        ["kubectl", "kustomize", path],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def render(rel: str) -> list[Doc]:
    """The objects `kubectl kustomize k8s/<rel>` renders (a fresh copy each call)."""
    return [d for d in yaml.safe_load_all(_render_text(str(K8S_DIR / rel))) if d]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def pods(docs: list[Doc]) -> list[tuple[str, Doc]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"])
        for d in docs
        if "template" in d.get("spec", {})
    ]


def containers(pod_spec: Doc) -> list[Doc]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def container(docs: list[Doc], deployment: str) -> Doc:
    (c,) = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return c


def config_data(docs: list[Doc]) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", "idealrt-config")["data"])


def env_of(c: Doc, config: dict[str, str]) -> dict[str, str]:
    """The container's literal environment as the process sees it (envFrom, then env)."""
    return {**config, **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}


def ids(docs: list[Doc]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


# ------------------------------------------------------------------ both overlays


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_objects(
    overlay: str, schema_version: str, validate: Callable[[Doc, str], str]
) -> None:
    docs = render(f"overlays/{overlay}")
    assert docs
    for doc in docs:
        assert validate(doc, schema_version) == ".".join(schema_version.split(".")[:2])
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "idealrt", doc["metadata"]["name"]
        else:
            assert "namespace" not in doc["metadata"], doc["metadata"]["name"]


DEV_CPU_REMOVED = {
    ("PodDisruptionBudget", "idealrt-store"),
    ("PodDisruptionBudget", "idealrt-metrics"),
}


@pytest.mark.parametrize(("overlay", "removed"), [("dev-cpu", DEV_CPU_REMOVED), ("gpu", set())])
def test_overlay_keeps_the_base(overlay: str, removed: set[tuple[str, str]]) -> None:
    """Everything of the base is still there, but what the overlay deletes on purpose."""
    base = ids(render("base"))
    assert removed <= base
    assert base - removed <= ids(render(f"overlays/{overlay}"))
    assert not removed & ids(render(f"overlays/{overlay}"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_admissible_under_restricted(overlay: str) -> None:
    """The checks of Pod Security "restricted" (which namespace.yaml enforces) that a pod
    template can fail, for every pod the overlay renders, PostgreSQL's included."""
    docs = render(f"overlays/{overlay}")
    ns = one(docs, "Namespace", "idealrt")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, tpl in pods(docs):
        spec = tpl["spec"]
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), name
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        for c in containers(spec):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert csc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert csc.get("privileged", False) is False, (name, c["name"])
            assert csc.get("runAsUser", sc["runAsUser"]) > 0, (name, c["name"])
            assert "hostPort" not in str(c.get("ports", [])), (name, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_placeholder_or_postgres(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    images = {c["image"] for _, tpl in pods(docs) for c in containers(tpl["spec"])}
    assert images == (
        {"idealrt:latest", POSTGRES_IMAGE} if overlay == "dev-cpu" else {"idealrt:latest"}
    )


# ------------------------------------------------------------------ dev-cpu


def test_dev_cpu_runs_one_replica_of_everything() -> None:
    docs = render("overlays/dev-cpu")
    deployments = of_kind(docs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {
        "idealrt-store",
        "idealrt-metrics",
        "idealrt-profiler",
        "idealrt-serving",
    }
    for d in [*deployments, *of_kind(docs, "StatefulSet")]:
        assert d["spec"]["replicas"] == 1, d["metadata"]["name"]
    # what is left of the PDBs selects no single-replica service pod (it would block drains)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"] == {"idealrt.io/role": "profiling"}


def test_dev_cpu_requests_no_gpu() -> None:
    text = _render_text(str(K8S_DIR / "overlays/dev-cpu"))
    assert "nvidia.com" not in text
    for name, tpl in pods(render("overlays/dev-cpu")):
        assert "nodeSelector" not in tpl["spec"] and "tolerations" not in tpl["spec"], name


def test_dev_cpu_postgres_is_a_statefulset_on_a_claim() -> None:
    docs = render("overlays/dev-cpu")
    (sts,) = of_kind(docs, "StatefulSet")
    spec, tpl = sts["spec"], sts["spec"]["template"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    # the headless Service the StatefulSet's pods are named under
    svc = one(docs, "Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= tpl["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
    (c,) = tpl["spec"]["containers"]
    assert c["image"] == POSTGRES_IMAGE
    assert svc["spec"]["ports"][0]["port"] == c["ports"][0]["containerPort"] == 5432
    # the image's own user (uid/gid 999), the volume writable through fsGroup
    sc = tpl["spec"]["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (999, 999, 999)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: Path(m["mountPath"]) for m in c["volumeMounts"]}
    data = mounts[claim["metadata"]["name"]]
    env = {e["name"]: e for e in c["env"]}
    pgdata = Path(env["PGDATA"]["value"])
    assert pgdata.parent == data  # a subdirectory: initdb wants an empty one it owns
    # the rest of what it writes with a read-only root: the socket directory and /tmp
    assert {Path("/var/run/postgresql"), Path("/tmp")} <= set(mounts.values())
    res = c["resources"]
    assert res["requests"] == res["limits"]  # Guaranteed QoS, as every pod here


def test_dev_cpu_store_url_points_at_the_statefulset() -> None:
    docs = render("overlays/dev-cpu")
    (sts,) = of_kind(docs, "StatefulSet")
    (pg,) = sts["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in pg["env"]}
    (url_env,) = [
        e for e in container(docs, "idealrt-store")["env"] if e["name"] == "IDEALRT_STORE_URL"
    ]
    ref = url_env["valueFrom"]["secretKeyRef"]
    secret = one(docs, "Secret", ref["name"])
    assert secret["metadata"]["labels"]["idealrt.io/dev-only"] == "true"
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    url = urlsplit(values[ref["key"]])
    name, svc, ns = (
        sts["metadata"]["name"],
        sts["spec"]["serviceName"],
        sts["metadata"]["namespace"],
    )
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == (f"{name}-0.{svc}.{ns}.svc", 5432)
    assert url.username == pg_env["POSTGRES_USER"]["value"]
    assert url.path == "/" + pg_env["POSTGRES_DB"]["value"]
    # the same generated Secret gives PostgreSQL its password
    pw_ref = pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert pw_ref["name"] == secret["metadata"]["name"]
    assert url.password == values[pw_ref["key"]]


def test_dev_cpu_profiles_run_locally_against_the_serving_deployment() -> None:
    docs = render("overlays/dev-cpu")
    config = config_data(docs)
    profiler = ProfilerConfig.from_env(env_of(container(docs, "idealrt-profiler"), config))
    assert config["IDEALRT_PROFILER_EXECUTOR"] == "local" and profiler.executor == "local"
    host, port = profiler.serving_target.split(":")
    svc = one(docs, "Service", host)
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == int(port) == DEFAULT_PORTS["serving"]
    serving = container(docs, "idealrt-serving")
    pod = one(docs, "Deployment", "idealrt-serving")["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert serving["command"] == ["python", "-m", "idealrt.services.serving"]
    env = env_of(serving, config)
    cfg = ServingConfig.from_env(env)
    assert cfg.address == f"0.0.0.0:{DEFAULT_PORTS['serving']}"
    # the profiler presents its token and certificate to serving: TLS with mTLS, auth on
    assert cfg.tls.server_tls and cfg.tls.mtls and cfg.tls == TlsConfig.from_env(env)
    assert AuthConfig.from_env(env).enabled
    ports = {p["name"]: p["containerPort"] for p in serving["ports"]}
    assert svc_port["targetPort"] in ports and ports[svc_port["targetPort"]] == int(port)
    assert serving["startupProbe"]["grpc"]["port"] == int(env["IDEALRT_HEALTH_PORT"])


# ------------------------------------------------------------------ gpu


def test_gpu_configures_the_kubernetes_executor() -> None:
    docs = render("overlays/gpu")
    config = config_data(docs)
    assert config["IDEALRT_PROFILER_EXECUTOR"] == "kubernetes"
    assert ProfilerConfig.from_env(config).executor == "kubernetes"
    assert config["IDEALRT_K8S_NODE_SELECTOR"] == "nvidia.com/gpu.present=true"
    assert config["IDEALRT_K8S_GPU_RESOURCE"] == "nvidia.com/gpu"
    # the Jobs' image is the suite's (kustomize `images:` does not rewrite this value)
    assert config["IDEALRT_K8S_IMAGE"] == container(docs, "idealrt-profiler")["image"]
    # the Deployments themselves hold no GPU: the executor's Jobs do
    for name, tpl in pods(docs):
        for c in containers(tpl["spec"]):
            assert "nvidia.com/gpu" not in c["resources"]["limits"], (name, c["name"])


def test_gpu_only_the_profiler_mounts_its_token_and_knows_its_pod() -> None:
    docs = render("overlays/gpu")
    for name, tpl in pods(docs):
        assert tpl["spec"]["automountServiceAccountToken"] is (name == "idealrt-profiler"), name
        assert tpl["spec"]["serviceAccountName"] == "idealrt", name
    sa = one(docs, "ServiceAccount", "idealrt")
    assert sa["automountServiceAccountToken"] is False  # opt-in per pod
    env = {e["name"]: e for e in container(docs, "idealrt-profiler")["env"]}
    assert env["IDEALRT_K8S_IDENTITY"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["IDEALRT_K8S_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    # the base's env is kept (merged by name, not replaced)
    assert {"IDEALRT_TLS_CERT", "IDEALRT_SERVICE_TOKEN_FILE", "IDEALRT_HEALTH_PORT"} <= set(env)


def test_gpu_rbac_namespaced_role_and_node_reader() -> None:
    docs = render("overlays/gpu")
    base_role = one(render("base"), "Role", "idealrt-profiler")
    assert one(docs, "Role", "idealrt-profiler")["rules"] == base_role["rules"]
    binding = one(docs, "RoleBinding", "idealrt-profiler")
    sa = {"kind": "ServiceAccount", "name": "idealrt", "namespace": "idealrt"}
    assert binding["subjects"] == [sa]
    # read-only access to Nodes, nothing else cluster-wide (which verbs exactly: the code's,
    # tests/unit/k8s/test_executor_manifests.py)
    (rule,) = one(docs, "ClusterRole", "idealrt-profiler-nodes")["rules"]
    assert (rule["apiGroups"], rule["resources"]) == ([""], ["nodes"])
    assert "list" in rule["verbs"] and set(rule["verbs"]) <= {"get", "list", "watch"}
    crb = one(docs, "ClusterRoleBinding", "idealrt-profiler-nodes")
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "idealrt-profiler-nodes",
    }
    assert crb["subjects"] == [sa]


def test_gpu_store_reads_the_users_secret() -> None:
    docs = render("overlays/gpu")
    (url,) = [
        e for e in container(docs, "idealrt-store")["env"] if e["name"] == "IDEALRT_STORE_URL"
    ]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "idealrt-store-db", "key": "url"}
    assert not of_kind(docs, "Secret")  # no credentials generated or committed
    assert not of_kind(docs, "StatefulSet")  # the database is the user's
