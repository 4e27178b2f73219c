"""Profiler server: `build_server(cfg) -> (server, port)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from idealrt.clients.serving import ServingClient
from idealrt.clients.store import StoreClient
from idealrt.core.affinity import CoreExclusion
from idealrt.core.auth import Authenticator
from idealrt.core.config import ProfilerConfig
from idealrt.core.domain import Profile, TargetKind
from idealrt.core.errors import InvalidArgument
from idealrt.core.grpc_server import UNARY_WORKERS, GrpcServer, start_server
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg
from idealrt.services.profiler._off_cores import OffCoresTarget
from idealrt.services.profiler.contention import ContentionPolicy
from idealrt.services.profiler.executor.base import ClusterPlacement, Executor, ProfileReader
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.profiler.outbound import OutboundPolicy
from idealrt.services.profiler.quotas import Quotas
from idealrt.services.profiler.reasons import SERVING_TARGET_REQUIRED
from idealrt.services.profiler.runner import RunnerOptions
from idealrt.services.profiler.servicer import ProfilerServicer
from idealrt.services.profiler.target import GenerationTarget

__all__ = ["SERVICE_NAME", "build_server", "make_target_factory"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProfilerService"].full_name


def admit_outbound(outbound: OutboundPolicy) -> Callable[[Profile], None]:
    """The manager's `admit`: an HTTP target's base URL and credential checked against the
    outbound policy of the profile's namespace when the profile is created
    (PERMISSION_DENIED before it is stored)."""

    def admit(profile: Profile) -> None:
        t = profile.target
        if t.kind != TargetKind.HTTP or not t.base_url:
            return  # the target checks the rest (BASE_URL_REQUIRED, ...) when it runs
        url = outbound.check_url(profile.namespace, t.base_url)
        if t.credential:
            outbound.credential(profile.namespace, t.credential, url)

    return admit


def make_target_factory(  # type: ignore[no-untyped-def]
    cfg: ProfilerConfig,
    outbound: OutboundPolicy | None = None,
    off_cores_of: str = "",
    exclusion: CoreExclusion | None = None,
):
    """Targets of profiles: HTTP, or serving at the profile's address (default
    cfg.serving_target). A serving target at `off_cores_of` (the embedded suite's serving
    child) keeps this process off the cores the profile pins while it runs
    (`_off_cores.OffCoresTarget`, with `exclusion`)."""
    policy = outbound if outbound is not None else OutboundPolicy.load(cfg.outbound_config)
    if off_cores_of and exclusion is None:
        exclusion = CoreExclusion()

    def factory(profile: Profile) -> GenerationTarget:
        if profile.target.kind == TargetKind.HTTP:
            from idealrt.services.profiler.http_target import HttpTarget

            return HttpTarget.from_profile(profile, policy, namespace=profile.namespace)
        address = profile.target.address or cfg.serving_target
        if not address:
            raise InvalidArgument(
                SERVING_TARGET_REQUIRED,
                "profile.target.address is empty and the profiler has no default serving endpoint",
                field="profile.target.address",
            )
        from idealrt.services.profiler.serving_target import ServingTarget

        target = ServingTarget(
            ServingClient(address, tls=cfg.tls, token=cfg.auth.service_token()),
            profile,
            owns_serving=True,
        )
        if off_cores_of and address == off_cores_of and exclusion is not None:
            return OffCoresTarget(target, profile, exclusion)
        return target

    return factory


def kubernetes_executor(cfg: ProfilerConfig, store: ProfileReader, quotas: Quotas) -> Executor:
    """The kubernetes executor of `cfg.kubernetes` (in-cluster credentials: the profiler
    pod's ServiceAccount token, k8s/overlays/gpu)."""
    from idealrt.services.profiler.executor.kubernetes import (
        KubernetesExecutor,
        KubernetesOptions,
    )

    k = cfg.kubernetes
    placement = ClusterPlacement(
        nodes=k.nodes,
        node_selector=dict(k.node_selector),
        gpu_resource=k.gpu_resource,
        gpus=k.gpus,
        cpu=k.cpu,
        memory=k.memory,
        node_pool_label=k.node_pool_label,
    )
    options = KubernetesOptions(
        namespace=k.namespace,
        placement=placement,
        image=k.image,
        store=k.store,
        metrics=k.metrics,
    )
    if k.identity:  # else the host name (the pod's name)
        options = dataclasses.replace(options, identity=k.identity)
    return KubernetesExecutor(options, store=store, running_limit=quotas.running_limit)


def build_server(
    cfg: ProfilerConfig, outbound: OutboundPolicy | None = None, *, off_cores_of: str = ""
) -> tuple[GrpcServer, int]:
    """`outbound`: where HTTP targets may go (None: cfg.outbound_config, whose file must
    parse: a profiler does not start with half a policy). `off_cores_of`: the address of
    a serving process on this machine whose profiles keep this process off the cores they
    pin (the embedded suite's serving child; `make_target_factory`)."""
    if not cfg.store_target:
        raise ValueError("ProfilerConfig.store_target is required")
    if outbound is None:
        outbound = OutboundPolicy.load(cfg.outbound_config)
    # mTLS between the suite's services: the client side of cfg.tls (ca_file,
    # client_cert_file/client_key_file); plaintext when it has none
    store = StoreClient(cfg.store_target, tls=cfg.tls, token=cfg.auth.service_token())
    quotas = Quotas.load(cfg.quotas_file)
    remote = kubernetes_executor(cfg, store, quotas) if cfg.executor == "kubernetes" else None
    manager = ProfileManager(
        store,
        make_target_factory(cfg, outbound, off_cores_of),
        cfg.lease_dir,
        options=RunnerOptions(
            outage_window_s=cfg.outage_window_s,
            background_writes=cfg.background_writes,
            contention=ContentionPolicy(
                enabled=cfg.contention_checks,
                use_monitors=cfg.contention_monitors,
                patience_s=cfg.contention_patience_s,
            ),
        ),
        max_plan_samples=cfg.max_plan_samples,
        max_watch_streams=cfg.max_watch_streams,
        max_plan_tokens=cfg.max_plan_tokens,
        admit=admit_outbound(outbound),
        quotas=quotas,
        remote=remote,
        remote_max_concurrent=cfg.kubernetes.max_profiles,
    )
    servicer = ProfilerServicer(manager)
    # grpc.aio (idealrt.core._grpc_aio), always: WatchProfile is server-streaming and
    # long-lived; on grpc's sync server every open stream held a pool thread until it
    # ended (16 watchers once took every thread, health included). On the aio server a
    # watch is a coroutine on the loop (ProfileManager.watch_async): 1,000 open streams
    # cost no thread (bench/bench_service.py measures health and GetProfile latency with
    # them open). The unary RPCs run on the pool as before (they read the store and call
    # serving, which block); cfg.max_watch_streams still bounds open watches (memory).
    server = start_server(
        cfg.address,
        [lambda s: pbg.add_ProfilerServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        max_workers=UNARY_WORKERS,
        metrics_port=cfg.metrics_port,
        tls=cfg.tls,
        allow_insecure=cfg.allow_insecure,
        auth=Authenticator(cfg.auth),
        max_message_bytes=cfg.max_message_bytes,
        model="aio",
    )
    # at the drain's start: running profiles are checkpointed at once (not measured on
    # through the grace period), and their watch streams end, so the drain is short
    server.on_drain.append(manager.shutdown)
    server.on_stop.append(store.close)
    if cfg.run_profile:  # inside a profiling Job's pod: that profile only
        manager.run_stored(cfg.run_profile)
    elif cfg.resume:
        manager.resume_unfinished()
    return server, server.port
