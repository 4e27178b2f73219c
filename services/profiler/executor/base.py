"""The profiler's executor interface: where and how one profile runs.

`Executor.run(profile, cancel=..., on_progress=...)` runs one profile to its end on the
calling thread (a ProfileManager worker) and returns its final state; it never raises for
a failure of the run itself (that is a FAILED profile whose `error` is "<REASON>: ...").
One exception to "final": when the executor is closed (the profiler shuts down) while a
run is in progress, the kubernetes executor returns the profile still RUNNING: its Job
runs on in the cluster and a restarted profiler adopts it (`recover`); the caller must
not store that as an end.
Two implementations: `local` (this process, local.py: today's behaviour, the embedded
default) and `kubernetes` (one Job per profile on a leased GPU node, kubernetes.py),
chosen by `ProfilerConfig.executor` (IDEALRT_PROFILER_EXECUTOR).

Plain dataclasses only: no grpc, no kubernetes import here.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from idealrt.core.domain import Profile

__all__ = [
    "DEADLINE_EXCEEDED",
    "EXECUTORS",
    "IMAGE_PULL_FAILED",
    "JOB_FAILED",
    "JOB_GONE",
    "OOM_KILLED",
    "UNSCHEDULABLE",
    "ClusterPlacement",
    "Executor",
    "ExecutorEvent",
    "ExecutorPhase",
    "ProfileReader",
    "Recovery",
]

EXECUTORS = ("local", "kubernetes")

# terminal reasons of the kubernetes executor (Profile.error starts with "<REASON>: ")
IMAGE_PULL_FAILED = "IMAGE_PULL_FAILED"  # ErrImagePull / ImagePullBackOff / InvalidImageName
UNSCHEDULABLE = "UNSCHEDULABLE"  # the pod cannot be placed on the leased node
OOM_KILLED = "OOM_KILLED"  # a container of the pod was OOMKilled
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the Job's activeDeadlineSeconds (the plan's budget)
JOB_FAILED = "JOB_FAILED"  # the Job failed for another reason (its condition's reason follows)
JOB_GONE = "JOB_GONE"  # the Job was deleted, or is missing after a restart


class ExecutorPhase(enum.StrEnum):
    QUEUED = "queued"  # waiting for its turn in the fair queue / for a node
    SCHEDULED = "scheduled"  # a node is leased, the Job is created
    RUNNING = "running"  # the pod runs
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (ExecutorPhase.SUCCEEDED, ExecutorPhase.FAILED)


@dataclasses.dataclass(frozen=True)
class ExecutorEvent:
    """What an executor saw about one profile: its phase, and for FAILED a stable
    UPPER_SNAKE `reason` (above) and a message a person can act on."""

    profile_id: str
    phase: ExecutorPhase
    reason: str = ""
    message: str = ""
    node: str = ""

    @property
    def error(self) -> str:
        """Profile.error of this event ("" unless FAILED)."""
        if self.phase is not ExecutorPhase.FAILED:
            return ""
        return f"{self.reason}: {self.message}" if self.message else self.reason


@dataclasses.dataclass(frozen=True)
class ClusterPlacement:
    """The cluster's side of placement (config; a profile's own `Placement` narrows it):
    `nodes`, a fixed list of candidate GPU nodes, or empty: the Nodes listed with
    `node_selector` plus the profile's GPU product / node pool labels (one profile per
    node at a time, by node Lease); the rest go into the pod (nodeSelector, tolerations,
    the serving container's resources: `gpus` of `gpu_resource`, or every allocatable
    GPU of the node for a whole-node profile)."""

    nodes: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    tolerations: tuple[Mapping[str, Any], ...] = (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    )
    gpu_resource: str = "nvidia.com/gpu"
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    gpu_product_label: str = "nvidia.com/gpu.product"  # GPU feature discovery's label
    node_pool_label: str = "idealrt.io/node-pool"


@dataclasses.dataclass
class Recovery:
    """What an executor makes of the store's unfinished profiles at start-up."""

    resume: list[Profile]  # to run again (the kubernetes run() adopts an existing Job)
    failed: list[Profile]  # can never end otherwise: FAILED (e.g. JOB_GONE), to be stored
    released: list[str]  # what was freed (the kubernetes executor: orphaned Lease names)


class ProfileReader(Protocol):
    """What an executor reads of the store: the profile as its run wrote it."""

    def get_profile(self, profile_id: str) -> Profile: ...


class Executor(Protocol):
    """Runs profiles (see the module's docstring)."""

    name: str

    def run(
        self,
        profile: Profile,
        *,
        cancel: threading.Event,
        on_progress: Callable[[Profile], None],
    ) -> Profile: ...

    def recover(self, unfinished: Sequence[Profile]) -> Recovery: ...

    def close(self) -> None: ...
