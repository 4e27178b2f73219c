"""The kubernetes executor (idealrt.services.profiler.executor) through the official
`kubernetes` client, talking HTTP to the fake API server of tests/fixtures/fake_kube_api.py
on 127.0.0.1 port 0. The fake has no controllers: each test plays the Job controller, the
scheduler and the kubelet by writing pods and statuses; each test's docstring says what
else the fake does not model."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from idealrt.core.domain import ModelRef, Profile, ProfilePlan, ProfileState, StackSpec
from idealrt.services.profiler.executor.base import Placement
from idealrt.services.profiler.executor.kubernetes import (
    KubernetesExecutor,
    KubernetesOptions,
    job_name,
)

kubernetes = pytest.importorskip("kubernetes")
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
NS = "idealrt"


def _fixture(name: str) -> ModuleType:
    full = f"idealrt_test_fixtures.{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, FIXTURES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


@pytest.fixture
def fake() -> Iterator[Any]:
    server = _fixture("fake_kube_api").FakeKubeApi().start()
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
        opts = KubernetesOptions(
            namespace=NS,
            identity=identity,
            placement=Placement(nodes=nodes),
            retry_s=0.05,
            watch_timeout_s=1,
            renew_interval_s=kw.pop("renew_interval_s", 0.2),
            request_timeout_s=5,
            **kw,
        )
        ex = KubernetesExecutor(opts, api_client(fake.url))
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.close()


def profile(pid: str, namespace: str = "default", state: ProfileState = ProfileState.QUEUED):
    return Profile(
        id=pid,
        model=ModelRef(name="gpt2"),
        stack=StackSpec(device="cuda", dtype="fp16"),
        plan=ProfilePlan(prompt_tokens=(1, 64), output_tokens=(1, 8), budget_s=600),
        namespace=namespace,
        state=state,
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


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


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
    fake.make_pod(NS, name, {"phase": "Running"})
    complete(fake, name)
    final = run.wait()
    assert final.state is ProfileState.SUCCEEDED, final.error
    assert run.progress and run.progress[0].state is ProfileState.RUNNING
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
    Run(first, profile("p1"))
    wait_for(lambda: fake.get("jobs", NS, job_name("p1")))
    first.close()  # the old process: its run thread is left watching, as a dead one would
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
