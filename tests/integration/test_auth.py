"""Authentication over real TLS: the store's own `build_server` on 127.0.0.1 port 0 with an
auth config from files written here, TLS certificates and JWT signing keys generated here
(`cryptography`), a JWKS served by a real loopback HTTP server, and the `idealrt` CLI
against a TLS profiler that calls the store with its own service token.

Nothing is mocked: a refusal is the server's UNAUTHENTICATED status with
`ErrorInfo(reason=UNAUTHENTICATED)`, read from the real RPC."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import structlog.testing
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from idealrt.clients.cli import main as cli_main
from idealrt.clients.store import StoreClient
from idealrt.core.auth import (
    AuthConfig,
    Authenticator,
    Principal,
    Role,
    audit,
    current_principal,
    token_sha256,
)
from idealrt.core.config import ProfilerConfig, StoreConfig
from idealrt.core.errors import Unauthenticated
from idealrt.core.grpc_client import open_channel
from idealrt.core.grpc_server import GrpcServer, start_server
from idealrt.core.logging import configure_logging
from idealrt.core.reasons import UNAUTHENTICATED
from idealrt.core.tls import TlsConfig
from idealrt.services.profiler.server import build_server as build_profiler
from idealrt.services.store.server import build_server as build_store
from idealrt.store.v1 import store_service_pb2 as stpb
from idealrt.store.v1 import store_service_pb2_grpc as stpbg
from tests._pki import server_pki

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 10.0
USER_TOKEN = "user-token-0123456789abcdef"
PROFILER_TOKEN = "profiler-token-0123456789abcdef"
AUDIENCE = "idealrt"


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def pki(tmp_path: Path) -> tuple[TlsConfig, TlsConfig]:
    """(server side, client side): a CA and a server certificate for localhost."""
    return server_pki(tmp_path)


class JwksServer:
    """A real HTTP server on loopback serving one JWKS, counting its fetches."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        body = json.dumps(jwks).encode()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.fetches = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/openid/v1/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def signer() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_server(signer: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signer.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    srv = JwksServer({"keys": [jwk]})
    yield srv
    srv.close()


def sa_token(signer: rsa.RSAPrivateKey, sub: str = "system:serviceaccount:team-a:runner") -> str:
    now = int(time.time())
    claims = {"sub": sub, "aud": [AUDIENCE], "iat": now, "nbf": now, "exp": now + 600}
    return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture
def auth_cfg(tmp_path: Path, jwks_server: JwksServer) -> AuthConfig:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        "[[token]]\n"
        f'sha256 = "{token_sha256(USER_TOKEN)}"\n'
        'subject = "alice"\n'
        'roles = { "*" = "reader" }\n'
        "[[token]]\n"
        f'sha256 = "{token_sha256(PROFILER_TOKEN)}"\n'
        'subject = "idealrt-profiler"\n'
        'roles = { "*" = "writer" }\n'
    )
    bindings = tmp_path / "bindings.toml"
    bindings.write_text(
        '[[binding]]\nsubject_prefix = "system:serviceaccount:team-a:"\n'
        'roles = { "team-a" = "writer" }\n'
    )
    return AuthConfig(tokens_file=tokens, jwks_url=jwks_server.url, bindings_file=bindings)


@pytest.fixture
def servers() -> Iterator[list[GrpcServer]]:
    started: list[GrpcServer] = []
    yield started
    for s in reversed(started):
        s.stop(0)


@pytest.fixture
def store(
    tmp_path: Path,
    pki: tuple[TlsConfig, TlsConfig],
    auth_cfg: AuthConfig,
    servers: list[GrpcServer],
) -> str:
    server, port = build_store(
        StoreConfig(address="127.0.0.1:0", data_dir=tmp_path / "store", tls=pki[0], auth=auth_cfg)
    )
    servers.append(server)
    return f"localhost:{port}"


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


# ------------------------------------------------------------------ store over TLS


def test_store_refuses_calls_without_a_valid_token(
    store: str, pki: tuple[TlsConfig, TlsConfig]
) -> None:
    channel = open_channel(store, pki[1])
    stub = stpbg.StoreServiceStub(channel)
    try:
        for metadata in (None, [("authorization", "Bearer nope-not-a-token")]):
            with pytest.raises(grpc.RpcError) as e:
                stub.ListProfiles(stpb.ListProfilesRequest(), timeout=TIMEOUT_S, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason_of(e.value) == UNAUTHENTICATED
            assert "nope-not-a-token" not in (e.value.details() or "")
    finally:
        channel.close()
    # the client library mirrors it
    for token in (None, "wrong-token-value"):
        client = StoreClient(store, timeout=TIMEOUT_S, tls=pki[1], token=token)
        try:
            with pytest.raises(Unauthenticated) as exc:
                client.list_profiles()
            assert exc.value.reason == UNAUTHENTICATED
        finally:
            client.close()


def test_store_answers_a_good_static_token(store: str, pki: tuple[TlsConfig, TlsConfig]) -> None:
    client = StoreClient(store, timeout=TIMEOUT_S, tls=pki[1], token=USER_TOKEN)
    try:
        assert client.list_profiles() == ([], "")
    finally:
        client.close()


def test_store_answers_a_jwt_verified_against_the_fetched_jwks(
    store: str,
    pki: tuple[TlsConfig, TlsConfig],
    signer: rsa.RSAPrivateKey,
    jwks_server: JwksServer,
) -> None:
    assert jwks_server.fetches == 0  # nothing is fetched before the first JWT
    client = StoreClient(store, timeout=TIMEOUT_S, tls=pki[1], token=sa_token(signer))
    try:
        for _ in range(3):
            assert client.list_profiles() == ([], "")
    finally:
        client.close()
    assert jwks_server.fetches == 1  # cached
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = StoreClient(store, timeout=TIMEOUT_S, tls=pki[1], token=sa_token(other_key))
    try:
        with pytest.raises(Unauthenticated):
            forged.list_profiles()
    finally:
        forged.close()


def test_health_needs_no_token(store: str, pki: tuple[TlsConfig, TlsConfig]) -> None:
    channel = open_channel(store, pki[1])
    try:
        r = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
        )
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


# ------------------------------------------------------------------ principal in handlers


def test_handlers_run_as_the_caller_and_audit_names_it(
    pki: tuple[TlsConfig, TlsConfig], auth_cfg: AuthConfig, servers: list[GrpcServer]
) -> None:
    """A unary and a server-streaming handler see the caller's principal (the streaming one
    at every step) and `audit` names it; outside the RPC it is anonymous again."""
    seen: list[Principal] = []

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        p = current_principal()
        seen.append(p)
        p.require("team-a", Role.READER)
        audit("Echo", "team-a", "obj-1", "ok")
        return p.subject.encode()

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(3):
            seen.append(current_principal())
            yield f"{current_principal().subject}:{i}".encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = start_server(
        "127.0.0.1:0",
        [lambda s: s.add_generic_rpc_handlers((handler,))],
        ["test.Echo"],
        tls=pki[0],
        auth=Authenticator(auth_cfg),
    )
    servers.append(server)
    channel = open_channel(f"localhost:{server.port}", pki[1], token=USER_TOKEN)
    configure_logging("info", json=True)
    try:
        with structlog.testing.capture_logs() as logs:
            assert channel.unary_unary("/test.Echo/Unary")(b"", timeout=TIMEOUT_S) == b"alice"
            got = list(channel.unary_stream("/test.Echo/Stream")(b"", timeout=TIMEOUT_S))
    finally:
        configure_logging("warning", json=True)
        channel.close()
    assert got == [b"alice:0", b"alice:1", b"alice:2"]
    assert [p.subject for p in seen] == ["alice"] * 4
    (line,) = [e for e in logs if e["event"] == "audit"]
    assert (line["subject"], line["subject_kind"], line["rpc"], line["object_id"]) == (
        "alice",
        "token",
        "Echo",
        "obj-1",
    )
    assert not any(USER_TOKEN in repr(e) for e in logs)
    assert current_principal().kind == "anonymous"


# ------------------------------------------------------------------ CLI and service token


def test_cli_with_and_without_a_token_file(
    tmp_path: Path,
    store: str,
    pki: tuple[TlsConfig, TlsConfig],
    auth_cfg: AuthConfig,
    servers: list[GrpcServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI sends --token-file's token to a TLS profiler with auth; the profiler calls
    the store (auth too) with its own service token (IDEALRT_SERVICE_TOKEN_FILE)."""
    svc_token = tmp_path / "profiler.token"
    svc_token.write_text(PROFILER_TOKEN + "\n")
    server_tls, client_tls = pki
    full = TlsConfig(
        cert_file=server_tls.cert_file, key_file=server_tls.key_file, ca_file=client_tls.ca_file
    )
    profiler, p_port = build_profiler(
        ProfilerConfig(
            address="127.0.0.1:0",
            store_target=store,
            data_dir=tmp_path / "profiler",
            resume=True,  # lists the store's unfinished profiles at start: as itself
            tls=full,
            auth=dataclasses.replace(auth_cfg, service_token_file=svc_token),
        )
    )
    servers.append(profiler)
    token_file = tmp_path / "user.token"
    token_file.write_text(USER_TOKEN + "\n")
    target = f"localhost:{p_port}"
    args = ["profiles", "--json", "--profiler", target, "--metrics", target, "--store", store]
    args += ["--ca", str(client_tls.ca_file)]
    assert cli_main([*args, "--token-file", str(token_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profiles"] == []
    assert cli_main(args) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    (tmp_path / "empty.token").write_text("\n")
    with pytest.raises(SystemExit, match="empty"):
        cli_main([*args, "--token-file", str(tmp_path / "empty.token")])


def test_cli_token_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(USER_TOKEN + "\n"))
    assert cli_main(["token-hash"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == token_sha256(USER_TOKEN) and USER_TOKEN not in out
