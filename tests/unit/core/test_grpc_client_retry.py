"""The clients' retry policy over real servers and real channels.

- Through a TCP proxy that refuses the first connection (the server "appears" after the
  first attempt failed): a retried RPC succeeds, a non-retried one (Generate) fails
  UNAVAILABLE. The proxy counts the refusal, so the test knows an attempt did fail.
- Against a scripted server of the same services (a real grpc server whose handlers answer
  what the test says and count attempts): UNAVAILABLE is retried up to maxAttempts, other
  codes and non-retried methods are tried once, and a create's retry replays its
  request_id (filled in by the client when the caller gave none).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.serving import ServingClient
from idealrt.clients.store import StoreClient
from idealrt.core.config import ProfilerConfig, ServingConfig, StoreConfig
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, ProfileState, StackSpec, Target
from idealrt.core.errors import IdealrtError, NotFound, Unavailable
from idealrt.core.grpc_client import RETRY_POLICY, open_channel
from idealrt.core.grpc_server import GrpcServer
from idealrt.profiler.v1 import profiler_service_pb2 as profiler_pb
from idealrt.services.profiler import server as profiler_server
from idealrt.services.profiler.lease import acquire_lease
from idealrt.services.serving import server as serving_server
from idealrt.services.store import server as store_server
from idealrt.services.store.repository import open_store
from idealrt.serving.v1 import serving_service_pb2 as serving_pb
from idealrt.store.v1 import store_service_pb2 as store_pb


class RefusingProxy:
    """Loopback TCP proxy to `target_port` that closes the first `refuse` connections at
    once (the client sees a connection failure) and forwards every later one."""

    def __init__(self, target_port: int, refuse: int = 1) -> None:
        self.target_port = target_port
        self.to_refuse = refuse
        self.refused = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refuse = self.refused < self.to_refuse
                if refuse:
                    self.refused += 1
                else:
                    self.forwarded += 1
            if refuse:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # linger 0: a reset, as from a server that is not there
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture
def store_port() -> Iterator[int]:
    repo = open_store("sqlite://")
    server, port = store_server.build_server(StoreConfig(address="127.0.0.1:0"), repo)
    try:
        yield port
    finally:
        server.stop(1.0)
        repo.close()


@pytest.fixture
def serving_port() -> Iterator[int]:
    server, port = serving_server.build_server(ServingConfig(address="127.0.0.1:0"))
    try:
        yield port
    finally:
        server.stop(1.0)


def test_a_retried_call_succeeds_when_the_server_appears_after_the_first_attempt_failed(
    store_port: int,
) -> None:
    proxy = RefusingProxy(store_port)
    client = StoreClient(f"127.0.0.1:{proxy.port}", timeout=30)
    try:
        profiles, token = client.list_profiles()
        assert (profiles, token) == ([], "")
        assert proxy.refused == 1 and proxy.forwarded >= 1
    finally:
        client.close()
        proxy.close()


def test_a_create_is_retried_and_stores_one_profile(store_port: int) -> None:
    proxy = RefusingProxy(store_port)
    client = StoreClient(f"127.0.0.1:{proxy.port}", timeout=30)
    try:
        stored, created = client.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(),
                plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,)),
            )
        )
        assert created and stored.request_id  # the client gave it one
        assert proxy.refused == 1
        assert [p.id for p in client.list_profiles()[0]] == [stored.id]
    finally:
        client.close()
        proxy.close()


def test_generate_is_not_retried(serving_port: int) -> None:
    proxy = RefusingProxy(serving_port)
    channel = open_channel(f"127.0.0.1:{proxy.port}")
    client = ServingClient(channel, timeout=30)
    try:
        with pytest.raises(Unavailable) as info:
            client.generate("no-such-model", prompt_length=4, output_tokens=2)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert proxy.refused == 1
        # the server was there all along: once connected, the same call reaches it
        grpc.channel_ready_future(channel).result(timeout=30)
        with pytest.raises(NotFound):
            client.generate("no-such-model", prompt_length=4, output_tokens=2)
    finally:
        channel.close()
        proxy.close()


# ---- a scripted server of the same services ----------------------------------------------


class Scripted:
    """A real grpc server answering `method` ("package.Service/Method") with the codes of
    `script` in turn (then OK with `ok()`), recording each attempt's request."""

    def __init__(
        self,
        method: str,
        request_type: Any,
        ok: Callable[[], Any],
        script: list[grpc.StatusCode],
    ) -> None:
        self.requests: list[Any] = []
        self.script = list(script)
        service, name = method.split("/")
        lock = threading.Lock()

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            with lock:
                self.requests.append(request)
                code = self.script.pop(0) if self.script else None
            if code is not None:
                context.abort(code, f"scripted {code.name}")
            return ok()

        handler = grpc.method_handlers_generic_handler(
            service,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    handle,
                    request_deserializer=request_type.FromString,
                    response_serializer=lambda m: m.SerializeToString(),
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0).wait()


@contextlib.contextmanager
def scripted(
    method: str, request_type: Any, ok: Callable[[], Any], script: list[grpc.StatusCode]
) -> Iterator[Scripted]:
    s = Scripted(method, request_type, ok, script)
    try:
        yield s
    finally:
        s.stop()


def _profile_pb() -> Any:
    from idealrt.core import convert as cv

    return cv.profile_to_pb(
        Profile(
            id="prof-1",
            model=ModelRef(name="tiny-gpt2"),
            stack=StackSpec(),
            plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,)),
        )
    )


def test_unavailable_is_retried_up_to_max_attempts() -> None:
    U = grpc.StatusCode.UNAVAILABLE
    with scripted(
        "idealrt.store.v1.StoreService/GetProfile",
        store_pb.GetProfileRequest,
        lambda: store_pb.GetProfileResponse(profile=_profile_pb()),
        [U] * 10,
    ) as srv:
        client = StoreClient(srv.target, timeout=30)
        try:
            with pytest.raises(Unavailable):
                client.get_profile("prof-1")
        finally:
            client.close()
        assert len(srv.requests) == RETRY_POLICY["maxAttempts"]


def test_a_call_that_fails_unavailable_then_succeeds_returns_the_answer() -> None:
    U = grpc.StatusCode.UNAVAILABLE
    with scripted(
        "idealrt.profiler.v1.ProfilerService/GetProfile",
        profiler_pb.GetProfileRequest,
        lambda: profiler_pb.GetProfileResponse(profile=_profile_pb()),
        [U, U],
    ) as srv:
        client = ProfilerClient(srv.target, timeout=30)
        try:
            assert client.get_profile("prof-1").id == "prof-1"
        finally:
            client.close()
        assert len(srv.requests) == 3


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED]
)
def test_other_codes_are_not_retried(code: grpc.StatusCode) -> None:
    with scripted(
        "idealrt.store.v1.StoreService/GetProfile",
        store_pb.GetProfileRequest,
        lambda: store_pb.GetProfileResponse(profile=_profile_pb()),
        [code],
    ) as srv:
        client = StoreClient(srv.target, timeout=30)
        try:
            with pytest.raises(IdealrtError) as info:
                client.get_profile("prof-1")
            assert info.value.code == code
        finally:
            client.close()
        assert len(srv.requests) == 1


def test_generate_answered_unavailable_is_tried_once() -> None:
    with scripted(
        "idealrt.serving.v1.ServingService/Generate",
        serving_pb.GenerateRequest,
        serving_pb.GenerateResponse,
        [grpc.StatusCode.UNAVAILABLE],
    ) as srv:
        client = ServingClient(srv.target, timeout=30)
        try:
            with pytest.raises(Unavailable):
                client.generate("m", prompt_length=4, output_tokens=2)
        finally:
            client.close()
        assert len(srv.requests) == 1


def test_a_retried_create_replays_its_request_id() -> None:
    with scripted(
        "idealrt.store.v1.StoreService/CreateProfile",
        store_pb.CreateProfileRequest,
        lambda: store_pb.CreateProfileResponse(profile=_profile_pb(), created=True),
        [grpc.StatusCode.UNAVAILABLE],
    ) as srv:
        client = StoreClient(srv.target, timeout=30)
        try:
            client.create_profile(
                Profile(
                    id="",
                    model=ModelRef(name="tiny-gpt2"),
                    stack=StackSpec(),
                    plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,)),
                )
            )
        finally:
            client.close()
    ids = [r.request_id for r in srv.requests]
    assert len(ids) == 2 and ids[0] and ids[0] == ids[1]


# ---- ProfilerClient.watch across a restart of the profiler -------------------------------


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def store_target() -> Iterator[str]:
    repo = open_store("sqlite://")
    server, port = store_server.build_server(StoreConfig(address="127.0.0.1:0"), repo)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(1.0)
        repo.close()


def _profiler(store_target: str, data_dir: Path, port: int) -> GrpcServer:
    cfg = ProfilerConfig(
        address=f"127.0.0.1:{port}", store_target=store_target, data_dir=data_dir, resume=True
    )
    server, _ = profiler_server.build_server(cfg)
    return server


def test_watch_rides_out_a_profiler_restart_without_repeats(
    store_target: str, tmp_path: Path
) -> None:
    """The watched profile waits QUEUED for a device lease the test holds. The profiler
    is stopped mid-watch and a new one started on the same port (it resumes the profile);
    the test cancels it there. The watch yields QUEUED once and then CANCELLED, its end."""
    port = _free_port()
    lease = acquire_lease(tmp_path / "leases", "cpu", profile_id="the-test")
    first = _profiler(store_target, tmp_path, port)
    second: GrpcServer | None = None
    client = ProfilerClient(f"127.0.0.1:{port}", timeout=30)
    seen: list[Profile] = []
    errors: list[BaseException] = []
    got_first = threading.Event()

    def follow(profile_id: str) -> None:
        try:
            for p in client.watch(profile_id, timeout=120):
                seen.append(p)
                got_first.set()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            got_first.set()

    try:
        profile = client.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(device="cpu"),
                plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,), repeats=1),
                target=Target(address="127.0.0.1:1"),  # never reached: the lease is held
            )
        )
        watcher = threading.Thread(target=follow, args=(profile.id,), daemon=True)
        watcher.start()
        assert got_first.wait(60)
        first.stop(0.5)  # the open watch is cancelled: UNAVAILABLE to the client
        second = _profiler(store_target, tmp_path, port)
        # the restarted profiler resumed the profile (still waiting for the lease)
        assert client.get_profile(profile.id).state == ProfileState.QUEUED
        client.cancel(profile.id)
        watcher.join(120)
        assert not watcher.is_alive()
    finally:
        client.close()
        first.stop(0)
        if second is not None:
            second.stop(0)
        lease.release()
    assert errors == []
    assert [p.state for p in seen] == [ProfileState.QUEUED, ProfileState.CANCELLED]


def test_watch_gives_up_after_its_reconnect_window(store_target: str, tmp_path: Path) -> None:
    port = _free_port()
    lease = acquire_lease(tmp_path / "leases", "cpu", profile_id="the-test")
    server = _profiler(store_target, tmp_path, port)
    client = ProfilerClient(f"127.0.0.1:{port}", timeout=10, watch_reconnect_window_s=1.0)
    try:
        profile = client.create_profile(
            Profile(
                id="",
                model=ModelRef(name="tiny-gpt2"),
                stack=StackSpec(device="cpu"),
                plan=ProfilePlan(prompt_tokens=(4,), output_tokens=(2,), repeats=1),
                target=Target(address="127.0.0.1:1"),
            )
        )
        watch = client.watch(profile.id, timeout=120)
        assert next(watch).state == ProfileState.QUEUED
        server.stop(0)  # and it never comes back
        with pytest.raises(Unavailable) as info:
            next(watch)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        server.stop(0)
        lease.release()
