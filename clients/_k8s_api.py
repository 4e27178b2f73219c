"""The Kubernetes API: the official client (imported only when called), the BatchV1Api it
gives, and API failures mapped to idealrt errors after kopf's error tree."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from idealrt.clients.reasons import (
    JOB_ALREADY_EXISTS,
    K8S_CLIENT_MISSING,
    K8S_CONFIG_MISSING,
    K8S_FORBIDDEN,
    K8S_INVALID,
    K8S_NOT_FOUND,
    K8S_QUOTA_EXCEEDED,
    K8S_REJECTED,
    K8S_UNAUTHORIZED,
    K8S_UNAVAILABLE,
    K8S_UNREACHABLE,
)
from idealrt.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdealrtError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


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
            K8S_CLIENT_MISSING, "the Kubernetes client is not installed: pip install idealrt[k8s]"
        ) from exc
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
                K8S_CONFIG_MISSING,
                "no Kubernetes configuration: not running in a cluster "
                "and no usable kubeconfig (KUBECONFIG or ~/.kube/config)",
            ) from exc
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
        return _status_error(status, _status_body(exc), str(getattr(exc, "reason", "") or ""), what)
    if _is_connection_error(exc):
        return Unavailable(
            K8S_UNREACHABLE,
            f"{what}: the Kubernetes API is unreachable ({type(exc).__name__}: {exc})",
        )
    return None


def _status_error(status: int, body: Mapping[str, Any], reason: str, what: str) -> IdealrtError:
    """HTTP status (and its metav1.Status body) -> idealrt error, after kopf's error tree."""
    detail = str(body.get("message") or reason)
    message = f"{what}: HTTP {status} {detail}".rstrip()
    if status == 409:
        return AlreadyExists(JOB_ALREADY_EXISTS, message, field="name")
    if status == 404:
        return NotFound(K8S_NOT_FOUND, message)
    if status == 403 and "exceeded quota" in detail:
        return ResourceExhausted(K8S_QUOTA_EXCEEDED, message)
    if status == 403:
        return FailedPrecondition(
            K8S_FORBIDDEN,
            f"{message} (the launcher needs create, "
            "get, list and watch on jobs.batch: k8s/base/rbac.yaml)",
        )
    if status == 401:
        return FailedPrecondition(K8S_UNAUTHORIZED, message)
    if status in (400, 422):
        causes = (body.get("details") or {}).get("causes") or [{}]
        return InvalidArgument(K8S_INVALID, message, field=str(causes[0].get("field", "")))
    if status in (0, 410, 429) or status >= 500:
        return Unavailable(K8S_UNAVAILABLE, message)
    return FailedPrecondition(K8S_REJECTED, message)


def _as_dict(api: Any, obj: Any) -> dict[str, Any]:
    """The JSON form (camelCase keys) of an API object: the client's models are converted
    with its ApiClient; plain dicts (watch raw_object, fakes) pass through."""
    if isinstance(obj, dict):
        return obj
    out: dict[str, Any] = api.api_client.sanitize_for_serialization(obj)
    return out
