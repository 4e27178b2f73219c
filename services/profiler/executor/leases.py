"""Node leases: one coordination.k8s.io/v1 Lease per GPU node, so that two profiles never
share a node, across profiler replicas too.

A Lease `idealrt-node-<node>` in the executor's namespace names its holder
(`spec.holderIdentity`, one per profiler replica), `leaseDurationSeconds` and
`renewTime`. Acquire: create it (409 = another replica created it first), or, when it
exists and is free (no holder) or expired (renewTime + duration in the past: its holder
stopped renewing), replace it carrying the resourceVersion we read (409 = someone else
updated it first: they won). Renew: replace with our resourceVersion; a 409 or a holder
that is not us means the lease was lost. Release: delete, with a resourceVersion
precondition (a lease someone took over is not ours to delete).

The API is a small protocol of dict bodies (`LeaseApi`), implemented over the official
client in kubernetes.py; nothing here imports `kubernetes`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

__all__ = ["LEASE_PREFIX", "LeaseApi", "LeaseConflict", "LeaseMissing", "NodeLeases"]

LEASE_PREFIX = "idealrt-node-"
PROFILE_ANNOTATION = "idealrt.io/profile-id"

log = structlog.get_logger(__name__)
MANAGED_LABEL = ("app.kubernetes.io/managed-by", "idealrt-profiler")


class LeaseConflict(Exception):
    """409: the Lease exists (create) or changed since we read it (replace/delete)."""


class LeaseMissing(Exception):
    """404: no such Lease."""


class LeaseApi(Protocol):
    def get(self, namespace: str, name: str) -> dict[str, Any]: ...

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def replace(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def delete(self, namespace: str, name: str, resource_version: str) -> None: ...

    def list(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...


def _microtime(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@dataclasses.dataclass
class Held:
    node: str
    profile_id: str
    lease: dict[str, Any]  # the Lease as last written by us


class NodeLeases:
    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        identity: str,
        duration_s: int = 30,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api, self.namespace, self.identity = api, namespace, identity
        self.duration_s, self.clock = duration_s, clock
        self._lock = threading.Lock()
        self._held: dict[str, Held] = {}

    @staticmethod
    def name_of(node: str) -> str:
        return f"{LEASE_PREFIX}{node}"

    def held(self) -> list[Held]:
        with self._lock:
            return list(self._held.values())

    def _body(self, node: str, profile_id: str, base: dict[str, Any] | None) -> dict[str, Any]:
        now = _microtime(self.clock())
        meta: dict[str, Any] = {
            "name": self.name_of(node),
            "namespace": self.namespace,
            "labels": {MANAGED_LABEL[0]: MANAGED_LABEL[1], "idealrt.io/node": node},
            "annotations": {PROFILE_ANNOTATION: profile_id},
        }
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        if base is not None:
            meta["resourceVersion"] = base["metadata"]["resourceVersion"]
            old = base.get("spec") or {}
            transitions = int(old.get("leaseTransitions") or 0)
            if old.get("holderIdentity") and old.get("holderIdentity") != self.identity:
                transitions += 1
            spec["leaseTransitions"] = transitions
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    def expired(self, lease: dict[str, Any]) -> bool:
        spec = lease.get("spec") or {}
        if not spec.get("holderIdentity"):
            return True
        renewed = _parse_time(spec.get("renewTime") or spec.get("acquireTime"))
        if renewed is None:
            return True
        duration = timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))
        return renewed + duration <= self.clock()

    def try_acquire(self, node: str, profile_id: str, *, adopt_from: str = "") -> bool:
        """Take the node's Lease for `profile_id`: True when we hold it now. A lease held
        for this same profile by us or by `adopt_from` (our own earlier incarnation, after
        a restart) is taken at once; any other live lease is not."""
        name = self.name_of(node)
        try:
            current = self.api.get(self.namespace, name)
        except LeaseMissing:
            try:
                created = self.api.create(self.namespace, self._body(node, profile_id, None))
            except LeaseConflict:
                return False  # another replica created it first
            self._keep(node, profile_id, created)
            return True
        holder = (current.get("spec") or {}).get("holderIdentity") or ""
        # ours only for the same profile: a Lease this replica (or its earlier
        # incarnation) holds for another profile is that profile's node, not free
        same = (current["metadata"].get("annotations") or {}).get(PROFILE_ANNOTATION)
        mine = (holder == self.identity or (adopt_from and holder == adopt_from)) and (
            same == profile_id
        )
        if not mine and not self.expired(current):
            return False
        try:
            updated = self.api.replace(self.namespace, name, self._body(node, profile_id, current))
        except (LeaseConflict, LeaseMissing):
            return False  # someone else updated (or deleted) it first: they won
        self._keep(node, profile_id, updated)
        return True

    def _keep(self, node: str, profile_id: str, lease: dict[str, Any]) -> None:
        with self._lock:
            self._held[node] = Held(node, profile_id, lease)

    def renew(self, node: str) -> bool:
        """Renew our Lease on `node`; False when it was lost (taken over, or deleted)."""
        with self._lock:
            held = self._held.get(node)
        if held is None:
            return False
        body = dict(held.lease)
        body["spec"] = {**held.lease["spec"], "renewTime": _microtime(self.clock())}
        try:
            updated = self.api.replace(self.namespace, self.name_of(node), body)
        except (LeaseConflict, LeaseMissing):
            with self._lock:
                if self._held.get(node) is held:
                    del self._held[node]
                    return False
            return True  # released meanwhile (its delete met our renewal): not lost
        with self._lock:
            if self._held.get(node) is held:
                self._held[node] = Held(node, held.profile_id, updated)
                return True
        # released while this renewal was on its way: the release's delete met a stale
        # resourceVersion; delete what this renewal wrote, or the Lease would outlive it
        self._delete(node, held.profile_id, updated)
        return True

    def renew_all(self) -> list[str]:
        """Renew every lease we hold; the nodes whose lease was lost."""
        return [h.node for h in self.held() if not self.renew(h.node)]

    def release(self, node: str) -> None:
        """Delete our Lease on `node` (nothing when it is not ours any more)."""
        with self._lock:
            held = self._held.pop(node, None)
        if held is None:
            return
        self._delete(node, held.profile_id, held.lease)

    def _delete(self, node: str, profile_id: str, lease: dict[str, Any]) -> None:
        """Delete our Lease for `profile_id` on `node`, `lease` being the last version we
        know: a 409 (a renewal of ours landed first) reads it again and retries while it
        is still ours for that profile; taken over or gone: nothing to do."""
        name = self.name_of(node)
        for _ in range(5):
            try:
                self.api.delete(self.namespace, name, lease["metadata"]["resourceVersion"])
                return
            except LeaseMissing:
                return
            except LeaseConflict:
                try:
                    lease = self.api.get(self.namespace, name)
                except LeaseMissing:
                    return
                holder = (lease.get("spec") or {}).get("holderIdentity")
                pid = (lease["metadata"].get("annotations") or {}).get(PROFILE_ANNOTATION)
                if holder != self.identity or pid != profile_id:
                    return  # taken over: no longer ours to delete
        log.warning("node_lease_not_released", node=node, profile_id=profile_id)

    def managed(self) -> list[dict[str, Any]]:
        """Every node Lease of the profiler (any holder)."""
        return self.api.list(self.namespace, f"{MANAGED_LABEL[0]}={MANAGED_LABEL[1]}")

    def release_orphan(self, lease: dict[str, Any]) -> bool:
        """Delete a Lease found at recovery whose profile has no Job; False when it changed
        meanwhile (someone renewed or took it)."""
        meta = lease["metadata"]
        try:
            self.api.delete(self.namespace, meta["name"], meta["resourceVersion"])
        except (LeaseConflict, LeaseMissing):
            return False
        return True
