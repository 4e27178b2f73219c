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


def _volumes(*names: str) -> list[dict[str, str]]:
    paths = {"tmp": "/tmp", "data": "/var/lib/idealrt"}
    return [{"name": n, "mountPath": paths[n]} for n in names]


def _sidecar(
    spec: ProfileJobSpec, name: str, port: int, env: Mapping[str, str], resources: dict[str, Any]
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
                "IDEALRT_LOG_LEVEL": spec.log_level,
                "IDEALRT_DATA_DIR": "/var/lib/idealrt",
                "HOME": "/tmp",
                "PYTHONUNBUFFERED": "1",
            }
        ),
        "ports": [{"name": f"grpc-{name}", "containerPort": port, "protocol": "TCP"}],
        # startup only: probing during a timed sample would be load on what is measured
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 2, "failureThreshold": 90},
        "resources": resources,
        "securityContext": _security(),
        "volumeMounts": _volumes("tmp", "data"),
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
        # plaintext on the pod's address (explicitly: IDEALRT_INSECURE): only this pod
        # calls it (the profiling NetworkPolicy admits no ingress) and kubelet's gRPC
        # startup probe cannot speak TLS
        {"IDEALRT_SERVING_ADDRESS": f"0.0.0.0:{SERVING_PORT}", "IDEALRT_INSECURE": "1"},
        _guaranteed(spec.cpu, spec.memory, {spec.gpu_resource: spec.gpus}),
    )
    profiler = _sidecar(
        spec,
        "profiler",
        PROFILER_PORT,
        {
            "IDEALRT_PROFILER_ADDRESS": f"0.0.0.0:{PROFILER_PORT}",
            "IDEALRT_INSECURE": "1",  # as the serving sidecar's
            "IDEALRT_SERVING_TARGET": f"127.0.0.1:{SERVING_PORT}",
            "IDEALRT_STORE_TARGET": spec.store,
            "IDEALRT_RESUME": "0",  # never resume other runs' unfinished profiles
        },
        _guaranteed(spec.profiler_cpu, spec.profiler_memory),
    )
    client = {
        "name": "profile",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["idealrt"],
        "args": _profile_args(spec),
        "env": _env({"HOME": "/tmp", "PYTHONUNBUFFERED": "1"}),
        "resources": _guaranteed(spec.client_cpu, spec.client_memory),
        "securityContext": _security(),
        "volumeMounts": _volumes("tmp"),
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
