"""Rendering: the batch/v1 Job manifest of a `ProfileJobSpec` (k8s/jobs/profile-job.yaml)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idealrt.clients._k8s_spec import (
    PROFILER_PORT,
    PROFILING_ROLE_LABEL,
    SERVING_PORT,
    UID,
    ProfileJobSpec,
    _validate,
)


def _labels() -> dict[str, str]:
    role_key, role = PROFILING_ROLE_LABEL
    return {
        "app.kubernetes.io/name": "idealrt",
        "app.kubernetes.io/component": "profile-job",
        "app.kubernetes.io/part-of": "idealrt",
        role_key: role,
    }


def _security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _env(pairs: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


def _guaranteed(cpu: str, memory: str, extra: Mapping[str, int] | None = None) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory, **(extra or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}  # equal: Guaranteed QoS


_MOUNTS = {
    "tmp": "/tmp",
    "data": "/var/lib/idealrt",
    "tls": "/etc/idealrt/tls",
    "service-token": "/etc/idealrt/service-token",
}
_SECRET_MOUNTS = ("tls", "service-token")
TLS_DIR, TOKEN_FILE = _MOUNTS["tls"], f"{_MOUNTS['service-token']}/token"
# health-only plaintext listeners of the sidecars (IDEALRT_HEALTH_PORT), for the startup
# probes: the kubelet's gRPC probe cannot speak TLS; two ports, as the pod's containers
# share one network namespace
SERVING_HEALTH_PORT, PROFILER_HEALTH_PORT = 8082, 8083


def _volumes(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "mountPath": _MOUNTS[n], **({"readOnly": True} if n in _SECRET_MOUNTS else {})}
        for n in names
    ]


def _server_tls() -> dict[str, str]:
    """A sidecar's server side: its certificate, and client certificates required (mTLS)."""
    return {
        "IDEALRT_TLS_CERT": f"{TLS_DIR}/tls.crt",
        "IDEALRT_TLS_KEY": f"{TLS_DIR}/tls.key",
        "IDEALRT_TLS_CLIENT_CA": f"{TLS_DIR}/ca.crt",
    }


def _client_tls() -> dict[str, str]:
    """The side that calls: the CA of the servers and the certificate it presents."""
    return {
        "IDEALRT_TLS_CA": f"{TLS_DIR}/ca.crt",
        "IDEALRT_TLS_CLIENT_CERT": f"{TLS_DIR}/tls.crt",
        "IDEALRT_TLS_CLIENT_KEY": f"{TLS_DIR}/tls.key",
    }


def _sidecar(
    spec: ProfileJobSpec,
    name: str,
    port: int,
    health_port: int,
    env: Mapping[str, str],
    resources: dict[str, Any],
    mounts: tuple[str, ...],
) -> dict[str, Any]:
    return {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "restartPolicy": "Always",  # a native sidecar
        "command": ["python", "-m", f"idealrt.services.{name}"],
        "env": _env(
            {
                **env,
                "IDEALRT_HEALTH_PORT": str(health_port),
                "IDEALRT_LOG_LEVEL": spec.log_level,
                "IDEALRT_DATA_DIR": "/var/lib/idealrt",
                "HOME": "/tmp",
                "PYTHONUNBUFFERED": "1",
            }
        ),
        "ports": [
            {"name": f"grpc-{name}", "containerPort": port, "protocol": "TCP"},
            {"name": f"health-{name}", "containerPort": health_port, "protocol": "TCP"},
        ],
        # startup only: probing during a timed sample would be load on what is measured
        "startupProbe": {
            "grpc": {"port": health_port},
            "periodSeconds": 2,
            "failureThreshold": 90,
        },
        "resources": resources,
        "securityContext": _security(),
        "volumeMounts": _volumes(*mounts),
    }


def _profile_args(spec: ProfileJobSpec) -> list[str]:
    def ints(xs: tuple[int, ...]) -> str:
        return ",".join(map(str, xs))

    return [
        "profile",
        f"--profiler=127.0.0.1:{PROFILER_PORT}",
        f"--metrics={spec.metrics}",
        f"--store={spec.store}",
        f"--target=127.0.0.1:{SERVING_PORT}",
        f"--model={spec.model}",
        f"--backend={spec.backend}",
        f"--device={spec.device}",
        f"--dtype={spec.dtype}",
        f"--prompt-tokens={ints(spec.prompt_tokens)}",
        f"--output-tokens={ints(spec.output_tokens)}",
        f"--repeats={spec.repeats}",
        f"--warmups={spec.warmups}",
        f"--namespace={spec.profile_namespace}",
        *spec.profile_args,
        "--json",
    ]


def render_profile_job(spec: ProfileJobSpec) -> dict[str, Any]:
    """The batch/v1 Job manifest of one profiling run (see k8s/jobs/profile-job.yaml for
    why each part is there). Raises InvalidArgument naming the spec's field."""
    _validate(spec)
    serving = _sidecar(
        spec,
        "serving",
        SERVING_PORT,
        SERVING_HEALTH_PORT,
        {"IDEALRT_SERVING_ADDRESS": f"0.0.0.0:{SERVING_PORT}", **_server_tls()},
        _guaranteed(spec.cpu, spec.memory, {spec.gpu_resource: spec.gpus}),
        ("tmp", "data", "tls"),
    )
    profiler = _sidecar(
        spec,
        "profiler",
        PROFILER_PORT,
        PROFILER_HEALTH_PORT,
        {
            "IDEALRT_PROFILER_ADDRESS": f"0.0.0.0:{PROFILER_PORT}",
            **_server_tls(),
            **_client_tls(),
            "IDEALRT_SERVICE_TOKEN_FILE": TOKEN_FILE,
            "IDEALRT_SERVING_TARGET": f"127.0.0.1:{SERVING_PORT}",
            "IDEALRT_STORE_TARGET": spec.store,
            "IDEALRT_RESUME": "0",  # never resume other runs' unfinished profiles
        },
        _guaranteed(spec.profiler_cpu, spec.profiler_memory),
        ("tmp", "data", "tls", "service-token"),
    )
    client = {
        "name": "profile",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["idealrt"],
        "args": _profile_args(spec),
        "env": _env(
            {
                **_client_tls(),
                "IDEALRT_TOKEN_FILE": TOKEN_FILE,
                "HOME": "/tmp",
                "PYTHONUNBUFFERED": "1",
            }
        ),
        "resources": _guaranteed(spec.client_cpu, spec.client_memory),
        "securityContext": _security(),
        "volumeMounts": _volumes("tmp", "tls", "service-token"),
    }
    role_key, role = PROFILING_ROLE_LABEL
    pod = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "shareProcessNamespace": True,  # the profiler counts the serving process as its own
        "terminationGracePeriodSeconds": 30,
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [dict(t) for t in spec.tolerations],
        "affinity": {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {role_key: role}},
                        "namespaceSelector": {},  # profiling pods of every namespace
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [serving, profiler],
        "containers": [client],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
            {"name": "data", "emptyDir": {"sizeLimit": "8Gi"}},
            # group-readable: the pod's fsGroup (whole-directory mounts follow rotation)
            {"name": "tls", "secret": {"secretName": spec.tls_secret, "defaultMode": 0o440}},
            {
                "name": "service-token",
                "secret": {"secretName": spec.token_secret, "defaultMode": 0o440},
            },
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels()},
        "spec": {
            "backoffLimit": spec.backoff_limit,
            "activeDeadlineSeconds": spec.active_deadline_s,
            "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "profile",
                            "operator": "In",
                            "values": [1],
                        },
                    },
                ]
            },
            "template": {"metadata": {"labels": _labels()}, "spec": pod},
        },
    }
