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

The spec and its validation live in `_k8s_spec`, rendering in `_k8s_manifest`, the client
and the error mapping in `_k8s_api`; what they make public is re-exported here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from idealrt.clients._k8s_api import (
    BatchApi,
    Watch,
    _as_dict,
    _kubernetes,
    _status_error,
    batch_api,
    map_api_error,
)
from idealrt.clients._k8s_manifest import render_profile_job
from idealrt.clients._k8s_spec import (  # the constants are re-exported, unused here
    _DNS_LABEL,
    BACKENDS,  # noqa: F401
    DTYPES,  # noqa: F401
    PROFILER_PORT,  # noqa: F401
    PROFILING_ROLE_LABEL,
    SERVING_PORT,  # noqa: F401
    UID,  # noqa: F401
    ProfileJobSpec,
    _bad,
    parse_quantity,
)
from idealrt.clients.reasons import JOB_DELETED, JOB_NOT_FOUND
from idealrt.core.errors import NotFound, Unavailable

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


# ------------------------------------------------------------------ launch and watch


def launch_profile_job(
    spec: ProfileJobSpec, *, api: BatchApi | None = None, request_timeout_s: float = 30.0
) -> str:
    """Create the Job of `spec`; returns its name. The API server validates strictly
    (unknown fields are errors, not dropped)."""
    manifest = render_profile_job(spec)
    batch = api if api is not None else batch_api()
    try:
        created = batch.create_namespaced_job(
            spec.namespace, manifest, field_validation="Strict", _request_timeout=request_timeout_s
        )
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
            return JobOutcome(
                name,
                namespace,
                state,
                str(cond.get("reason") or ""),
                str(cond.get("message") or ""),
                active,
                succeeded,
                failed,
            )
    return JobOutcome(name, namespace, JobState.RUNNING, "", "", active, succeeded, failed)


def watch_profile_job(
    name: str,
    namespace: str = "idealrt",
    timeout: float = 3600.0,
    *,
    api: BatchApi | None = None,
    watch: Callable[[], Watch] | None = None,
    request_timeout_s: float = 30.0,
) -> JobOutcome:
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
                listed = _as_dict(
                    batch,
                    batch.list_namespaced_job(
                        namespace, field_selector=selector, _request_timeout=request_timeout_s
                    ),
                )
                items = listed.get("items") or []
                if not items:
                    raise NotFound(JOB_NOT_FOUND, f"{what} does not exist", field="name")
                job, version = items[0], str(listed["metadata"]["resourceVersion"])
                if (outcome := _outcome(job, name, namespace)).finished:
                    return outcome
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _outcome(job, name, namespace)
            started, events, w = time.monotonic(), 0, make_watch()
            for event in w.stream(
                batch.list_namespaced_job,
                namespace,
                field_selector=selector,
                resource_version=version,
                timeout_seconds=max(1, math.ceil(remaining)),
                allow_watch_bookmarks=True,
                _request_timeout=(request_timeout_s, remaining + 30),
            ):
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
                    raise NotFound(
                        JOB_DELETED, f"{what} was deleted before it finished", field="name"
                    )
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
