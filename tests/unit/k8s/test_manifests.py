"""The manifests under k8s/: strict schema validation offline (kubernetes-validate, unknown
fields fail) for the oldest and newest supported Kubernetes, and the properties the design
relies on: Guaranteed QoS, whole GPUs, anti-affinity, gRPC probes, non-root and read-only
containers, and wiring that matches the code (ports, env, CLI flags, image user)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from idealrt.clients.cli import build_parser
from idealrt.core.config import MetricsConfig, ProfilerConfig, StoreConfig
from idealrt.core.tls import TlsConfig
from idealrt.services.serve import DEFAULT_PORTS

Doc = dict[str, Any]
ROLE = ("idealrt.io/role", "profiling")


def containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def by_name(items: list[Doc]) -> dict[str, Doc]:
    return {c["name"]: c for c in items}


def env_of(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# ------------------------------------------------------------------ schema


def test_every_resource_validates_strictly(
    resource: tuple[str, Doc], k8s_version: str, validate: Callable[[Doc, str], str]
) -> None:
    _, doc = resource
    assert validate(doc, k8s_version) == ".".join(k8s_version.split(".")[:2])


@pytest.mark.parametrize(
    "path",
    [
        ("spec", "template", "spec", "initContainers", 0),
        ("spec", "template", "spec", "initContainers", 0, "resources"),
        ("spec", "template", "spec", "affinity", "podAntiAffinity"),
        ("spec",),
    ],
)
def test_strict_validation_rejects_unknown_fields(
    job_template: Doc,
    k8s_version: str,
    validate: Callable[[Doc, str], str],
    path: tuple[str | int, ...],
) -> None:
    """Guards the test above: a typo anywhere must fail, not be dropped."""
    doc = copy.deepcopy(job_template)
    node: Any = doc
    for key in path:
        node = node[key]
    node["requestes"] = {"cpu": "1"}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc, k8s_version)


def test_kustomization_lists_every_base_manifest(
    k8s_dir: Path, load: Callable[[str], list[Doc]]
) -> None:
    (kust,) = load("base/kustomization.yaml")
    listed = set(kust["resources"])
    on_disk = {p.name for p in (k8s_dir / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kust["namespace"] == "idealrt"
    assert {"name": "idealrt", "newName": "idealrt", "newTag": "latest"} in kust["images"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_build_renders_valid_objects(
    k8s_dir: Path, k8s_version: str, validate: Callable[[Doc, str], str]
) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(k8s_dir / "base")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    for doc in docs:
        validate(doc, k8s_version)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "idealrt", doc["metadata"]["name"]


# ------------------------------------------------------------------ every pod


def test_guaranteed_qos(workload: tuple[str, Doc]) -> None:
    """Guaranteed QoS: every container, sidecars included, has cpu and memory requests
    equal to its limits (and so does every other resource it asks for)."""
    _, doc = workload
    for c in containers(doc["spec"]["template"]["spec"]):
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
        assert res["requests"] == res["limits"], c["name"]


def test_security_context(workload: tuple[str, Doc]) -> None:
    _, doc = workload
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in containers(pod):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        # the read-only root needs a writable /tmp (HOME, caches, tempfile)
        assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, c["name"]


def test_probes_are_grpc_on_a_declared_port(workload: tuple[str, Doc]) -> None:
    _, doc = workload
    for c in containers(doc["spec"]["template"]["spec"]):
        ports = {p["containerPort"] for p in c.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c:
                assert set(c[kind]) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}
                assert c[kind]["grpc"]["port"] in ports, (c["name"], kind)


def test_images_are_the_documented_placeholder(workload: tuple[str, Doc]) -> None:
    _, doc = workload
    for c in containers(doc["spec"]["template"]["spec"]):
        assert c["image"] == "idealrt:latest"


def test_dockerfile_user_is_the_pods_user(k8s_dir: Path, workloads: list[Doc]) -> None:
    text = (k8s_dir / "Dockerfile").read_text()
    m = re.search(r"useradd --uid (\d+)", text)
    assert m is not None
    uid = int(m.group(1))
    assert re.search(rf"^USER {uid}:{uid}$", text, re.M)
    assert {w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for w in workloads} == {
        uid
    }


def test_dockerfile_installs_the_torch_the_makefile_pins(k8s_dir: Path) -> None:
    makefile = (k8s_dir.parent / "Makefile").read_text()
    pinned = re.search(r"torch==([\w.]+)", makefile)
    image = re.search(r"ARG TORCH_VERSION=([\w.]+)", (k8s_dir / "Dockerfile").read_text())
    assert pinned and image and pinned.group(1) == image.group(1)


# ------------------------------------------------------------------ base: the services


def _deployments(load: Callable[[str], list[Doc]]) -> dict[str, Doc]:
    out = {}
    for rel in ("base/store.yaml", "base/metrics.yaml", "base/profiler.yaml"):
        for d in load(rel):
            if d["kind"] == "Deployment":
                out[d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = d
    return out


def test_each_service_runs_its_module_on_its_default_port(load: Callable[[str], list[Doc]]) -> None:
    deployments = _deployments(load)
    assert set(deployments) == {"store", "metrics", "profiler"}
    for name, d in deployments.items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["python", "-m", f"idealrt.services.{name}"]
        assert by_name(c["ports"])["grpc"]["containerPort"] == DEFAULT_PORTS[name]
        # the gRPC port is TLS, which the kubelet's gRPC probes cannot speak: they go to
        # the plaintext health-only port the service opens on IDEALRT_HEALTH_PORT
        health = int(env_of(c)["IDEALRT_HEALTH_PORT"])
        assert by_name(c["ports"])["health"]["containerPort"] == health
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[kind]["grpc"]["port"] == health, (name, kind)
        assert c["envFrom"] == [{"configMapRef": {"name": "idealrt-config"}}]


def test_services_select_their_pods_and_name_real_ports(load: Callable[[str], list[Doc]]) -> None:
    deployments = _deployments(load)
    for name in deployments:
        (svc,) = [d for d in load(f"base/{name}.yaml") if d["kind"] == "Service"]
        pod = deployments[name]["spec"]["template"]
        assert svc["metadata"]["name"] == f"idealrt-{name}"
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert deployments[name]["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
        (c,) = pod["spec"]["containers"]
        names = {p["name"]: p["containerPort"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names
            assert port["port"] == names[port["targetPort"]]


def test_configmap_configures_the_services(load: Callable[[str], list[Doc]]) -> None:
    """The ConfigMap, read by the services' own config code, gives each the address,
    store target and data directory the manifests expect."""
    (cm,) = load("base/configmap.yaml")
    env = cm["data"]
    assert all(isinstance(v, str) for v in env.values())
    store, profiler, metrics = (
        StoreConfig.from_env(env),
        ProfilerConfig.from_env(env),
        MetricsConfig.from_env(env),
    )
    assert store.address == f"0.0.0.0:{DEFAULT_PORTS['store']}"
    assert profiler.address == f"0.0.0.0:{DEFAULT_PORTS['profiler']}"
    assert metrics.address == f"0.0.0.0:{DEFAULT_PORTS['metrics']}"
    store_target = f"idealrt-store:{DEFAULT_PORTS['store']}"
    assert profiler.store_target == metrics.store_target == store_target
    assert profiler.data_dir == Path("/var/lib/idealrt")
    assert store.metrics_port == profiler.metrics_port == metrics.metrics_port == 9090
    # the profiler's data dir (leases) is a writable volume
    dep = _deployments(load)["profiler"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "/var/lib/idealrt" in {m["mountPath"] for m in c["volumeMounts"]}


def test_every_service_mounts_the_tls_secret_and_points_its_config_at_it(
    load: Callable[[str], list[Doc]],
) -> None:
    """Each service container mounts the TLS Secret read-only as a whole directory (a
    subPath mount would not follow cert-manager's rotation), and its IDEALRT_TLS_* name
    files of that mount, with the Secret's keys: read by the services' own config code,
    that is TLS on the server with mTLS required, and the client side for calls to the
    other services."""
    for name, dep in _deployments(load).items():
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        (vol,) = [
            v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "idealrt-tls"
        ]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        assert mount["readOnly"] is True and "subPath" not in mount, name
        root = Path(mount["mountPath"])
        env = env_of(c)
        cfg = TlsConfig.from_env(env)
        files = [
            (cfg.cert_file, "tls.crt"),
            (cfg.key_file, "tls.key"),
            (cfg.client_ca_file, "ca.crt"),
            (cfg.ca_file, "ca.crt"),
            (cfg.client_cert_file, "tls.crt"),
            (cfg.client_key_file, "tls.key"),
        ]
        for path, key in files:
            assert path is not None and path.parent == root and path.name == key, (name, path)
        assert cfg.server_tls and cfg.mtls and cfg.client_tls, name
        assert "IDEALRT_INSECURE" not in env, name
        # the service's own config reads them the same way
        cfg_cls = {"store": StoreConfig, "profiler": ProfilerConfig, "metrics": MetricsConfig}
        assert cfg_cls[name].from_env(env).tls == cfg, name


def test_every_service_mounts_the_auth_secret_and_points_its_config_at_it(
    load: Callable[[str], list[Doc]],
) -> None:
    """Each service mounts the Secret idealrt-auth read-only as a whole directory (updates
    reach the files, which the services reload), its IDEALRT_AUTH_TOKENS_FILE and
    IDEALRT_AUTH_BINDINGS_FILE name files of that mount, and the services' own config reads
    them so (authentication on). The profiler and the metrics service mount their own
    token from a Secret of their own and present it to the store (IDEALRT_SERVICE_TOKEN_FILE);
    the store calls nobody."""
    cfg_cls = {"store": StoreConfig, "profiler": ProfilerConfig, "metrics": MetricsConfig}

    def mount_of(pod: Doc, c: Doc, secret: str) -> Path:
        (vol,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        assert mount["readOnly"] is True and "subPath" not in mount, secret
        return Path(mount["mountPath"])

    for name, dep in _deployments(load).items():
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        root = mount_of(pod, c, "idealrt-auth")
        auth = cfg_cls[name].from_env(env_of(c)).auth
        assert auth.enabled, name
        assert auth.tokens_file == root / "tokens.toml", name
        assert auth.bindings_file == root / "bindings.toml", name
        if name == "store":
            assert auth.service_token_file is None
            continue
        token_root = mount_of(pod, c, f"idealrt-{name}-token")
        assert auth.service_token_file == token_root / "token", name


def test_store_url_comes_from_the_secret(load: Callable[[str], list[Doc]]) -> None:
    (c,) = _deployments(load)["store"]["spec"]["template"]["spec"]["containers"]
    (url,) = [e for e in c["env"] if e["name"] == "IDEALRT_STORE_URL"]
    ref = url["valueFrom"]["secretKeyRef"]
    (secret,) = load("examples/store-db-secret.example.yaml")
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "url")
    assert secret["stringData"]["url"].startswith("postgresql://")
    (kust,) = load("base/kustomization.yaml")
    assert not any("secret" in r for r in kust["resources"])  # no credentials in the base


def test_single_profiler_is_replaced_not_rolled(load: Callable[[str], list[Doc]]) -> None:
    """Two profilers sharing a store would both resume its unfinished profiles."""
    dep = _deployments(load)["profiler"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


def test_namespace_enforces_restricted_pod_security(load: Callable[[str], list[Doc]]) -> None:
    (ns,) = load("base/namespace.yaml")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_profiling_pods_get_no_evictions_and_no_ingress(
    load: Callable[[str], list[Doc]], job_template: Doc
) -> None:
    docs = {d["kind"]: d for d in load("base/profiling.yaml")}
    pod_labels = job_template["spec"]["template"]["metadata"]["labels"]
    pdb, netpol = docs["PodDisruptionBudget"], docs["NetworkPolicy"]
    assert pdb["spec"]["maxUnavailable"] == 0
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert netpol["spec"]["policyTypes"] == ["Ingress"] and netpol["spec"]["ingress"] == []


# ------------------------------------------------------------------ the profiling Job


def test_job_holds_whole_gpus_in_the_serving_container_only(job_template: Doc) -> None:
    pod = job_template["spec"]["template"]["spec"]
    cs = by_name(containers(pod))
    gpu = cs["serving"]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 1
    assert isinstance(gpu["limits"]["nvidia.com/gpu"], int)  # whole GPUs, no fractions
    for name in ("profiler", "profile"):
        assert not any("gpu" in k for k in cs[name]["resources"]["limits"]), name


def test_job_repels_other_profiling_pods_per_node(job_template: Doc) -> None:
    tpl = job_template["spec"]["template"]
    terms = tpl["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    (term,) = terms
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"] == {"matchLabels": {ROLE[0]: ROLE[1]}}
    assert term["namespaceSelector"] == {}  # every namespace, not only the Job's own
    assert tpl["metadata"]["labels"][ROLE[0]] == ROLE[1]  # and it is such a pod itself
    assert job_template["metadata"]["labels"][ROLE[0]] == ROLE[1]


def test_job_targets_gpu_nodes(job_template: Doc) -> None:
    pod = job_template["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_job_lifecycle_limits(job_template: Doc) -> None:
    spec = job_template["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] > 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["onExitCodes"]["containerName"] in by_name(
        spec["template"]["spec"]["containers"]
    )


def test_job_sidecars_start_in_order_and_are_not_probed_while_measuring(job_template: Doc) -> None:
    pod = job_template["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["serving", "profiler"]
    assert pod["shareProcessNamespace"] is True  # the profiler sees serving's pid
    for c in pod["initContainers"]:
        assert c["restartPolicy"] == "Always"  # native sidecar
        assert "grpc" in c["startupProbe"]  # the next container waits for it
        assert "readinessProbe" not in c and "livenessProbe" not in c
        assert c["command"] == ["python", "-m", f"idealrt.services.{c['name']}"]
    serving, profiler = pod["initContainers"]
    assert env_of(serving)["IDEALRT_SERVING_ADDRESS"] == f"0.0.0.0:{DEFAULT_PORTS['serving']}"
    penv = env_of(profiler)
    assert penv["IDEALRT_SERVING_TARGET"] == f"127.0.0.1:{DEFAULT_PORTS['serving']}"
    assert penv["IDEALRT_RESUME"] == "0"
    cfg = ProfilerConfig.from_env(penv)
    assert cfg.resume is False and cfg.address == f"0.0.0.0:{DEFAULT_PORTS['profiler']}"
    assert cfg.store_target == f"idealrt-store:{DEFAULT_PORTS['store']}"


def test_job_main_container_is_a_valid_cli_call(job_template: Doc) -> None:
    """The real `idealrt` parser accepts the arguments, and they point at the sidecars."""
    (c,) = job_template["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["idealrt"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "profile" and args.json is True
    assert args.profiler == f"127.0.0.1:{DEFAULT_PORTS['profiler']}"
    assert args.target == f"127.0.0.1:{DEFAULT_PORTS['serving']}"
    assert args.store == f"idealrt-store:{DEFAULT_PORTS['store']}"
    assert args.metrics == f"idealrt-metrics:{DEFAULT_PORTS['metrics']}"
    assert (args.model, args.backend, args.device, args.dtype) == (
        "gpt2",
        "pytorch",
        "cuda",
        "fp16",
    )
    assert args.prompt_tokens == (1, 64, 256, 512, 1024)
    assert args.output_tokens == (1, 8, 32)


def test_job_speaks_tls_and_presents_the_profilers_identity(job_template: Doc) -> None:
    """Every container of the Job mounts the TLS Secret read-only and its TLS settings,
    as the real config classes read them, name files under that mount; serving and the
    profiler serve TLS with client certificates required and are probed on their
    plaintext health ports; the profiler and the CLI present the profiler's token."""
    from idealrt.core.auth import AuthConfig
    from idealrt.core.config import ServingConfig
    from idealrt.core.tls import TlsConfig

    pod = job_template["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "idealrt-tls"
    assert volumes["service-token"]["secret"]["secretName"] == "idealrt-profiler-token"
    serving, profiler = pod["initContainers"]
    (cli,) = pod["containers"]

    def mounts(c: Doc) -> dict[str, Doc]:
        return {m["name"]: m for m in c["volumeMounts"]}

    for c in (serving, profiler, cli):
        tls = mounts(c)["tls"]
        assert tls["readOnly"] is True and tls["mountPath"] == "/etc/idealrt/tls"
        cfg = vars(TlsConfig.from_env(env_of(c)))
        files = [str(f) for k, f in cfg.items() if k.endswith("_file") and f is not None]
        assert files and all(f.startswith("/etc/idealrt/tls/") for f in files), c["name"]
    for c, port in ((serving, 8082), (profiler, 8083)):
        tls = TlsConfig.from_env(env_of(c))
        assert tls.server_tls and tls.mtls, c["name"]
        assert env_of(c)["IDEALRT_HEALTH_PORT"] == str(port)
        assert c["startupProbe"]["grpc"]["port"] == port
        assert "IDEALRT_INSECURE" not in env_of(c)
    assert ServingConfig.from_env(env_of(serving)).tls.server_tls
    assert TlsConfig.from_env(env_of(profiler)).client_tls
    assert AuthConfig.from_env(env_of(profiler)).service_token_file is not None
    token = env_of(cli)["IDEALRT_TOKEN_FILE"]
    assert token == env_of(profiler)["IDEALRT_SERVICE_TOKEN_FILE"]
    assert token.startswith(mounts(cli)["service-token"]["mountPath"] + "/")
    args = build_parser().parse_args(cli["args"])
    assert args.namespace == "default"
