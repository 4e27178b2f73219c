"""Profiling runs as Kubernetes Jobs: render, launch and watch.

`render_profile_job(spec)` builds the batch/v1 Job of k8s/jobs/profile-job.yaml (a test
keeps the two identical): serving and a profiler as native sidecars, `idealrt profile` as
the main container, the node's GPU held exclusively (whole-GPU request, Guaranteed QoS,
required anti-affinity against other `idealrt.io/role: profiling` pods).
`launch_profile_job` creates it and `watch_profile_job` follows it to its end through the
watch API (one list for the current state, then watches that block server-side; no
polling). Both use the official `kubernetes` client, imported only here and only when
called: `pip install idealrt[k8s]`.

API failures become idealrt errors, after kopf's error tree (status -> class): 400/422
InvalidArgument, 401/403 FailedPrecondition (403 "exceeded quota": ResourceExhausted),
404 NotFound, 409 AlreadyExists, 429/5xx and connection errors Unavailable.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from idealrt.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdealrtError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

__all__ = [
    "PROFILING_ROLE_LABEL",
    "JobOutcome",
    "JobState",
    "ProfileJobSpec",
    "batch_api",
    "launch_profile_job",
    "map_api_error",
    "parse_quantity",
    "render_profile_job",
    "watch_profile_job",
]

PROFILING_ROLE_LABEL = ("idealrt.io/role", "profiling")
BACKENDS = ("pytorch", "onnxruntime", "tensorrt", "transformers")
DTYPES = ("fp32", "fp16", "bf16")
SERVING_PORT, PROFILER_PORT = 50052, 50053
UID = 10001  # the image's user (k8s/Dockerfile)
# flags render_profile_job sets itself; `profile_args` may not repeat them
_OWN_FLAGS = (
    "--profiler",
    "--metrics",
    "--store",
    "--target",
    "--model",
    "--backend",
    "--device",
    "--dtype",
    "--prompt-tokens",
    "--output-tokens",
    "--repeats",
    "--warmups",
    "--json",
    "--target-kind",
    "--no-wait",
)


@dataclasses.dataclass(frozen=True)
class ProfileJobSpec:
    """One profiling run. The grid is `prompt_tokens` x `output_tokens` (the CLI's flags);
    `cpu`/`memory` size the serving container, which alone holds the `gpus` GPUs."""

    name: str
    model: str
    namespace: str = "idealrt"
    image: str = "idealrt:latest"
    backend: str = "pytorch"
    device: str = "cuda"
    dtype: str = "fp16"
    prompt_tokens: tuple[int, ...] = (1, 64, 256, 512, 1024)
    output_tokens: tuple[int, ...] = (1, 8, 32)
    repeats: int = 3
    warmups: int = 1
    profile_args: tuple[str, ...] = ()  # more `idealrt profile` flags, e.g. "--until-ci=1%"
    gpu_resource: str = "nvidia.com/gpu"
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    profiler_cpu: str = "1"
    profiler_memory: str = "1Gi"
    client_cpu: str = "500m"
    client_memory: str = "512Mi"
    store: str = "idealrt-store:50051"  # the suite's store service (host:port)
    metrics: str = "idealrt-metrics:50054"
    node_selector: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    tolerations: tuple[Mapping[str, Any], ...] = (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    )
    backoff_limit: int = 2
    active_deadline_s: int = 7200
    ttl_after_finished_s: int = 86400
    service_account: str = "idealrt"
    image_pull_policy: str = "IfNotPresent"
    log_level: str = "info"


class JobState(enum.Enum):
    RUNNING = "running"  # not finished when the watch's timeout passed
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    name: str
    namespace: str
    state: JobState
    reason: str = ""  # the Failed condition's reason: BackoffLimitExceeded, DeadlineExceeded...
    message: str = ""
    active: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def finished(self) -> bool:
        return self.state is not JobState.RUNNING


# ------------------------------------------------------------------ validation

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_RESOURCE = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    r"/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_QUANTITY = re.compile(  # number, then a unit suffix or a decimal exponent
    r"(\d+(?:\.\d*)?|\.\d+)(?:(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE]([+-]?\d+))?")
_SUFFIX: dict[str, Decimal | int] = {
    "": 1,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field.upper()}_INVALID", message, field=field)


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity ("500m", "4", "16Gi", "1e3") as a Decimal; ValueError
    when `text` is not one (signs are not accepted: no resource is negative)."""
    m = _QUANTITY.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, suffix, exponent = m.group(1), m.group(2) or "", m.group(3)
    try:
        if exponent is not None:
            return Decimal(number) * Decimal(10) ** int(exponent)
        return Decimal(number) * Decimal(_SUFFIX[suffix])
    except (InvalidOperation, OverflowError) as exc:
        raise ValueError(f"not a Kubernetes quantity: {text!r}") from exc


def _check_quantity(field: str, text: str, *, memory: bool) -> None:
    try:
        value = parse_quantity(text)
    except ValueError:
        raise _bad(
            field,
            f"{field} must be a Kubernetes quantity such as "
            f"{'16Gi or 512Mi' if memory else '4 or 500m'}; got {text!r}",
        ) from None
    suffix = _QUANTITY.fullmatch(text).group(2)  # type: ignore[union-attr]  # parsed above
    if memory and suffix in ("m", "u", "n"):
        raise _bad(
            field, f"{field} {text!r} counts fractions of a byte; did you mean {text[:-1]}Mi?"
        )
    if value < (1 if memory else Decimal("0.001")):
        least = "1 byte" if memory else "1m (a thousandth of a CPU)"
        raise _bad(field, f"{field} must be at least {least}; got {text!r}")


def _check_count(field: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad(field, f"{field} must be a whole number >= {minimum}; got {value!r}")


def _check_target(field: str, target: str) -> None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(
            field, f"{field} must be host:port of the suite's {field} service; got {target!r}"
        )


def _validate(spec: ProfileJobSpec) -> None:
    for field in ("name", "namespace"):
        value = getattr(spec, field)
        if not (isinstance(value, str) and len(value) <= 63 and _DNS_LABEL.fullmatch(value)):
            raise _bad(
                field,
                f"{field} must be a DNS-1123 label (lowercase letters, digits "
                f"and '-', starting and ending alphanumeric, at most 63 "
                f"characters); got {value!r}",
            )
    if not spec.image or any(c.isspace() for c in spec.image):
        raise _bad("image", f"image must be an image reference; got {spec.image!r}")
    if not spec.model.strip():
        raise _bad("model", "model is required: a catalog name such as gpt2")
    if spec.backend not in BACKENDS:
        raise _bad("backend", f"backend must be one of {', '.join(BACKENDS)}; got {spec.backend!r}")
    if spec.dtype not in DTYPES:
        raise _bad("dtype", f"dtype must be one of {', '.join(DTYPES)}; got {spec.dtype!r}")
    _check_count("gpus", spec.gpus, 1)  # whole GPUs only: a fraction would share one
    m = re.fullmatch(r"cuda(?::(\d+))?", spec.device)
    if m is None or int(m.group(1) or 0) >= spec.gpus:
        raise _bad(
            "device",
            f"device must be cuda or cuda:N with N < gpus ({spec.gpus}): the "
            f"pod sees its GPUs as cuda:0..{spec.gpus - 1}; got {spec.device!r}",
        )
    if (
        not _RESOURCE.fullmatch(spec.gpu_resource)
        or spec.gpu_resource.split("/")[0] in ("kubernetes.io", "k8s.io")
        or spec.gpu_resource.split("/")[0].endswith((".kubernetes.io", ".k8s.io"))
    ):
        raise _bad(
            "gpu_resource",
            "gpu_resource must be an extended resource name such as "
            f"nvidia.com/gpu or amd.com/gpu; got {spec.gpu_resource!r}",
        )
    for field in ("prompt_tokens", "output_tokens"):
        grid = getattr(spec, field)
        if not grid or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in grid):
            raise _bad(
                field, f"{field} must be a non-empty list of token counts >= 1; got {grid!r}"
            )
    _check_count("repeats", spec.repeats, 1)
    _check_count("warmups", spec.warmups, 0)
    _check_count("backoff_limit", spec.backoff_limit, 0)
    _check_count("active_deadline_s", spec.active_deadline_s, 1)
    _check_count("ttl_after_finished_s", spec.ttl_after_finished_s, 0)
    for field in ("cpu", "profiler_cpu", "client_cpu"):
        _check_quantity(field, getattr(spec, field), memory=False)
    for field in ("memory", "profiler_memory", "client_memory"):
        _check_quantity(field, getattr(spec, field), memory=True)
    _check_target("store", spec.store)
    _check_target("metrics", spec.metrics)
    for arg in spec.profile_args:
        if not arg.startswith("--") or arg.split("=", 1)[0] in _OWN_FLAGS:
            raise _bad(
                "profile_args",
                f"profile_args takes extra `idealrt profile` flags "
                f"(--flag=value), not {arg!r}: the Job sets "
                f"{', '.join(_OWN_FLAGS)} itself",
            )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.node_selector.items()):
        raise _bad("node_selector", "node_selector maps label names to string values")
    for tol in spec.tolerations:
        if not tol or not set(tol) <= _TOLERATION_KEYS:
            raise _bad(
                "tolerations",
                f"a toleration has only the keys "
                f"{', '.join(sorted(_TOLERATION_KEYS))}; got {dict(tol)!r}",
            )
    if spec.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        raise _bad(
            "image_pull_policy",
            "image_pull_policy must be Always, IfNotPresent or "
            f"Never; got {spec.image_pull_policy!r}",
        )


# ------------------------------------------------------------------ rendering


def _labels() -> dict[str, str]:
    role_key, role = PROFILING_ROLE_LABEL
    return {"app.kubernetes.io/name": "idealrt", "app.kubernetes.io/component": "profile-job",
            "app.kubernetes.io/part-of": "idealrt", role_key: role}


def _security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def _env(pairs: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


def _guaranteed(cpu: str, memory: str, extra: Mapping[str, int] | None = None) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory, **(extra or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}  # equal: Guaranteed QoS


def _volumes(*names: str) -> list[dict[str, str]]:
    paths = {"tmp": "/tmp", "data": "/var/lib/idealrt"}
    return [{"name": n, "mountPath": paths[n]} for n in names]


def _sidecar(spec: ProfileJobSpec, name: str, port: int, env: Mapping[str, str],
             resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name, "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "restartPolicy": "Always",  # a native sidecar
        "command": ["python", "-m", f"idealrt.services.{name}"],
        "env": _env({**env, "IDEALRT_LOG_LEVEL": spec.log_level,
                     "IDEALRT_DATA_DIR": "/var/lib/idealrt", "HOME": "/tmp",
                     "PYTHONUNBUFFERED": "1"}),
        "ports": [{"name": f"grpc-{name}", "containerPort": port, "protocol": "TCP"}],
        # startup only: probing during a timed sample would be load on what is measured
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 2, "failureThreshold": 90},
        "resources": resources, "securityContext": _security(),
        "volumeMounts": _volumes("tmp", "data"),
    }


def _profile_args(spec: ProfileJobSpec) -> list[str]:
    def ints(xs: tuple[int, ...]) -> str:
        return ",".join(map(str, xs))

    return ["profile", f"--profiler=127.0.0.1:{PROFILER_PORT}", f"--metrics={spec.metrics}",
            f"--store={spec.store}", f"--target=127.0.0.1:{SERVING_PORT}",
            f"--model={spec.model}", f"--backend={spec.backend}", f"--device={spec.device}",
            f"--dtype={spec.dtype}", f"--prompt-tokens={ints(spec.prompt_tokens)}",
            f"--output-tokens={ints(spec.output_tokens)}", f"--repeats={spec.repeats}",
            f"--warmups={spec.warmups}", *spec.profile_args, "--json"]


def render_profile_job(spec: ProfileJobSpec) -> dict[str, Any]:
    """The batch/v1 Job manifest of one profiling run (see k8s/jobs/profile-job.yaml for
    why each part is there). Raises InvalidArgument naming the spec's field."""
    _validate(spec)
    serving = _sidecar(spec, "serving", SERVING_PORT,
                       {"IDEALRT_SERVING_ADDRESS": f"0.0.0.0:{SERVING_PORT}"},
                       _guaranteed(spec.cpu, spec.memory, {spec.gpu_resource: spec.gpus}))
    profiler = _sidecar(spec, "profiler", PROFILER_PORT, {
        "IDEALRT_PROFILER_ADDRESS": f"0.0.0.0:{PROFILER_PORT}",
        "IDEALRT_SERVING_TARGET": f"127.0.0.1:{SERVING_PORT}",
        "IDEALRT_STORE_TARGET": spec.store,
        "IDEALRT_RESUME": "0",  # never resume other runs' unfinished profiles
    }, _guaranteed(spec.profiler_cpu, spec.profiler_memory))
    client = {
        "name": "profile", "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "command": ["idealrt"], "args": _profile_args(spec),
        "env": _env({"HOME": "/tmp", "PYTHONUNBUFFERED": "1"}),
        "resources": _guaranteed(spec.client_cpu, spec.client_memory),
        "securityContext": _security(), "volumeMounts": _volumes("tmp"),
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
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {role_key: role}},
            "namespaceSelector": {},  # profiling pods of every namespace
            "topologyKey": "kubernetes.io/hostname",
        }]}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [serving, profiler],
        "containers": [client],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
                    {"name": "data", "emptyDir": {"sizeLimit": "8Gi"}}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels()},
        "spec": {
            "backoffLimit": spec.backoff_limit,
            "activeDeadlineSeconds": spec.active_deadline_s,
            "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore",
                 "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "FailJob",
                 "onExitCodes": {"containerName": "profile", "operator": "In", "values": [1]}},
            ]},
            "template": {"metadata": {"labels": _labels()}, "spec": pod},
        },
    }


# ------------------------------------------------------------------ the API


class BatchApi(Protocol):
    """The part of kubernetes.client.BatchV1Api used here."""

    def create_namespaced_job(self, namespace: str, body: Any, **kwargs: Any) -> Any: ...

    def list_namespaced_job(self, namespace: str, **kwargs: Any) -> Any: ...


class Watch(Protocol):
    """The part of kubernetes.watch.Watch used here."""

    def stream(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]: ...

    def stop(self) -> None: ...


def _kubernetes() -> Any:
    try:
        import kubernetes.client
        import kubernetes.config
        import kubernetes.watch
    except ImportError as exc:
        raise FailedPrecondition(
            "K8S_CLIENT_MISSING",
            "the Kubernetes client is not installed: pip install idealrt[k8s]") from exc
    return kubernetes


def batch_api() -> BatchApi:
    """BatchV1Api from the in-cluster service account, else the kubeconfig."""
    k8s = _kubernetes()
    try:
        k8s.config.load_incluster_config()
    except k8s.config.ConfigException:
        try:
            k8s.config.load_kube_config()
        except (k8s.config.ConfigException, OSError) as exc:
            raise FailedPrecondition(
                "K8S_CONFIG_MISSING", "no Kubernetes configuration: not running in a cluster "
                "and no usable kubeconfig (KUBECONFIG or ~/.kube/config)") from exc
    api: BatchApi = k8s.client.BatchV1Api()
    return api


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError, socket errors
        return True
    try:
        import urllib3
    except ImportError:
        return False
    return isinstance(exc, urllib3.exceptions.HTTPError)


def _status_body(exc: BaseException) -> dict[str, Any]:
    try:
        body = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def map_api_error(exc: BaseException, what: str) -> IdealrtError | None:
    """The idealrt error for a failed Kubernetes API call on `what` (e.g. "job ns/name"):
    an ApiException (anything with an int `status` and a `body`) or a connection error.
    None for anything else, which the caller re-raises unchanged."""
    if isinstance(exc, IdealrtError):
        return None
    status = getattr(exc, "status", None)
    if isinstance(status, int) and hasattr(exc, "body"):
        return _status_error(status, _status_body(exc), str(getattr(exc, "reason", "") or ""),
                             what)
    if _is_connection_error(exc):
        return Unavailable("K8S_UNREACHABLE", f"{what}: the Kubernetes API is unreachable "
                                              f"({type(exc).__name__}: {exc})")
    return None


def _status_error(status: int, body: Mapping[str, Any], reason: str, what: str) -> IdealrtError:
    """HTTP status (and its metav1.Status body) -> idealrt error, after kopf's error tree."""
    detail = str(body.get("message") or reason)
    message = f"{what}: HTTP {status} {detail}".rstrip()
    if status == 409:
        return AlreadyExists("JOB_ALREADY_EXISTS", message, field="name")
    if status == 404:
        return NotFound("K8S_NOT_FOUND", message)
    if status == 403 and "exceeded quota" in detail:
        return ResourceExhausted("K8S_QUOTA_EXCEEDED", message)
    if status == 403:
        return FailedPrecondition("K8S_FORBIDDEN", f"{message} (the launcher needs create, "
                                  "get, list and watch on jobs.batch: k8s/base/rbac.yaml)")
    if status == 401:
        return FailedPrecondition("K8S_UNAUTHORIZED", message)
    if status in (400, 422):
        causes = (body.get("details") or {}).get("causes") or [{}]
        return InvalidArgument("K8S_INVALID", message, field=str(causes[0].get("field", "")))
    if status in (0, 410, 429) or status >= 500:
        return Unavailable("K8S_UNAVAILABLE", message)
    return FailedPrecondition("K8S_REJECTED", message)


def _as_dict(api: Any, obj: Any) -> dict[str, Any]:
    """The JSON form (camelCase keys) of an API object: the client's models are converted
    with its ApiClient; plain dicts (watch raw_object, fakes) pass through."""
    if isinstance(obj, dict):
        return obj
    out: dict[str, Any] = api.api_client.sanitize_for_serialization(obj)
    return out


def launch_profile_job(spec: ProfileJobSpec, *, api: BatchApi | None = None,
                       request_timeout_s: float = 30.0) -> str:
    """Create the Job of `spec`; returns its name. The API server validates strictly
    (unknown fields are errors, not dropped)."""
    manifest = render_profile_job(spec)
    batch = api if api is not None else batch_api()
    try:
        created = batch.create_namespaced_job(spec.namespace, manifest,
                                              field_validation="Strict",
                                              _request_timeout=request_timeout_s)
    except Exception as exc:
        mapped = map_api_error(exc, f"job {spec.namespace}/{spec.name}")
        if mapped is None:
            raise
        raise mapped from exc
    return str(_as_dict(batch, created).get("metadata", {}).get("name") or spec.name)


def _outcome(job: Mapping[str, Any], name: str, namespace: str) -> JobOutcome:
    status = job.get("status") or {}
    active, succeeded, failed = (int(status.get(k) or 0) for k in ("active", "succeeded", "failed"))
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        # FailureTarget / SuccessCriteriaMet come first while pods still terminate
        state = {"Complete": JobState.SUCCEEDED, "Failed": JobState.FAILED}.get(cond.get("type"))
        if state is not None:
            return JobOutcome(name, namespace, state, str(cond.get("reason") or ""),
                              str(cond.get("message") or ""), active, succeeded, failed)
    return JobOutcome(name, namespace, JobState.RUNNING, "", "", active, succeeded, failed)


def watch_profile_job(name: str, namespace: str = "idealrt", timeout: float = 3600.0, *,
                      api: BatchApi | None = None,
                      watch: Callable[[], Watch] | None = None,
                      request_timeout_s: float = 30.0) -> JobOutcome:
    """Follow a Job until it succeeds or fails, or `timeout` seconds pass (then its state is
    RUNNING). One list gives the current state and a resourceVersion; watches continue from
    there, each blocking server-side; a 410 Gone (history compacted) lists again."""
    for field, value in (("name", name), ("namespace", namespace)):
        if not (len(value) <= 63 and _DNS_LABEL.fullmatch(value)):
            raise _bad(field, f"{field} must be a DNS-1123 label; got {value!r}")
    if not timeout > 0:
        raise _bad("timeout", f"timeout must be positive seconds; got {timeout!r}")
    batch = api if api is not None else batch_api()
    make_watch = watch if watch is not None else _kubernetes().watch.Watch
    what, selector = f"job {namespace}/{name}", f"metadata.name={name}"
    deadline = time.monotonic() + timeout
    job: Mapping[str, Any] = {}
    version: str | None = None
    while True:
        try:
            if version is None:
                listed = _as_dict(batch, batch.list_namespaced_job(
                    namespace, field_selector=selector, _request_timeout=request_timeout_s))
                items = listed.get("items") or []
                if not items:
                    raise NotFound("JOB_NOT_FOUND", f"{what} does not exist", field="name")
                job, version = items[0], str(listed["metadata"]["resourceVersion"])
                if (outcome := _outcome(job, name, namespace)).finished:
                    return outcome
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _outcome(job, name, namespace)
            started, events, w = time.monotonic(), 0, make_watch()
            for event in w.stream(batch.list_namespaced_job, namespace,
                                  field_selector=selector, resource_version=version,
                                  timeout_seconds=max(1, math.ceil(remaining)),
                                  allow_watch_bookmarks=True,
                                  _request_timeout=(request_timeout_s, remaining + 30)):
                if not event:  # the client yields None for a blank line
                    continue
                events += 1
                obj = event.get("raw_object") or _as_dict(batch, event.get("object"))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if event["type"] == "ERROR":  # a watch that yields errors, not raises them
                    if obj.get("code") == 410:
                        version = None
                        break
                    raise _status_error(int(obj.get("code") or 0), obj, "", what)
                if event["type"] == "DELETED":
                    raise NotFound("JOB_DELETED", f"{what} was deleted before it finished",
                                   field="name")
                if event["type"] in ("ADDED", "MODIFIED"):
                    job = obj
                    if (outcome := _outcome(job, name, namespace)).finished:
                        w.stop()
                        return outcome
            if events == 0 and time.monotonic() - started < 1.0:
                # a server or proxy that closes watches at once: do not spin on it
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        except Exception as exc:
            if getattr(exc, "status", None) == 410 and hasattr(exc, "body"):
                version = None  # too old to watch from: list again
                continue
            mapped = map_api_error(exc, what)
            if mapped is None:
                raise
            if isinstance(mapped, Unavailable) and time.monotonic() >= deadline and job:
                return _outcome(job, name, namespace)  # the read timed out at our deadline
            raise mapped from exc
