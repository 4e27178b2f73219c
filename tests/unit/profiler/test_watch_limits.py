"""WatchProfile streams are bounded, so that open streams never take every server thread.

Over real servers: a store (`build_server` of the store, SQLite in memory) and a profiler
(`build_server(ProfilerConfig(max_watch_streams=4, ...))`), both on 127.0.0.1:0, reached
over real channels. The watched profile stays QUEUED because the test holds its device's
lease (the profile waits for it): its watchers stay open for as long as the test wants.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from idealrt.clients.profiler import ProfilerClient
from idealrt.core import convert as cv
from idealrt.core.config import ProfilerConfig, StoreConfig
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, ProfileState, StackSpec, Target
from idealrt.core.errors import ResourceExhausted
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg
from idealrt.services.profiler import server as profiler_server
from idealrt.services.profiler.lease import acquire_lease
from idealrt.services.profiler.manager import ProfileManager
from idealrt.services.store import server as store_server
from idealrt.services.store.repository import open_store

LIMIT = 4


def reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A store and a profiler (max_watch_streams=4) on loopback; the lease of the "cpu"
    device is held, so every profile created waits in QUEUED."""
    repo = open_store("sqlite://")
    store, store_port = store_server.build_server(StoreConfig(), repo)
    cfg = ProfilerConfig(
        store_target=f"127.0.0.1:{store_port}",
        data_dir=tmp_path,
        max_watch_streams=LIMIT,
        resume=False,
    )
    lease = acquire_lease(cfg.lease_dir, "cpu", profile_id="the-test")
    profiler, port = profiler_server.build_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield {"channel": channel, "port": port}
    finally:
        channel.close()
        profiler.stop(1.0)  # cancels the profile's wait for the lease
        lease.release()
        store.stop(1.0)
        repo.close()


def queued_profile(port: int) -> Profile:
    client = ProfilerClient(f"127.0.0.1:{port}", timeout=10)
    try:
        return client.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(device="cpu"),
                plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,), repeats=1),
                target=Target(address="127.0.0.1:1"),  # never reached: the lease is held
                request_id=uuid.uuid4().hex,
            )
        )
    finally:
        client.close()


def open_watch(
    stub: pbg.ProfilerServiceStub, profile_id: str
) -> tuple[Any, pb.WatchProfileResponse]:
    """A WatchProfile stream and its first message (the stream is open server-side)."""
    call = stub.WatchProfile(pb.WatchProfileRequest(id=profile_id), timeout=60)
    return call, next(call)


def test_watch_streams_beyond_the_limit_are_refused_and_the_server_keeps_answering(  # type: ignore[no-untyped-def]
    servers,
) -> None:
    channel = servers["channel"]
    stub = pbg.ProfilerServiceStub(channel)
    profile = queued_profile(servers["port"])
    watches = [open_watch(stub, profile.id) for _ in range(LIMIT)]
    try:
        for _call, first in watches:
            assert cv.profile_from_pb(first.profile).state == ProfileState.QUEUED
        with pytest.raises(grpc.RpcError) as info:
            open_watch(stub, profile.id)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(info.value) == "WATCH_STREAMS_EXHAUSTED"
        # health and unary calls still have workers while the streams are open
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", profiler_server.SERVICE_NAME):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        got = stub.GetProfile(pb.GetProfileRequest(id=profile.id), timeout=10)
        assert got.profile.id == profile.id
        # closing one frees its slot: a new watch is accepted (once the server has seen
        # the cancellation; retried until then, within a generous bound)
        closed, _ = watches.pop()
        closed.cancel()
        deadline = time.monotonic() + 30
        while True:
            try:
                watches.append(open_watch(stub, profile.id))
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the closed watch's slot was never freed"
                time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as info:
            open_watch(stub, profile.id)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for call, _ in watches:
            call.cancel()


def test_the_manager_frees_a_slot_when_a_watch_ends(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    m = ProfileManager(store, lambda p: kit.SyntheticTarget(), lease_dir, max_watch_streams=2)
    try:
        with acquire_lease(lease_dir, "cpu", profile_id="the-test"):
            p = m.create(kit.make_profile())
            a, b = m.watch(p.id), m.watch(p.id)
            assert next(a).id == next(b).id == p.id
            with pytest.raises(ResourceExhausted) as info:
                next(m.watch(p.id))
            assert info.value.reason == "WATCH_STREAMS_EXHAUSTED"
            a.close()  # a watch that ends (its client went away) gives its slot back
            c = m.watch(p.id)
            assert next(c).id == p.id
            b.close()
            c.close()
    finally:
        m.shutdown(timeout=20)


def test_open_watches_hold_no_server_thread_and_each_sees_the_end(tmp_path: Path) -> None:
    """300 open WatchProfile streams on the profiler's grpc.aio server: the process's
    threads do not grow with them (each is a coroutine, ProfileManager.watch_async), health
    and GetProfile answer meanwhile, and a change made by a profiler thread (the cancel)
    reaches every watcher, whose stream then ends."""
    n = 300
    repo = open_store("sqlite://")
    store, store_port = store_server.build_server(StoreConfig(), repo)
    cfg = ProfilerConfig(store_target=f"127.0.0.1:{store_port}", data_dir=tmp_path, resume=False)
    assert cfg.max_watch_streams >= 1000
    lease = acquire_lease(cfg.lease_dir, "cpu", profile_id="the-test")
    profiler, port = profiler_server.build_server(cfg)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(3)]
    watches: list[Any] = []
    try:
        profile = queued_profile(port)
        before = threading.active_count()
        for i in range(n):
            watches.append(open_watch(pbg.ProfilerServiceStub(channels[i % 3]), profile.id))
        assert threading.active_count() - before < 30  # 300 streams would be 300 threads
        health = health_pb2_grpc.HealthStub(channels[0])
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = pbg.ProfilerServiceStub(channels[1])
        assert stub.GetProfile(pb.GetProfileRequest(id=profile.id), timeout=10).profile.id
        stub.CancelProfile(pb.CancelProfileRequest(id=profile.id), timeout=10)
        for call, first in watches:
            assert cv.profile_from_pb(first.profile).state == ProfileState.QUEUED
            rest = [cv.profile_from_pb(m.profile).state for m in call]  # ends at CANCELLED
            assert rest[-1] == ProfileState.CANCELLED
    finally:
        for call, _ in watches:
            call.cancel()
        for ch in channels:
            ch.close()
        profiler.stop(1.0)
        lease.release()
        store.stop(1.0)
        repo.close()


def test_async_watch_sees_changes_and_keeps_the_limit(kit, store, lease_dir) -> None:  # type: ignore[no-untyped-def]
    """ProfileManager.watch_async on an event loop: the first snapshot, a change made on
    another thread (cancel), the end; the same limit as watch(); NOT_FOUND for no profile."""
    from idealrt.core.errors import NotFound

    m = ProfileManager(store, lambda p: kit.SyntheticTarget(), lease_dir, max_watch_streams=1)

    async def scenario() -> list[ProfileState]:
        states: list[ProfileState] = []
        stream = m.watch_async(p.id).__aiter__()
        states.append((await stream.__anext__()).state)
        other = m.watch_async(p.id).__aiter__()
        with pytest.raises(ResourceExhausted):
            await other.__anext__()
        await asyncio.to_thread(m.cancel, p.id)
        async for snapshot in stream:
            states.append(snapshot.state)
        with pytest.raises(NotFound):
            await m.watch_async("prof_nothing").__anext__()
        return states

    try:
        with acquire_lease(lease_dir, "cpu", profile_id="the-test"):
            p = m.create(kit.make_profile())
            states = asyncio.run(scenario())
        assert states[0] == ProfileState.QUEUED and states[-1] == ProfileState.CANCELLED
    finally:
        m.shutdown(timeout=20)
