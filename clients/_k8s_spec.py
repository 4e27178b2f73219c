"""The profiling Job's spec and its validation: `ProfileJobSpec`, the constants the Job is
built from, `parse_quantity`, and `_validate`, which raises InvalidArgument naming the field."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from idealrt.core.errors import InvalidArgument

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
    "--namespace",
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
    # the idealrt namespace the profile and its cost model belong to (`--namespace`)
    profile_namespace: str = "default"
    # TLS: the suite's certificate Secret (tls.crt, tls.key, ca.crt as cert-manager writes
    # them; its certificate needs the IP SAN 127.0.0.1: the pod's containers talk over
    # loopback); and the profiler's service token Secret (key "token"), which the Job's
    # profiler and `idealrt profile` present to the suite
    tls_secret: str = "idealrt-tls"
    token_secret: str = "idealrt-profiler-token"


# ------------------------------------------------------------------ validation

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_RESOURCE = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    r"/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_QUANTITY = re.compile(  # number, then a unit suffix or a decimal exponent
    r"(\d+(?:\.\d*)?|\.\d+)(?:(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE]([+-]?\d+))?"
)
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
    for field in ("name", "namespace", "profile_namespace", "tls_secret", "token_secret"):
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
