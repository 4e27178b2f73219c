"""The kubernetes executor's Jobs against the Kubernetes schemas (kubernetes-validate
--strict, 1.30 through 1.37 where the package has them), and its RBAC: the verbs the
executor's code calls, derived from its source, equal those the Role grants."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from idealrt.core.domain import ModelRef, Placement, Profile, ProfilePlan, StackSpec
from idealrt.services.profiler.executor import kubernetes as kexec
from idealrt.services.profiler.executor.base import ClusterPlacement

ROOT = Path(__file__).resolve().parents[3]
WANTED = [f"1.{m}.0" for m in range(30, 38)]
SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
VERSIONS = [v for v in WANTED if (SCHEMA_DIR / f"v{v}-local-strict").is_dir()]


def test_some_versions_are_available() -> None:
    assert VERSIONS, f"kubernetes-validate has none of {WANTED}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("budget", [0.0, 900.5])
def test_jobs_validate_strictly(version: str, budget: float) -> None:
    p = Profile(
        id="01HZ-Profile_ID.x",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(device="cuda", dtype="fp16"),
        plan=ProfilePlan(prompt_tokens=(1, 64), output_tokens=(1, 8), budget_s=budget),
        namespace="team-a",
    )
    opts = kexec.KubernetesOptions(placement=ClusterPlacement(nodes=("gpu-1",), gpus=2, cpu="8"))
    job = kexec.render_job(p, "gpu-1", opts)
    assert kubernetes_validate.validate(job, version, strict=True)
    assert job["spec"]["backoffLimit"] == 0
    want = 7200 if budget == 0 else 901 + opts.startup_allowance_s
    assert job["spec"]["activeDeadlineSeconds"] == want


# the client's method name -> (apiGroup, resource, verb)
_VERBS = {"create": "create", "read": "get", "list": "list", "replace": "update",
          "delete": "delete", "patch": "patch"}  # fmt: skip
_RESOURCES = {"job": ("batch", "jobs"), "pod": ("", "pods"), "event": ("", "events"),
              "lease": ("coordination.k8s.io", "leases"), "node": ("", "nodes")}  # fmt: skip
_CALL = re.compile(r"\.(create|read|list|replace|delete|patch)_(namespaced_)?(\w+?)\b")
# the list functions the executor hands to its watcher (self._watch_into / watch(...))
_WATCHED = re.compile(r"watch\(\s*\"\w+\",\s*self\.\w+\.list_namespaced_(\w+?)\b")


def used_verbs() -> tuple[set[tuple[str, str, str]], set[tuple[str, str, str]]]:
    """(apiGroup, resource, verb) of every API call in the executor's source, namespaced
    and cluster-scoped; a list function handed to the watcher is also `watch`."""
    src = (ROOT / "services/profiler/executor/kubernetes.py").read_text()
    namespaced, cluster = set(), set()
    for verb, ns, kind in _CALL.findall(src):
        if kind not in _RESOURCES:
            continue  # e.g. "list_namespaced_job" matched, "read_only" is not a call
        group, resource = _RESOURCES[kind]
        (namespaced if ns else cluster).add((group, resource, _VERBS[verb]))
    watched = _WATCHED.findall(src)
    assert watched, "the executor watches nothing?"
    for kind in watched:
        group, resource = _RESOURCES[kind]
        namespaced.add((group, resource, "watch"))
    return namespaced, cluster


def _granted(doc: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_role_grants_exactly_the_verbs_used() -> None:
    """The namespaced calls against the Role of k8s/base; the cluster-scoped ones (GPU
    nodes) against the ClusterRole of the gpu overlay, where the executor is enabled."""
    namespaced, cluster = used_verbs()
    docs = list(yaml.safe_load_all((ROOT / "k8s/base/rbac.yaml").read_text()))
    (role,) = [
        d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "idealrt-profiler"
    ]
    assert _granted(role) == namespaced
    overlay = [
        d
        for path in sorted((ROOT / "k8s/overlays/gpu").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d and d.get("kind") == "ClusterRole"
    ]
    (cluster_role,) = [d for d in overlay if d["metadata"]["name"] == "idealrt-profiler-nodes"]
    assert _granted(cluster_role) == cluster


def test_executor_config() -> None:
    from idealrt.core.config import ProfilerConfig

    assert ProfilerConfig.from_env({}).executor == "local"
    env = {"IDEALRT_PROFILER_EXECUTOR": "kubernetes"}
    assert ProfilerConfig.from_env(env).executor == "kubernetes"
    with pytest.raises(ValueError, match="IDEALRT_PROFILER_EXECUTOR"):
        ProfilerConfig.from_env({"IDEALRT_PROFILER_EXECUTOR": "slurm"})


def test_the_gpu_overlay_configures_the_executor_the_code_reads() -> None:
    """Every IDEALRT_K8S_* the gpu overlay sets reaches KubernetesConfig (a misspelt
    variable would be silently ignored), and the rendered overlay's values parse."""
    from idealrt.core.config import KubernetesConfig, ProfilerConfig

    overlay = ROOT / "k8s/overlays/gpu/patches"
    data = yaml.safe_load((overlay / "configmap.yaml").read_text())["data"]
    profiler = yaml.safe_load((overlay / "profiler.yaml").read_text())
    env = [
        e["name"]
        for c in profiler["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
    ]
    names = {n for n in [*data, *env] if n.startswith("IDEALRT_K8S_")}
    assert {"IDEALRT_K8S_IMAGE", "IDEALRT_K8S_IDENTITY", "IDEALRT_K8S_NAMESPACE"} <= names
    for name in names:
        changed = KubernetesConfig.from_env({name: "x=y" if "SELECTOR" in name else "v"})
        assert changed != KubernetesConfig.from_env({}), f"{name} is not read"
    cfg = ProfilerConfig.from_env({k: str(v) for k, v in data.items()})
    assert cfg.executor == "kubernetes"
    assert cfg.kubernetes.node_selector == (("nvidia.com/gpu.present", "true"),)


def test_the_jobs_containers_run_the_users_profile_with_real_cli_flags() -> None:
    """The Job's pod runs the profile it was made for: the profiler sidecar is told its id
    (IDEALRT_PROFILER_RUN, read by ProfilerConfig), and the `profile` container follows it
    with a command line the real CLI parser accepts, naming all three services (a session
    with fewer would start an embedded suite instead)."""
    from idealrt.clients.cli import build_parser
    from idealrt.core.config import ProfilerConfig

    p = Profile(
        id="prof_0123",
        model=ModelRef(name="gpt2"),
        stack=StackSpec(device="cuda", dtype="fp16"),
        plan=ProfilePlan(prompt_tokens=(1, 64), output_tokens=(1, 8)),
        placement=Placement(gpu_product="NVIDIA-H100-80GB-HBM3", whole_node=True),
    )
    job = kexec.render_job(p, "gpu-1", kexec.KubernetesOptions(), gpus=8)
    assert kubernetes_validate.validate(job, VERSIONS[-1], strict=True)
    assert pod_selector(job)["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    pod = job["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["initContainers"] + pod["containers"]}
    env = {e["name"]: e["value"] for e in containers["profiler"]["env"] if "value" in e}
    assert ProfilerConfig.from_env(env).run_profile == p.id
    client = containers["profile"]
    args = build_parser().parse_args(client["args"])
    assert client["command"] == ["idealrt"] and args.command == "watch" and args.id == p.id
    assert args.profiler.startswith("127.0.0.1:") and args.metrics and args.store
    (serving,) = [c for c in pod["initContainers"] if c["name"] == "serving"]
    assert serving["resources"]["limits"]["nvidia.com/gpu"] == "8"


def pod_selector(job: dict) -> dict:
    return dict(job["spec"]["template"]["spec"]["nodeSelector"])
