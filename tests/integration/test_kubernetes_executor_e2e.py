"""The profiler with IDEALRT_PROFILER_EXECUTOR=kubernetes, end to end on loopback: a real
store and serving server, the cluster's profiler (`build_server`, its executor reaching a
fake Kubernetes API server through a kubeconfig, as `kubectl` would) and, standing for the
Job's pod, a second profiler started with IDEALRT_PROFILER_RUN (what the executor puts in
the Job) that measures the profile against the real serving server.

`CreateProfile` is all the user does: the Job appears, the pod's profiler stores samples
under the user's profile id, the cluster's profiler reports that progress and ends with
the pod's result once the Job completes. Not modelled: the Job controller and kubelet (the
test starts the pod's profiler itself and writes the Job's Complete condition), images,
TLS between pods, scheduling; a profile with a placement on a profiler whose executor is
local is refused (INVALID_ARGUMENT).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from idealrt.clients.profiler import ProfilerClient
from idealrt.core.config import KubernetesConfig, ProfilerConfig, ServingConfig, StoreConfig
from idealrt.core.domain import (
    ModelRef,
    Placement,
    Profile,
    ProfilePlan,
    ProfileState,
    StackSpec,
)
from idealrt.core.errors import InvalidArgument
from idealrt.services.profiler import server as profiler_server
from idealrt.services.profiler.executor.kubernetes import job_name
from idealrt.services.serving.server import build_server as build_serving
from idealrt.services.store import server as store_server
from idealrt.services.store.repository import open_store
from tests._fixtures import load_fixture
from tests._fixtures import wait_for as _wait_for

pytest.importorskip("kubernetes")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NS = "idealrt"


def wait_for(cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    return _wait_for(cond, timeout, interval=0.05)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    fake = load_fixture("fake_kube_api").FakeKubeApi().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake.make_node("gpu-1", {"nvidia.com/gpu.present": "true"}, gpus=1)
    repo = open_store(f"sqlite:///{tmp_path}/store.db")
    store, store_port = store_server.build_server(StoreConfig(), repo)
    serving, serving_port = build_serving(ServingConfig(address="127.0.0.1:0"))
    c: dict[str, Any] = {
        "fake": fake,
        "repo": repo,
        "store_port": store_port,
        "serving_port": serving_port,
        "tmp": tmp_path,
        "pods": [],
    }
    start_cluster_profiler(c)
    try:
        yield c
    finally:
        c["client"].close()
        for pod in c["pods"]:
            pod.stop(1.0)
        c["profiler"].stop(1.0)
        serving.stop(1.0)
        store.stop(1.0)
        repo.close()
        fake.stop()


def start_cluster_profiler(c: dict[str, Any]) -> None:
    """The cluster's profiler (executor kubernetes, resuming the store's unfinished
    profiles at start-up), as c["profiler"] with c["client"]."""
    cfg = ProfilerConfig(
        store_target=f"127.0.0.1:{c['store_port']}",
        data_dir=c["tmp"] / "cluster-profiler",
        executor="kubernetes",
        kubernetes=KubernetesConfig(namespace=NS, identity="profiler-0"),
        contention_checks=False,
    )
    c["profiler"], port = profiler_server.build_server(cfg)
    c["client"] = ProfilerClient(f"127.0.0.1:{port}", timeout=30)


def new_profile() -> Profile:
    return Profile(
        id="",
        model=ModelRef(name="tiny-gpt2"),
        stack=StackSpec(device="cpu"),
        plan=ProfilePlan(prompt_tokens=(4, 8), output_tokens=(2,), repeats=2, warmups=1),
        request_id=uuid.uuid4().hex,
    )


def start_pod(c: dict[str, Any], env: dict[str, str]) -> None:
    """What the Job's pod runs: a profiler with the Job's IDEALRT_PROFILER_RUN, its
    serving target on loopback (the pod's serving sidecar; here the test's server)."""
    cfg = ProfilerConfig(
        store_target=f"127.0.0.1:{c['store_port']}",
        serving_target=f"127.0.0.1:{c['serving_port']}",
        data_dir=c["tmp"] / "pod-profiler",
        run_profile=env["IDEALRT_PROFILER_RUN"],
        resume=env.get("IDEALRT_RESUME", "1") != "0",
        contention_checks=False,
    )
    server, _ = profiler_server.build_server(cfg)
    c["pods"].append(server)


def test_create_profile_runs_it_as_a_job_and_reports_the_pods_result(
    cluster: dict[str, Any],
) -> None:
    c, fake = cluster, cluster["fake"]
    created = c["client"].create_profile(
        dataclasses.replace(new_profile(), placement=Placement(whole_node=True))
    )
    name = job_name(created.id)
    job = wait_for(lambda: fake.get("jobs", NS, name))
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["kubernetes.io/hostname"] == "gpu-1"
    (sidecar,) = [x for x in pod["initContainers"] if x["name"] == "profiler"]
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    assert env["IDEALRT_PROFILER_RUN"] == created.id
    lease = fake.get("leases", NS, "idealrt-node-gpu-1")
    assert lease["spec"]["holderIdentity"] == "profiler-0"
    fake.make_pod(NS, name, {"phase": "Running"})
    wait_for(lambda: c["client"].get_profile(created.id).state is ProfileState.RUNNING)
    start_pod(c, env)  # the pod's profiler measures the user's profile
    done = wait_for(lambda: c["repo"].get_profile(created.id).state.terminal, timeout=120)
    assert done
    stored = c["repo"].get_profile(created.id)
    assert stored.state is ProfileState.SUCCEEDED, stored.error
    samples = c["repo"].all_samples(created.id)
    assert len(samples) >= stored.total_samples > 0
    fake.update_status("jobs", NS, name, {"conditions": [{"type": "Complete", "status": "True"}]})
    final = wait_for(
        lambda: (p := c["client"].get_profile(created.id)).state.terminal and p, timeout=30
    )
    assert final.state is ProfileState.SUCCEEDED
    assert final.completed_samples == stored.completed_samples
    wait_for(lambda: fake.get("leases", NS, "idealrt-node-gpu-1") is None, timeout=10)


def test_placement_needs_the_kubernetes_executor(tmp_path: Path) -> None:
    """A profiler that runs profiles itself refuses a placement it could not honour."""
    repo = open_store("sqlite://")
    store, store_port = store_server.build_server(StoreConfig(), repo)
    cfg = ProfilerConfig(store_target=f"127.0.0.1:{store_port}", data_dir=tmp_path, resume=False)
    profiler, port = profiler_server.build_server(cfg)
    client = ProfilerClient(f"127.0.0.1:{port}", timeout=10)
    try:
        with pytest.raises(InvalidArgument, match=r"profile\.placement"):
            client.create_profile(
                Profile(
                    id="",
                    model=ModelRef(name="tiny-gpt2"),
                    stack=StackSpec(device="cpu"),
                    plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,)),
                    placement=Placement(gpu_product="NVIDIA-H100-80GB-HBM3"),
                )
            )
    finally:
        client.close()
        profiler.stop(1.0)
        store.stop(1.0)
        repo.close()


def test_a_restarted_profiler_adopts_its_jobs_and_fails_the_lost_ones(
    cluster: dict[str, Any],
) -> None:
    """The cluster's profiler stops while two Jobs run (a drain: its Jobs run on, their
    profiles stay RUNNING in the store); while it is down, one Job is deleted. The new
    profiler finds the other Job by label and follows it to the end; the profile whose
    Job is gone is FAILED JOB_GONE, never RUNNING forever. One node per Job: two nodes."""
    c, fake = cluster, cluster["fake"]
    fake.make_node("gpu-2", {"nvidia.com/gpu.present": "true"}, gpus=1)
    kept = c["client"].create_profile(new_profile())
    lost = c["client"].create_profile(new_profile())
    for p in (kept, lost):
        wait_for(lambda p=p: fake.get("jobs", NS, job_name(p.id)))
        fake.make_pod(NS, job_name(p.id), {"phase": "Running"})
        wait_for(lambda p=p: c["repo"].get_profile(p.id).state is ProfileState.RUNNING)
    c["client"].close()
    c["profiler"].stop(5.0)
    assert c["repo"].get_profile(kept.id).state is ProfileState.RUNNING
    assert fake.get("jobs", NS, job_name(kept.id)) is not None  # the Job ran on
    fake.delete("jobs", NS, job_name(lost.id))
    start_cluster_profiler(c)
    gone = wait_for(lambda: (p := c["repo"].get_profile(lost.id)).state.terminal and p)
    assert gone.state is ProfileState.FAILED and gone.error.startswith("JOB_GONE:")
    assert len(fake.list("jobs", NS)) == 1  # adopted, not created again
    fake.update_status(
        "jobs", NS, job_name(kept.id), {"conditions": [{"type": "Complete", "status": "True"}]}
    )
    final = wait_for(lambda: (p := c["client"].get_profile(kept.id)).state.terminal and p)
    assert final.state is ProfileState.SUCCEEDED
    wait_for(lambda: not fake.list("leases", NS), timeout=10)  # both nodes free again


def test_a_bad_placement_is_refused_before_anything_runs(cluster: dict[str, Any]) -> None:
    """Over the real channel: a GPU product that is no Kubernetes label value is
    INVALID_ARGUMENT naming placement.gpu_product; nothing is stored, no Job is made."""
    c, fake = cluster, cluster["fake"]
    bad = dataclasses.replace(new_profile(), placement=Placement(gpu_product="H100 80GB!"))
    with pytest.raises(InvalidArgument) as err:
        c["client"].create_profile(bad)
    assert err.value.field == "placement.gpu_product", err.value
    assert c["repo"].list_profiles(10, "")[0] == []
    assert fake.list("jobs", NS) == []
