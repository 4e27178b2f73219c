"""The kubernetes executor (idealrt.services.profiler.executor) through the official
`kubernetes` client, talking HTTP to the fake API server of tests/fixtures/fake_kube_api.py
on 127.0.0.1 port 0. The fake has no controllers: each test plays the Job controller, the
scheduler and the kubelet by writing pods and statuses; each test's docstring says what
else the fake does not model."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import (
    ModelRef,
    Placement,
    Profile,
    ProfilePlan,
    ProfileState,
    StackSpec,
)
from idealrt.services.profiler.executor.base import ClusterPlacement
from idealrt.services.profiler.executor.kubernetes import (
    KubernetesExecutor,
    KubernetesOptions,
    job_name,
)
from tests._fixtures import load_fixture, wait_for

kubernetes = pytest.importorskip("kubernetes")
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
NS = "idealrt"


@pytest.fixture
def fake() -> Iterator[Any]:
    server = load_fixture("fake_kube_api").FakeKubeApi().start()
    yield server
    server.stop()


def api_client(url: str) -> Any:
    cfg = kubernetes.client.Configuration()
    cfg.host = url
    return kubernetes.client.ApiClient(cfg)


@pytest.fixture
def make_executor(fake: Any) -> Iterator[Callable[..., KubernetesExecutor]]:
    made: list[KubernetesExecutor] = []

    def make(identity: str = "replica-a", nodes: tuple[str, ...] = ("gpu-1",), **kw: Any):
        store, running_limit = kw.pop("store", None), kw.pop("running_limit", None)
        opts = KubernetesOptions(
            namespace=NS,
            identity=identity,
            placement=ClusterPlacement(nodes=nodes, gpus=kw.pop("gpus", 1)),
            retry_s=0.05,
            watch_timeout_s=1,
            renew_interval_s=kw.pop("renew_interval_s", 0.2),
            request_timeout_s=5,
            **kw,
        )
        ex = KubernetesExecutor(
            opts, api_client(fake.url), store=store, running_limit=running_limit
        )
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.close()


def profile(
    pid: str,
    namespace: str = "default",
    state: ProfileState = ProfileState.QUEUED,
    placement: Placement | None = None,
) -> Profile:
    return Profile(
        id=pid,
        model=ModelRef(name="gpt2"),
        stack=StackSpec(device="cuda", dtype="fp16"),
        plan=ProfilePlan(prompt_tokens=(1, 64), output_tokens=(1, 8), budget_s=600),
        namespace=namespace,
        state=state,
        placement=placement or Placement(),
    )


class Run:
    """executor.run on a thread of its own; `.result` once it ends."""

    def __init__(self, ex: KubernetesExecutor, p: Profile) -> None:
        self.cancel = threading.Event()
        self.progress: list[Profile] = []
        self.result: Profile | None = None
        self.thread = threading.Thread(target=self._go, args=(ex, p))
        self.thread.start()

    def _go(self, ex: KubernetesExecutor, p: Profile) -> None:
        self.result = ex.run(p, cancel=self.cancel, on_progress=self.progress.append)

    def wait(self, timeout: float = 20.0) -> Profile:
        self.thread.join(timeout)
        assert self.result is not None, "the run did not end"
        return self.result


def complete(fake: Any, name: str) -> None:
    fake.update_status(
        "jobs", NS, name, {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    )


def test_happy_path(fake: Any, make_executor: Callable[..., KubernetesExecutor]) -> None:
    """Job created on the leased node, pod Running, Job Complete -> SUCCEEDED, Lease
    released. Not modelled: the Job controller, scheduling, the pod's containers."""
    ex = make_executor()
    run = Run(ex, profile("p1"))
    name = job_name("p1")
    job = wait_for(lambda: fake.get("jobs", NS, name))
    assert fake.get("leases", NS, "idealrt-node-gpu-1")["spec"]["holderIdentity"] == "replica-a"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 600 + 600
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["kubernetes.io/hostname"] == "gpu-1"
    assert job["metadata"]["annotations"]["idealrt.io/profile-id"] == "p1"
    assert job["metadata"]["annotations"]["idealrt.io/profile-namespace"] == "default"
    labels = job["metadata"]["labels"]
    assert labels["idealrt.io/profile-id"] == "p1"
    assert labels["idealrt.io/profile-namespace"] == "default"
    assert labels["app.kubernetes.io/managed-by"] == "idealrt-profiler"
    assert "ownerReferences" not in job["metadata"]  # nothing that can vanish owns it
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    fake.make_pod(NS, name, {"phase": "Running"})
    complete(fake, name)
    final = run.wait()
    assert final.state is ProfileState.SUCCEEDED, final.error
    seen = [(p.state, p.queue_position) for p in run.progress]
    assert seen == [(ProfileState.QUEUED, 1), (ProfileState.RUNNING, 0)]
    assert fake.get("leases", NS, "idealrt-node-gpu-1") is None
    assert ("GET", "jobs", "watch") in fake.requests and ("GET", "pods", "watch") in fake.requests


def test_two_replicas_one_node(fake: Any, make_executor: Callable[..., KubernetesExecutor]) -> None:
    """Two executors (two profiler replicas) compete for one node: one holds the Lease and
    creates its Job; the other waits until it is released. Not modelled: real concurrency
    of an API server (the fake serialises requests under one lock)."""
    a, b = make_executor("replica-a"), make_executor("replica-b")
    ra, rb = Run(a, profile("pa")), Run(b, profile("pb"))
    first = wait_for(lambda: fake.list("jobs", NS))
    time.sleep(0.3)  # the other keeps trying the node meanwhile
    assert len(fake.list("jobs", NS)) == 1
    winner = first[0]["metadata"]["annotations"]["idealrt.io/profile-id"]
    lease = fake.get("leases", NS, "idealrt-node-gpu-1")
    assert lease["spec"]["holderIdentity"] == {"pa": "replica-a", "pb": "replica-b"}[winner]
    complete(fake, job_name(winner))
    loser = "pb" if winner == "pa" else "pa"
    wait_for(lambda: fake.get("jobs", NS, job_name(loser)))
    complete(fake, job_name(loser))
    assert ra.wait().state is ProfileState.SUCCEEDED
    assert rb.wait().state is ProfileState.SUCCEEDED


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: Insufficient nvidia.com/gpu.",
                    }
                ],
            },
            "UNSCHEDULABLE",
        ),
        (
            {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "profile", "state": {"terminated": {"reason": "OOMKilled"}}}
                ],
            },
            "OOM_KILLED",
        ),
        (
            {
                "phase": "Pending",
                "initContainerStatuses": [
                    {"name": "serving", "state": {"waiting": {"reason": "ImagePullBackOff"}}}
                ],
            },
            "IMAGE_PULL_FAILED",
        ),
    ],
    ids=["unschedulable", "oomkilled", "image-pull"],
)
def test_pod_failures(
    fake: Any, make_executor: Callable[..., KubernetesExecutor], status: dict, reason: str
) -> None:
    """A pod that cannot be scheduled, is OOMKilled, or cannot pull its image: FAILED with
    that reason, the Job deleted, the Lease released. Not modelled: the scheduler's and
    kubelet's own retries (the fake pod is written once in its final state)."""
    ex = make_executor()
    run = Run(ex, profile("p1"))
    name = job_name("p1")
    wait_for(lambda: fake.get("jobs", NS, name))
    fake.make_pod(NS, name, status)
    final = run.wait()
    assert final.state is ProfileState.FAILED
    assert final.error.startswith(f"{reason}:") or final.error == reason
    assert fake.get("jobs", NS, name) is None
    assert fake.get("leases", NS, "idealrt-node-gpu-1") is None


def test_deadline_exceeded(fake: Any, make_executor: Callable[..., KubernetesExecutor]) -> None:
    """The Job's Failed condition DeadlineExceeded: FAILED DEADLINE_EXCEEDED. Not modelled:
    the Job controller's clock (the test writes the condition)."""
    ex = make_executor()
    run = Run(ex, profile("p1"))
    name = job_name("p1")
    wait_for(lambda: fake.get("jobs", NS, name))
    cond = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "late"}
    fake.update_status("jobs", NS, name, {"conditions": [cond]})
    assert run.wait().error == "DEADLINE_EXCEEDED: late"


def test_restart_mid_run(fake: Any, make_executor: Callable[..., KubernetesExecutor]) -> None:
    """A profiler restarts while its Job runs: the new executor (same identity) finds the
    Job by label, adopts its Lease and follows it to the end; a RUNNING profile whose Job
    is gone is FAILED JOB_GONE; an orphaned Lease of ours is deleted. Not modelled: a
    process crash (the first executor is closed with its run abandoned)."""
    first = make_executor("replica-a", nodes=("gpu-1", "gpu-2"))
    abandoned = Run(first, profile("p1"))
    wait_for(lambda: fake.get("jobs", NS, job_name("p1")))
    first.close()  # the old process shuts down: its run ends unfinished, the Job runs on
    assert abandoned.wait().state is ProfileState.RUNNING
    assert fake.get("jobs", NS, job_name("p1")) is not None
    # an orphan: a Lease of ours on gpu-2 for a profile that has no Job
    orphan = fake.get("leases", NS, "idealrt-node-gpu-1")
    orphan["metadata"] = {**orphan["metadata"], "name": "idealrt-node-gpu-2"}
    orphan["metadata"]["annotations"] = {"idealrt.io/profile-id": "p-none"}
    fake.create("leases", NS, orphan)
    second = make_executor("replica-a", nodes=("gpu-1", "gpu-2"))
    running = [profile("p1", state=ProfileState.RUNNING), profile("p2", state=ProfileState.RUNNING)]
    rec = second.recover(running)
    assert [p.id for p in rec.resume] == ["p1"]
    assert [(p.id, p.state) for p in rec.failed] == [("p2", ProfileState.FAILED)]
    assert rec.failed[0].error.startswith("JOB_GONE:")
    assert rec.released == ["idealrt-node-gpu-2"]
    run = Run(second, rec.resume[0])
    wait_for(lambda: ("GET", "jobs", "watch") in fake.requests)
    time.sleep(0.2)
    assert len(fake.list("jobs", NS)) == 1  # adopted, not created again
    complete(fake, job_name("p1"))
    assert run.wait().state is ProfileState.SUCCEEDED


def test_expired_lease_taken_over(
    fake: Any, make_executor: Callable[..., KubernetesExecutor]
) -> None:
    """A Lease whose holder stopped renewing is taken over after its duration (with the
    resourceVersion read: optimistic). Not modelled: clock skew between replicas."""
    stale = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "idealrt-node-gpu-1",
            "labels": {"app.kubernetes.io/managed-by": "idealrt-profiler"},
        },
        "spec": {
            "holderIdentity": "replica-dead",
            "leaseDurationSeconds": 2,
            "renewTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        },
    }
    fake.create("leases", NS, stale)
    ex = make_executor("replica-a")
    run = Run(ex, profile("p1"))
    time.sleep(0.2)
    assert fake.get("jobs", NS, job_name("p1")) is None  # not before the duration
    wait_for(lambda: fake.get("jobs", NS, job_name("p1")), timeout=5)
    lease = fake.get("leases", NS, "idealrt-node-gpu-1")
    assert lease["spec"]["holderIdentity"] == "replica-a"
    assert lease["spec"]["leaseTransitions"] == 1
    complete(fake, job_name("p1"))
    assert run.wait().state is ProfileState.SUCCEEDED


def test_stale_lease_update_conflicts(fake: Any) -> None:
    """Two replicas read the same expired Lease; the second replace carries a stale
    resourceVersion and gets 409: one holder. Not modelled: anything but Leases."""
    from idealrt.services.profiler.executor.kubernetes import _ClientLeases
    from idealrt.services.profiler.executor.leases import LeaseConflict, NodeLeases

    api = _ClientLeases(kubernetes, api_client(fake.url), 5)
    a = NodeLeases(api, NS, "replica-a", 30)
    assert a.try_acquire("gpu-1", "p1")
    current = api.get(NS, "idealrt-node-gpu-1")
    a.renew("gpu-1")  # the resourceVersion moves on
    with pytest.raises(LeaseConflict):
        api.replace(NS, "idealrt-node-gpu-1", current)
    b = NodeLeases(api, NS, "replica-b", 30)
    assert not b.try_acquire("gpu-1", "p2")  # held, not expired


def test_cancel_deletes_job(fake: Any, make_executor: Callable[..., KubernetesExecutor]) -> None:
    """Cancel while running: the Job is deleted, the Lease released, CANCELLED. Not
    modelled: the pods' graceful termination."""
    ex = make_executor()
    run = Run(ex, profile("p1"))
    wait_for(lambda: fake.get("jobs", NS, job_name("p1")))
    run.cancel.set()
    assert run.wait().state is ProfileState.CANCELLED
    assert fake.get("jobs", NS, job_name("p1")) is None
    assert fake.get("leases", NS, "idealrt-node-gpu-1") is None


def _serving(job: dict[str, Any]) -> dict[str, Any]:
    pod = job["spec"]["template"]["spec"]
    (serving,) = [c for c in pod["initContainers"] if c["name"] == "serving"]
    return serving


def test_nodes_found_by_label_and_the_profiles_placement(
    fake: Any, make_executor: Callable[..., KubernetesExecutor]
) -> None:
    """Without a fixed node list the executor lists the Nodes with the placement's
    labels: a node that is not Ready, or has too few GPUs, is passed over; a whole-node
    profile takes every allocatable GPU; a placement no node matches FAILS UNSCHEDULABLE
    at once (never QUEUED forever). Not modelled: label selector operators other than
    `=` (the executor sends only `=`), node taints (tolerations are the pod's)."""
    gpu = {"nvidia.com/gpu.present": "true"}
    fake.make_node("a-down", {**gpu, "nvidia.com/gpu.product": "H100"}, gpus=8, ready=False)
    fake.make_node("b-h100", {**gpu, "nvidia.com/gpu.product": "H100"}, gpus=8)
    fake.make_node("c-l4", {**gpu, "nvidia.com/gpu.product": "L4"}, gpus=1)
    fake.make_node("cpu-1", {}, gpus=0)
    ex = make_executor(nodes=())
    run = Run(ex, profile("p1", placement=Placement(gpu_product="H100", whole_node=True)))
    job = wait_for(lambda: fake.get("jobs", NS, job_name("p1")))
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["kubernetes.io/hostname"] == "b-h100"
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "H100"
    assert _serving(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    complete(fake, job_name("p1"))
    assert run.wait().state is ProfileState.SUCCEEDED
    lone = Run(ex, profile("p2", placement=Placement(gpu_product="L4")))
    job = wait_for(lambda: fake.get("jobs", NS, job_name("p2")))
    assert job["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"] == "c-l4"
    assert _serving(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    complete(fake, job_name("p2"))
    assert lone.wait().state is ProfileState.SUCCEEDED
    nowhere = Run(ex, profile("p3", placement=Placement(gpu_product="B200")))
    final = nowhere.wait()
    assert final.state is ProfileState.FAILED
    assert final.error.startswith("UNSCHEDULABLE: no node of the cluster has the labels")
    assert "nvidia.com/gpu.product=B200" in final.error
    assert fake.get("jobs", NS, job_name("p3")) is None


@pytest.mark.parametrize(
    ("kind", "reason", "message", "want"),
    [
        (
            "Job",
            "FailedCreate",
            'Error creating: pods "x" is forbidden: violates PodSecurity "restricted:latest"',
            "POD_FORBIDDEN",
        ),
        (
            "Pod",
            "FailedMount",
            'MountVolume.SetUp failed for volume "tls" : secret "idealrt-tls" not found',
            "MOUNT_FAILED",
        ),
    ],
    ids=["pod-forbidden", "secret-missing"],
)
def test_events_end_a_run_the_pod_status_would_not(
    fake: Any,
    make_executor: Callable[..., KubernetesExecutor],
    kind: str,
    reason: str,
    message: str,
    want: str,
) -> None:
    """Events the executor watches (the Job's, then its pod's): a pod refused at admission
    never exists, a Secret that does not exist keeps the pod Pending; both would wait for
    the deadline. They FAIL at once with the event's message, the Job deleted. Not
    modelled: event series/aggregation (count, series), events.k8s.io/v1."""
    ex = make_executor()
    run = Run(ex, profile("p1"))
    name = job_name("p1")
    wait_for(lambda: fake.get("jobs", NS, name))
    about = name
    if kind == "Pod":
        about = fake.make_pod(NS, name, {"phase": "Pending"})
        wait_for(lambda: ("GET", "events", "watch") in fake.requests)
        time.sleep(0.3)  # the pod's own event watch starts after the pod is seen
    fake.make_event(NS, kind, about, reason, message)
    final = run.wait()
    assert final.state is ProfileState.FAILED
    assert final.error.startswith(f"{want}:") and message in final.error
    assert fake.get("jobs", NS, name) is None


def test_fair_queue_across_three_namespaces(
    fake: Any, make_executor: Callable[..., KubernetesExecutor]
) -> None:
    """One node; while it is busy, team-a queues three profiles, then team-b and team-c
    one each: Jobs are created round-robin across namespaces, FIFO inside one (a2, b1,
    c1, a3, a4: team-a's backlog delays the others by one profile, not three), and each
    waiting profile reports its place in line as it moves up. Not modelled: the Job
    controller (each Job is completed by the test)."""
    ex = make_executor()
    runs = {"a1": Run(ex, profile("a1", "team-a"))}
    wait_for(lambda: fake.get("jobs", NS, job_name("a1")))
    queued = [("a2", "team-a"), ("a3", "team-a"), ("a4", "team-a"), ("b1", "team-b"),
              ("c1", "team-c")]  # fmt: skip
    for pid, ns in queued:
        runs[pid] = Run(ex, profile(pid, ns))
        wait_for(lambda pid=pid: ex.queue.position(pid) > 0)
    assert ex.queue.order() == ["a2", "b1", "c1", "a3", "a4"]
    wait_for(lambda: runs["a4"].progress and runs["a4"].progress[-1].queue_position == 5)
    started = ["a1"]

    def next_job() -> str | None:
        for job in fake.list("jobs", NS):
            pid = job["metadata"]["annotations"]["idealrt.io/profile-id"]
            if pid not in started:
                return str(pid)
        return None

    for _ in queued:
        complete(fake, job_name(started[-1]))
        runs[started[-1]].wait()
        started.append(wait_for(next_job))
    assert started == ["a1", "a2", "b1", "c1", "a3", "a4"]
    complete(fake, job_name("a4"))
    assert all(r.wait().state is ProfileState.SUCCEEDED for r in runs.values())
    positions = [p.queue_position for p in runs["a4"].progress if p.state is ProfileState.QUEUED]
    # third when queued; b1 and c1 of other namespaces then queue ahead of it (their
    # turns come before team-a's third), then it moves up one place per Job
    assert positions == [3, 4, 5, 4, 3, 2, 1]


def test_running_quota_passes_a_namespace_over(
    fake: Any, make_executor: Callable[..., KubernetesExecutor]
) -> None:
    """A namespace at its running-profiles quota waits even with a node free; another
    namespace's profile takes that node. Not modelled: quotas counted across profiler
    replicas (each executor counts its own runs)."""
    limits = {"team-a": 1}
    ex = make_executor(nodes=("gpu-1", "gpu-2"), running_limit=limits.get)
    a1 = Run(ex, profile("a1", "team-a"))
    wait_for(lambda: fake.get("jobs", NS, job_name("a1")))
    a2 = Run(ex, profile("a2", "team-a"))
    wait_for(lambda: ex.queue.position("a2") > 0)
    b1 = Run(ex, profile("b1", "team-b"))
    wait_for(lambda: fake.get("jobs", NS, job_name("b1")))
    time.sleep(0.3)
    assert fake.get("jobs", NS, job_name("a2")) is None  # gpu-2 went to team-b
    complete(fake, job_name("b1"))
    assert b1.wait().state is ProfileState.SUCCEEDED
    time.sleep(0.3)
    assert fake.get("jobs", NS, job_name("a2")) is None  # a node is free, the quota is not
    complete(fake, job_name("a1"))
    wait_for(lambda: fake.get("jobs", NS, job_name("a2")))
    complete(fake, job_name("a2"))
    assert a1.wait().state is ProfileState.SUCCEEDED
    assert a2.wait().state is ProfileState.SUCCEEDED


def test_progress_and_end_come_from_what_the_pod_stored(
    fake: Any, make_executor: Callable[..., KubernetesExecutor], tmp_path: Path
) -> None:
    """The pod's profiler writes progress and the end under the profile's id (a real
    SQLite store stands for the cluster's store): the executor reports that progress while
    the Job runs and ends with the pod's stored state (here INVALID, which a Job that
    completed cannot say). Not modelled: the pod itself (the test writes what it would)."""
    from idealrt.services.store.repository import open_store

    store = open_store(f"sqlite:///{tmp_path}/store.db")
    stored, _ = store.create_profile(profile("p1"))
    ex = make_executor(store=store, progress_interval_s=0.05)
    run = Run(ex, stored)
    name = job_name(stored.id)
    job = wait_for(lambda: fake.get("jobs", NS, name))
    pod = job["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "profiler"]
    assert {"name": "IDEALRT_PROFILER_RUN", "value": stored.id} in sidecar["env"]
    (client,) = pod["containers"]
    assert client["args"][:2] == ["watch", stored.id]
    fake.make_pod(NS, name, {"phase": "Running"})
    store.update_profile(
        dataclasses.replace(stored, state=ProfileState.RUNNING, completed_samples=7)
    )
    wait_for(lambda: any(p.completed_samples == 7 for p in run.progress))
    store.update_profile(
        dataclasses.replace(
            stored, state=ProfileState.INVALID, completed_samples=9, error="CONTENDED: x"
        )
    )
    complete(fake, name)
    final = run.wait()
    assert (final.state, final.completed_samples) == (ProfileState.INVALID, 9)
    store.close()
