"""The kubernetes executor: one Job per profile on a leased GPU node.

One idea, one module (long because the steps share the client and the Job's naming):
1. queue: the profile waits in a FairQueue (round-robin across namespaces, FIFO inside);
   only the head tries the nodes, so a node that frees up goes to whoever's turn it is;
2. lease: the head takes the first candidate node whose Lease it gets (leases.py); a
   keeper thread renews every held Lease each `renew_interval_s`;
3. Job: rendered by idealrt.clients.k8s.render_profile_job (the pod of
   k8s/jobs/profile-job.yaml) and adjusted for this profile: labels and annotations with
   the profile id and namespace, backoffLimit 0, activeDeadlineSeconds from the plan's
   budget, ttlSecondsAfterFinished, nodeSelector pinned to the leased node, tolerations and
   resources from the ClusterPlacement; created with fieldValidation=Strict;
4. watch: the Job (by name) and its pods (label job-name) with the watch API: a list for
   the state and a resourceVersion, then watches from there (410 Gone: list again); the
   pod's image pull errors, Unschedulable and OOMKilled, and the Job's DeadlineExceeded,
   become FAILED with that reason (base.py); Complete is SUCCEEDED;
5. end: the Lease is released; a cancelled profile's Job is deleted first.
Recovery (`recover`): Jobs found by label are resumed (`run` adopts an existing Job and
its node's Lease), a RUNNING profile whose Job is gone is FAILED JOB_GONE, and Leases of
ours (or expired) whose profile has no Job are deleted.

The official client is imported only here, when an executor is built:
`pip install idealrt[k8s]`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog

from idealrt.clients.k8s import PROFILER_PORT, ProfileJobSpec, render_profile_job
from idealrt.core.clock import utcnow
from idealrt.core.domain import Profile, ProfileState
from idealrt.core.errors import FailedPrecondition, IdealrtError
from idealrt.services.profiler.executor.base import (
    DEADLINE_EXCEEDED,
    IMAGE_PULL_FAILED,
    JOB_FAILED,
    JOB_GONE,
    OOM_KILLED,
    UNSCHEDULABLE,
    ClusterPlacement,
    ExecutorEvent,
    ExecutorPhase,
    ProfileReader,
    Recovery,
)
from idealrt.services.profiler.executor.fair_queue import FairQueue
from idealrt.services.profiler.executor.leases import (
    MANAGED_LABEL,
    LeaseConflict,
    LeaseMissing,
    NodeLeases,
)

__all__ = [
    "KubernetesExecutor",
    "KubernetesOptions",
    "job_event",
    "job_name",
    "pod_event",
    "render_job",
]

log = structlog.get_logger(__name__)

LEASE_LOST = "LEASE_LOST"
K8S_API_ERROR = "K8S_API_ERROR"  # the API server refused a call the executor needed
JOB_INVALID = "JOB_INVALID"
K8S_CLIENT_MISSING = "K8S_CLIENT_MISSING"
PROFILE_ID_LABEL = "idealrt.io/profile-id"
PROFILE_NAMESPACE_LABEL = "idealrt.io/profile-namespace"  # `kubectl get jobs -l` per team
ANN_PROFILE_ID = "idealrt.io/profile-id"
ANN_NAMESPACE = "idealrt.io/profile-namespace"
ANN_NODE = "idealrt.io/node"
ANN_HOLDER = "idealrt.io/lease-holder"
_IMAGE_PULL = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
# the Job's own reasons for a deadline, after the pod started or before
_DEADLINE = {"DeadlineExceeded"}


def _kubernetes() -> Any:
    try:
        import kubernetes.client
        import kubernetes.watch.watch
    except ImportError as exc:
        raise FailedPrecondition(
            K8S_CLIENT_MISSING,
            "the kubernetes executor needs the Kubernetes client: pip install idealrt[k8s]",
        ) from exc
    return kubernetes


@dataclasses.dataclass(frozen=True)
class KubernetesOptions:
    namespace: str = "idealrt"  # where the Jobs and Leases live
    identity: str = dataclasses.field(default_factory=socket.gethostname)  # this replica
    placement: ClusterPlacement = dataclasses.field(default_factory=ClusterPlacement)
    image: str = "idealrt:latest"
    store: str = "idealrt-store:50051"
    metrics: str = "idealrt-metrics:50054"
    lease_duration_s: int = 30
    renew_interval_s: float = 10.0
    retry_s: float = 2.0  # how often the head of the queue tries the nodes again
    default_deadline_s: int = 7200  # activeDeadlineSeconds of a plan without a budget
    startup_allowance_s: int = 600  # added to a budget: image pull, sidecar start
    ttl_after_finished_s: int = 3600
    watch_timeout_s: int = 60  # each watch request's server-side timeout
    request_timeout_s: float = 30.0
    progress_interval_s: float = 2.0  # how often a running profile's progress is read


_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


def _label_value(text: str) -> str:
    value = _NAME_CHARS.sub("-", text.lower()).strip("-")[:63].strip("-")
    return value or "x"


def job_name(profile_id: str) -> str:
    """The Job of a profile: a DNS label (63 characters at most)."""
    return f"idealrt-profile-{_label_value(profile_id)}"[:63].rstrip("-")


def render_job(
    profile: Profile,
    node: str,
    opts: KubernetesOptions,
    holder: str = "",
    gpus: int | None = None,
) -> dict:
    """The batch/v1 Job of `profile` on `node` (see the module's docstring, step 3), with
    `gpus` GPUs (default: the placement's). The pod runs this very profile: its profiler
    sidecar loads it from the store by id (IDEALRT_PROFILER_RUN) and measures it, writing
    progress and samples under that id; its `profile` container follows it
    (`idealrt watch ID`) and exits 0 only when it SUCCEEDED."""
    p, plan = opts.placement, profile.plan
    budget = plan.budget_s
    deadline = (
        math.ceil(budget) + opts.startup_allowance_s if budget > 0 else opts.default_deadline_s
    )
    spec = ProfileJobSpec(
        name=job_name(profile.id),
        model=profile.model.name or "custom",
        namespace=opts.namespace,
        image=opts.image,
        backend=str(profile.stack.backend.value),
        device=profile.stack.device if profile.stack.device.startswith("cuda") else "cuda",
        dtype=profile.stack.dtype,
        prompt_tokens=tuple(plan.prompt_tokens),
        output_tokens=tuple(plan.output_tokens),
        repeats=plan.repeats,
        warmups=plan.warmups,
        gpu_resource=p.gpu_resource,
        gpus=gpus or p.gpus,
        cpu=p.cpu,
        memory=p.memory,
        store=opts.store,
        metrics=opts.metrics,
        node_selector={
            **p.node_selector,
            **profile_node_labels(profile, p),
            "kubernetes.io/hostname": node,
        },
        tolerations=tuple(p.tolerations),
        backoff_limit=0,
        active_deadline_s=deadline,
        ttl_after_finished_s=opts.ttl_after_finished_s,
        profile_namespace=_label_value(profile.namespace),
    )
    job = render_profile_job(spec)
    pod = job["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["initContainers"] + pod["containers"]}
    by_name["profiler"]["env"].append({"name": "IDEALRT_PROFILER_RUN", "value": profile.id})
    by_name["profile"]["args"] = [
        "watch",
        profile.id,
        f"--profiler=127.0.0.1:{PROFILER_PORT}",
        f"--metrics={opts.metrics}",
        f"--store={opts.store}",
        "--json",
    ]
    for container in pod["initContainers"] + pod["containers"]:
        for amounts in container["resources"].values():  # quantities are strings in the API
            amounts.update({k: str(v) for k, v in amounts.items()})
    labels = {
        MANAGED_LABEL[0]: MANAGED_LABEL[1],
        PROFILE_ID_LABEL: _label_value(profile.id),
        PROFILE_NAMESPACE_LABEL: _label_value(profile.namespace),
    }
    annotations = {
        ANN_PROFILE_ID: profile.id,
        ANN_NAMESPACE: profile.namespace,
        ANN_NODE: node,
        ANN_HOLDER: holder or opts.identity,
    }
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        meta["labels"].update(labels)
        meta["annotations"] = dict(annotations)
    return job


def profile_node_labels(profile: Profile, placement: ClusterPlacement) -> dict[str, str]:
    """The node labels a profile's own placement asks for (GPU product, node pool)."""
    want = profile.placement
    out = {}
    if want.gpu_product:
        out[placement.gpu_product_label] = want.gpu_product
    if want.node_pool:
        out[placement.node_pool_label] = want.node_pool
    return out


def node_gpus(node: dict[str, Any], placement: ClusterPlacement, whole_node: bool) -> int:
    """The GPUs a profile would take on `node` (a v1 Node): 0 when the node cannot take
    a profile now (not Ready, cordoned, or fewer allocatable GPUs than asked for)."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    if spec.get("unschedulable"):
        return 0
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    try:
        allocatable = int(str((status.get("allocatable") or {}).get(placement.gpu_resource, "0")))
    except ValueError:
        return 0
    need = allocatable if whole_node else placement.gpus
    return need if ready and 0 < need <= allocatable else 0


# Events that end a run at once: what the Job and pod watches cannot see (a pod that is
# never created, a volume that can never mount) and would otherwise wait out the deadline.
POD_FORBIDDEN = "POD_FORBIDDEN"  # the Job's pod was refused (admission, PodSecurity, quota)
MOUNT_FAILED = "MOUNT_FAILED"  # a Secret/ConfigMap the pod mounts does not exist


def event_failure(event: dict[str, Any], profile_id: str, node: str) -> ExecutorEvent | None:
    """A terminal failure from a core/v1 Event about the profile's Job or pod, or None."""
    reason, message = str(event.get("reason") or ""), str(event.get("message") or "")
    kind = (event.get("involvedObject") or {}).get("kind")
    if kind == "Job" and reason == "FailedCreate" and "forbidden" in message:
        return _failed(POD_FORBIDDEN, f"the Job's pod was refused: {message}", profile_id, node)
    if kind == "Pod" and reason == "FailedMount" and "not found" in message:
        return _failed(MOUNT_FAILED, message, profile_id, node)
    return None


def _failed(reason: str, message: str, pid: str, node: str = "") -> ExecutorEvent:
    return ExecutorEvent(pid, ExecutorPhase.FAILED, reason, message, node)


def job_event(job: dict[str, Any], event_type: str = "MODIFIED") -> ExecutorEvent | None:
    """The profile's state from its Job (None: nothing to report)."""
    meta = job.get("metadata") or {}
    pid = (meta.get("annotations") or {}).get(ANN_PROFILE_ID, "")
    node = (meta.get("annotations") or {}).get(ANN_NODE, "")
    if event_type == "DELETED":
        return _failed(JOB_GONE, f"job {meta.get('name')} was deleted", pid, node)
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return ExecutorEvent(pid, ExecutorPhase.SUCCEEDED, node=node)
        if cond.get("type") == "Failed":
            reason, message = str(cond.get("reason") or ""), str(cond.get("message") or "")
            if reason in _DEADLINE:
                return _failed(DEADLINE_EXCEEDED, message or "the plan's budget ran out", pid, node)
            return _failed(JOB_FAILED, f"{reason}: {message}".strip(": "), pid, node)
    return None


def pod_event(pod: dict[str, Any], profile_id: str, node: str) -> ExecutorEvent | None:
    """The profile's state from its pod: the failures that the Job would report late or
    never (an image that cannot be pulled, a pod that cannot be scheduled), OOMKilled,
    and RUNNING."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return _failed(UNSCHEDULABLE, str(cond.get("message") or ""), profile_id, node)
    statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    for cs in statuses:
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
            if waiting.get("reason") in _IMAGE_PULL:
                message = f"container {cs.get('name')}: {waiting.get('reason')}: " + str(
                    waiting.get("message") or cs.get("image") or ""
                )
                return _failed(IMAGE_PULL_FAILED, message, profile_id, node)
            if terminated.get("reason") == "OOMKilled":
                return _failed(
                    OOM_KILLED, f"container {cs.get('name')} was OOMKilled", profile_id, node
                )
    if status.get("phase") == "Running":
        return ExecutorEvent(profile_id, ExecutorPhase.RUNNING, node=node)
    return None


class _ClientLeases:
    """leases.LeaseApi over CoordinationV1Api (JSON bodies in and out)."""

    def __init__(self, k8s: Any, api_client: Any, timeout: float) -> None:
        self.api = k8s.client.CoordinationV1Api(api_client)
        self.exc = k8s.client.ApiException
        self.timeout = timeout

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        except self.exc as exc:
            if exc.status == 409:
                raise LeaseConflict(str(exc)) from None
            if exc.status == 404:
                raise LeaseMissing(str(exc)) from None
            raise
        return json.loads(resp.data or b"{}")

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call(self.api.read_namespaced_lease, name, namespace)
        return out

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self._call(self.api.create_namespaced_lease, namespace, body)
        return out

    def replace(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self._call(self.api.replace_namespaced_lease, name, namespace, body)
        return out

    def delete(self, namespace: str, name: str, resource_version: str) -> None:
        body = {"preconditions": {"resourceVersion": resource_version}}
        self._call(self.api.delete_namespaced_lease, name, namespace, body=body)

    def list(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        listed = self._call(
            self.api.list_namespaced_lease, namespace, label_selector=label_selector
        )
        return list(listed.get("items") or [])


class _OpenStreams:
    """The watch responses of one run, so that its end shuts them all down at once (a
    read blocked in another thread returns: urllib3's HTTPResponse.shutdown) instead of
    waiting for each watch's server-side timeout. A response opened after the end is
    shut down as it is added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self.closed = False

    def add(self, resp: Any) -> bool:
        with self._lock:
            if not self.closed:
                self._open.add(resp)
                return True
        _shutdown(resp)
        return False

    def discard(self, resp: Any) -> None:
        with self._lock:
            self._open.discard(resp)

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            open_now, self._open = list(self._open), set()
        for resp in open_now:
            _shutdown(resp)


def _shutdown(resp: Any) -> None:
    shutdown = getattr(resp, "shutdown", None)  # urllib3 >= 2.3
    (shutdown or resp.close)()


class KubernetesExecutor:
    """See the module's docstring. `api_client`: a kubernetes.client.ApiClient (tests
    point one at a fake API server); None loads the in-cluster config, else kubeconfig.
    `store`: where the pod writes the profile's progress and end (the executor reads it
    to report progress and to end with what the pod measured); None: the Job's state
    only. `running_limit(namespace)`: how many profiles of a namespace may run at once
    (the namespace's quota; None: no limit): the fair queue passes over a namespace at
    its limit, which keeps its turn."""

    name = "kubernetes"

    def __init__(
        self,
        options: KubernetesOptions,
        api_client: Any = None,
        *,
        store: ProfileReader | None = None,
        running_limit: Callable[[str], int | None] | None = None,
    ) -> None:
        k8s = _kubernetes()
        if api_client is None:
            try:
                k8s.config.load_incluster_config()
            except k8s.config.ConfigException:  # outside a pod: $KUBECONFIG, as kubectl
                k8s.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            api_client = k8s.client.ApiClient()
        self.k8s, self.opts = k8s, options
        self.store = store
        self.running_limit = running_limit or (lambda _namespace: None)
        self.batch = k8s.client.BatchV1Api(api_client)
        self.core = k8s.client.CoreV1Api(api_client)
        self.leases = NodeLeases(
            _ClientLeases(k8s, api_client, options.request_timeout_s),
            options.namespace,
            options.identity,
            options.lease_duration_s,
        )
        self.queue: FairQueue[str] = FairQueue()
        self._running: collections.Counter[str] = collections.Counter()  # by namespace
        self._acquiring = threading.Lock()  # one head at a time tries the nodes
        self._lost: set[str] = set()  # nodes whose lease the keeper lost
        self._closed = threading.Event()
        self._keeper = threading.Thread(
            target=self._keep_leases, name="k8s-lease-keeper", daemon=False
        )
        self._keeper.start()

    # ------------------------------------------------------------ API

    def run(
        self,
        profile: Profile,
        *,
        cancel: threading.Event,
        on_progress: Callable[[Profile], None],
    ) -> Profile:
        try:
            return self._run(profile, cancel, on_progress)
        except IdealrtError as exc:
            return self._final(profile, _failed(exc.reason, exc.message, profile.id))
        except self.k8s.client.ApiException as exc:
            log.exception("k8s_api_failed", profile_id=profile.id)
            message = f"the Kubernetes API answered {exc.status} {exc.reason}: {exc.body}"
            return self._final(profile, _failed(K8S_API_ERROR, message, profile.id))

    def recover(self, unfinished: Sequence[Profile]) -> Recovery:
        """After a restart: which unfinished profiles to run again (those with a Job are
        adopted by `run`), which are FAILED JOB_GONE, and the orphaned Leases deleted
        (ours, or expired, whose profile has no Job; a fresh Lease of another replica that
        has not created its Job yet is left alone)."""
        jobs = self._managed_jobs()
        with_job = {(j["metadata"].get("annotations") or {}).get(ANN_PROFILE_ID) for j in jobs}
        resume, failed = [], []
        for p in unfinished:
            if p.id in with_job or p.state is not ProfileState.RUNNING:
                resume.append(p)
            else:
                message = f"job {job_name(p.id)} is gone (found missing at restart)"
                failed.append(self._final(p, _failed(JOB_GONE, message, p.id)))
        released = []
        for lease in self.leases.managed():
            pid = (lease["metadata"].get("annotations") or {}).get(ANN_PROFILE_ID)
            holder = (lease.get("spec") or {}).get("holderIdentity")
            ours = holder == self.opts.identity or self.leases.expired(lease)
            if pid not in with_job and ours and self.leases.release_orphan(lease):
                released.append(lease["metadata"]["name"])
        log.info("k8s_recovered", jobs=len(jobs), failed=len(failed), released=len(released))
        return Recovery(resume, failed, released)

    def close(self) -> None:
        self._closed.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        self._keeper.join()

    # ------------------------------------------------------------ internals

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        resp = fn(
            *args, _preload_content=False, _request_timeout=self.opts.request_timeout_s, **kwargs
        )
        out: dict[str, Any] = json.loads(resp.data or b"{}")
        return out

    def _managed_jobs(self) -> list[dict[str, Any]]:
        selector = f"{MANAGED_LABEL[0]}={MANAGED_LABEL[1]}"
        listed = self._call(
            self.batch.list_namespaced_job, self.opts.namespace, label_selector=selector
        )
        return list(listed.get("items") or [])

    def _existing_job(self, profile: Profile) -> dict[str, Any] | None:
        try:
            return self._call(
                self.batch.read_namespaced_job, job_name(profile.id), self.opts.namespace
            )
        except self.k8s.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _run(
        self, profile: Profile, cancel: threading.Event, on_progress: Callable[[Profile], None]
    ) -> Profile:
        job = self._existing_job(profile)
        if job is not None:  # a restart: adopt the Job and its node's Lease
            ann = job["metadata"].get("annotations") or {}
            node = ann.get(ANN_NODE, "")
            self.leases.try_acquire(node, profile.id, adopt_from=ann.get(ANN_HOLDER, ""))
            with self.queue.cond:
                self._running[profile.namespace] += 1
            log.info("k8s_job_adopted", profile_id=profile.id, node=node)
        else:
            got = self._wait_for_node(profile, cancel, on_progress)  # counted as running
            if got is None:
                return self._settle(profile, None, cancelled=True)
            node, gpus = got
        result: Profile | None = None
        try:
            if job is None:
                self._call(
                    self.batch.create_namespaced_job,
                    self.opts.namespace,
                    render_job(profile, node, self.opts, gpus=gpus),
                    field_validation="Strict",
                )
                log.info(
                    "k8s_job_created", profile_id=profile.id, node=node, job=job_name(profile.id)
                )
            result = self._follow(profile, node, cancel, on_progress)
            return result
        finally:
            if result is None or result.state.terminal:  # abandoned: the Lease stays held
                self.leases.release(node)
            with self.queue.cond:
                self._running[profile.namespace] -= 1
                self.queue.cond.notify_all()  # a node is free: the head tries again

    def _eligible(self, namespace: str) -> bool:
        """May a profile of `namespace` start now (its running-profiles quota)? Called
        with the queue's lock held."""
        limit = self.running_limit(namespace)
        return limit is None or self._running[namespace] < limit

    def _wait_for_node(
        self, profile: Profile, cancel: threading.Event, on_progress: Callable[[Profile], None]
    ) -> tuple[str, int] | None:
        """Wait in the fair queue until it is this profile's turn and a node is free;
        the leased (node, GPUs), counted as running in its namespace, or None when
        cancelled or closed. The profile's queue_position is reported (on_progress)
        whenever it changes. Only the head tries nodes, one thread at a time (the lock:
        two heads could exist for a moment when a namespace's eligibility changes)."""
        self.queue.put(profile.namespace, profile.id)
        reported = -1
        try:
            while True:
                with self.queue.cond:
                    if cancel.is_set() or self._closed.is_set():
                        return None
                    position = self.queue.position(profile.id)
                    turn = self.queue.head(self._eligible) == profile.id
                if position != reported:
                    reported = position
                    on_progress(
                        dataclasses.replace(
                            profile, state=ProfileState.QUEUED, queue_position=position
                        )
                    )
                if turn:
                    with self._acquiring:
                        with self.queue.cond:  # still its turn (the quota may have moved)
                            turn = self.queue.head(self._eligible) == profile.id
                        got = self._lease_a_node(profile) if turn else None
                        if got is not None:
                            with self.queue.cond:
                                self.queue.pop(profile.id)
                                self._running[profile.namespace] += 1
                            return got
                with self.queue.cond:
                    if not (cancel.is_set() or self._closed.is_set()):
                        self.queue.cond.wait(self.opts.retry_s)
        finally:
            self.queue.remove(profile.id)  # a no-op once popped

    def _lease_a_node(self, profile: Profile) -> tuple[str, int] | None:
        """The first candidate node whose Lease this profile gets, with the GPUs it takes
        there; None when every candidate is busy. FAILED UNSCHEDULABLE (raised) when no
        node of the cluster matches the placement at all."""
        held = {h.node for h in self.leases.held()}
        for node, gpus in self._candidates(profile):
            if node not in held and self.leases.try_acquire(node, profile.id):
                return node, gpus
        return None

    def _candidates(self, profile: Profile) -> list[tuple[str, int]]:
        """(node, GPUs) that may take the profile now: the fixed `nodes` of the
        placement, or the Nodes listed by label (ready, schedulable, enough GPUs)."""
        p = self.opts.placement
        whole = profile.placement.whole_node
        if p.nodes:
            return [(n, p.gpus) for n in p.nodes]
        labels = {**p.node_selector, **profile_node_labels(profile, p)}
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        import urllib3.exceptions  # the kubernetes client's transport

        try:
            listed = self._call(self.core.list_node, label_selector=selector)
        except self.k8s.client.ApiException as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                raise  # e.g. 403: the ClusterRole idealrt-profiler-nodes is missing
            log.warning("k8s_node_list_failed", status=exc.status, reason=exc.reason)
            return []  # the API server is unwell: wait, and try again
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # no answer at all
            log.warning("k8s_node_list_failed", error=f"{type(exc).__name__}: {exc}")
            return []
        nodes = listed.get("items") or []
        if not nodes:
            raise FailedPrecondition(
                UNSCHEDULABLE,
                f"no node of the cluster has the labels {selector} (profile.placement and "
                "the profiler's node selector, IDEALRT_K8S_NODE_SELECTOR)",
                field="profile.placement",
            )
        out = [(n["metadata"]["name"], node_gpus(n, p, whole)) for n in nodes]
        return sorted((name, gpus) for name, gpus in out if gpus > 0)

    def _stored(self, profile_id: str) -> Profile | None:
        """The profile as the store has it (what the pod wrote); None without a store or
        when the store does not answer (logged: the Job's state still ends the run)."""
        if self.store is None:
            return None
        try:
            return self.store.get_profile(profile_id)
        except IdealrtError as exc:
            log.warning("k8s_progress_read_failed", profile_id=profile_id, reason=exc.reason)
            return None

    @staticmethod
    def _merged(running: Profile, stored: Profile | None) -> Profile:
        """`running` with what the pod measured so far (progress, fingerprint, spec)."""
        if stored is None:
            return running
        return dataclasses.replace(
            running,
            completed_samples=stored.completed_samples,
            total_samples=stored.total_samples or running.total_samples,
            provenance=stored.provenance,
            model_spec=stored.model_spec or running.model_spec,
            start_time=stored.start_time or running.start_time,
        )

    def _settle(
        self, running: Profile, ev: ExecutorEvent | None, cancelled: bool = False
    ) -> Profile:
        """The run's end: the pod's own terminal state when it stored one (SUCCEEDED,
        INVALID, FAILED with its reason), else the Job's with the pod's progress."""
        stored = self._stored(running.id)
        if stored is not None and stored.state.terminal:
            return dataclasses.replace(stored, queue_position=0)
        return self._final(self._merged(running, stored), ev, cancelled)

    def _follow(
        self,
        profile: Profile,
        node: str,
        cancel: threading.Event,
        on_progress: Callable[[Profile], None],
    ) -> Profile:
        name = job_name(profile.id)
        events: queue.Queue[tuple[str, str, dict[str, Any]]] = queue.Queue()
        streams = _OpenStreams()
        watchers: list[threading.Thread] = []

        def watch(kind: str, fn: Callable[..., Any], selector: dict[str, str]) -> None:
            w = threading.Thread(
                target=self._watch_into,
                args=(kind, fn, selector, events, streams),
                name=f"k8s-watch-{kind}-{name}",
                daemon=False,
            )
            watchers.append(w)
            w.start()

        watch("job", self.batch.list_namespaced_job, {"field_selector": f"metadata.name={name}"})
        watch("pod", self.core.list_namespaced_pod, {"label_selector": f"job-name={name}"})
        watch(
            "event",
            self.core.list_namespaced_event,
            {"field_selector": f"involvedObject.kind=Job,involvedObject.name={name}"},
        )
        pods_watched: set[str] = set()
        running = dataclasses.replace(
            profile, state=ProfileState.RUNNING, error="", queue_position=0
        )
        running = self._merged(running, self._stored(profile.id))
        running.start_time = running.start_time or utcnow()
        on_progress(running)
        last_read = time.monotonic()
        try:
            while True:
                if cancel.is_set():
                    self._delete_job(name)
                    return self._settle(running, None, cancelled=True)
                if self._closed.is_set():  # shutdown: the Job runs on, a restart adopts it
                    log.info("k8s_run_abandoned", profile_id=profile.id, node=node)
                    return running
                if node in self._lost:
                    self._lost.discard(node)
                    self._delete_job(name)
                    message = f"the Lease of node {node} was taken over while the Job ran"
                    return self._settle(running, _failed(LEASE_LOST, message, profile.id, node))
                if time.monotonic() - last_read >= self.opts.progress_interval_s:
                    last_read = time.monotonic()
                    stored = self._stored(profile.id)
                    if stored is not None and not stored.state.terminal:
                        merged = self._merged(running, stored)
                        if merged.completed_samples != running.completed_samples:
                            running = merged
                            on_progress(running)
                try:
                    kind, etype, obj = events.get(timeout=0.1)  # wakes for cancel
                except queue.Empty:
                    continue
                if kind == "error":
                    self._delete_job(name)
                    message = f"watching job {name} failed: {obj.get('message')}"
                    return self._settle(running, _failed(JOB_FAILED, message, profile.id, node))
                ev: ExecutorEvent | None
                if kind == "job":
                    ev = job_event(obj, etype)
                elif kind == "event":
                    ev = event_failure(obj, profile.id, node) if etype != "DELETED" else None
                else:
                    pod = str((obj.get("metadata") or {}).get("name") or "")
                    if pod and pod not in pods_watched:  # its Events: a mount that fails
                        pods_watched.add(pod)
                        about = f"involvedObject.kind=Pod,involvedObject.name={pod}"
                        watch("event", self.core.list_namespaced_event, {"field_selector": about})
                    ev = pod_event(obj, profile.id, node) if etype != "DELETED" else None
                if ev is None:
                    continue
                if ev.phase.terminal:
                    if ev.phase is ExecutorPhase.FAILED and kind != "job":
                        self._delete_job(name)  # it would wait for its deadline
                    log.info(
                        "k8s_profile_finished",
                        profile_id=profile.id,
                        phase=ev.phase.value,
                        reason=ev.reason,
                    )
                    return self._settle(running, ev)
        finally:
            streams.close_all()  # blocked reads return now, not at the watch's timeout
            for w in watchers:
                w.join()

    def _watch_into(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        selector: dict[str, str],
        out: queue.Queue[tuple[str, str, dict[str, Any]]],
        streams: _OpenStreams,
    ) -> None:
        """A watcher thread: list, then watch from the list's resourceVersion, each watch
        bounded by watch_timeout_s server-side; 410 Gone lists again. Ends when the run's
        streams are closed (its end shuts the open response down)."""
        ns = self.opts.namespace
        version: str | None = None
        try:
            while not streams.closed and not self._closed.is_set():
                if version is None:
                    listed = self._call(list_fn, ns, **selector)
                    version = str(listed["metadata"]["resourceVersion"])
                    for item in listed.get("items") or []:
                        out.put((kind, "ADDED", item))
                for etype, obj in self._stream(list_fn, ns, selector, version, streams):
                    if etype == "ERROR":
                        if obj.get("code") == 410:
                            version = None
                            break
                        out.put(("error", etype, obj))
                        return
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if etype != "BOOKMARK":
                        out.put((kind, etype, obj))
        except self.k8s.client.ApiException as exc:
            if streams.closed:
                return
            if exc.status == 410:  # too old to watch from: list again
                self._watch_into(kind, list_fn, selector, out, streams)
                return
            log.exception("k8s_watch_failed", kind=kind)
            out.put(("error", "ERROR", {"message": f"{type(exc).__name__}: {exc}"}))
        except Exception as exc:  # a thread's top: report to the run, which fails
            if streams.closed:
                return  # the read the run's end shut down
            log.exception("k8s_watch_failed", kind=kind)
            out.put(("error", "ERROR", {"message": f"{type(exc).__name__}: {exc}"}))

    def _stream(
        self,
        list_fn: Callable[..., Any],
        ns: str,
        selector: dict[str, str],
        version: str,
        streams: _OpenStreams,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """One watch request's events, as plain JSON ({"type", "object"}); the response is
        registered with `streams`, so the run's end can shut it down mid-read."""
        resp = list_fn(
            ns,
            watch=True,
            resource_version=version,
            timeout_seconds=self.opts.watch_timeout_s,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(self.opts.request_timeout_s, self.opts.watch_timeout_s + 30),
            **selector,
        )
        if not streams.add(resp):
            return
        try:
            for line in self.k8s.watch.watch.iter_resp_lines(resp):
                if not line:
                    continue
                event = json.loads(line)
                yield str(event.get("type")), event.get("object") or {}
        finally:
            streams.discard(resp)
            resp.release_conn()

    def _delete_job(self, name: str) -> None:
        try:
            self._call(
                self.batch.delete_namespaced_job,
                name,
                self.opts.namespace,
                propagation_policy="Background",
            )
        except self.k8s.client.ApiException as exc:
            if exc.status != 404:
                raise

    def _keep_leases(self) -> None:
        """The keeper thread: renew every held Lease each renew_interval_s."""
        while not self._closed.wait(self.opts.renew_interval_s):
            try:
                lost = self.leases.renew_all()
            except Exception:  # a thread's top: log, and try again next time
                log.exception("k8s_lease_renew_failed")
                continue
            for node in lost:
                log.warning("k8s_lease_lost", node=node)
                self._lost.add(node)

    @staticmethod
    def _final(profile: Profile, ev: ExecutorEvent | None, cancelled: bool = False) -> Profile:
        if cancelled or ev is None:
            return dataclasses.replace(
                profile, state=ProfileState.CANCELLED, end_time=utcnow(), queue_position=0
            )
        state = (
            ProfileState.SUCCEEDED if ev.phase is ExecutorPhase.SUCCEEDED else ProfileState.FAILED
        )
        return dataclasses.replace(
            profile, state=state, end_time=utcnow(), error=ev.error, queue_position=0
        )
