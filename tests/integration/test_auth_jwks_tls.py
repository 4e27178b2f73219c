"""JWTs verified against a JWKS fetched over real HTTPS with a private CA and a fetch token
(`IDEALRT_AUTH_JWKS_CA`, `IDEALRT_AUTH_JWKS_TOKEN_FILE`): what the in-cluster Kubernetes
API server's `https://kubernetes.default.svc/openid/v1/jwks` needs.

The JWKS server is a real `http.server` on 127.0.0.1 wrapped with `ssl.SSLContext.wrap_socket`,
its certificate issued here by a test CA (`cryptography`, EC P-256); it answers 401 unless
the request carries `Authorization: Bearer <the token it wants now>`, and counts what it
served. Callers reach a real gRPC server (`start_server` with the Authenticator) over a real
channel; a refusal is the server's status with `ErrorInfo(reason=...)`."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import ssl
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
from grpc_status import rpc_status

from idealrt.core.auth import AuthConfig, Authenticator, current_principal
from idealrt.core.errors import Unavailable
from idealrt.core.grpc_server import GrpcServer, start_server
from idealrt.core.logging import configure_logging
from idealrt.core.reasons import JWKS_UNAVAILABLE
from tests._pki import make_ca

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 10.0
AUDIENCE = "idealrt"
SUBJECT = "system:serviceaccount:team-a:runner"
FETCH_TOKEN = "fetch-token-first-0123456789abcdef"
ROTATED_TOKEN = "fetch-token-rotated-fedcba9876543210-longer"
WRONG_TOKEN = "fetch-token-wrong-aaaaaaaaaaaaaaaa"
SECRETS = (FETCH_TOKEN, ROTATED_TOKEN, WRONG_TOKEN)


# ------------------------------------------------------------------ certificates


@dataclasses.dataclass(frozen=True)
class Pki:
    ca_file: Path  # the test CA, PEM: what IDEALRT_AUTH_JWKS_CA names
    cert_file: Path  # the JWKS server's certificate (localhost, 127.0.0.1), by that CA
    key_file: Path


def make_pki(dest: Path) -> Pki:
    ca = make_ca(dest, "ca")
    crt, key = ca.issue(dest, "jwks")
    return Pki(ca.path, crt, key)


# ------------------------------------------------------------------ the JWKS server


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, use="sig", alg="RS256")
    return jwk


class HttpsJwksServer:
    """A real HTTPS server on loopback serving `keys` to requests bearing `want` (401
    otherwise, with the received header in the reason phrase: a server that echoes what it
    got must not get the token into idealrt's logs), counting both."""

    def __init__(self, pki: Pki, keys: list[dict[str, Any]], want: str) -> None:
        self.keys, self.want = keys, want
        self.served = 0
        self.refused = 0
        self.seen: list[str] = []  # the Authorization headers received
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                got = self.headers.get("Authorization", "")
                owner.seen.append(got)
                if got != f"Bearer {owner.want}":
                    owner.refused += 1
                    body = b'{"message": "Unauthorized"}'
                    self.send_response(401, f"Unauthorized: got {got!r}")
                else:
                    owner.served += 1
                    body = json.dumps({"keys": owner.keys}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.cert_file, pki.key_file)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/openid/v1/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT_S)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
def signer() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_server(pki: Pki, signer: rsa.RSAPrivateKey) -> Iterator[HttpsJwksServer]:
    srv = HttpsJwksServer(pki, [jwk_of(signer, "k1")], want=FETCH_TOKEN)
    yield srv
    srv.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """A projected service-account token as the kubelet writes it (a trailing newline)."""
    path = tmp_path / "sa.token"
    path.write_text(FETCH_TOKEN + "\n")
    return path


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every log line, info included (tests run at warning: tests/conftest.py)."""
    configure_logging("info", json=True)
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        configure_logging("warning", json=True)


@pytest.fixture
def echo_server() -> Iterator[Any]:
    """start(authenticator) -> the target of a real gRPC server whose `test.Echo/Whoami`
    answers the caller's subject."""
    started: list[GrpcServer] = []

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        return current_principal().subject.encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Whoami": grpc.unary_unary_rpc_method_handler(whoami)}
    )

    def start(auth: Authenticator) -> str:
        server = start_server(
            "127.0.0.1:0",
            [lambda s: s.add_generic_rpc_handlers((handler,))],
            ["test.Echo"],
            auth=auth,
        )
        started.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for s in started:
        s.stop(0)


def sa_jwt(signer: rsa.RSAPrivateKey, kid: str = "k1") -> str:
    now = int(time.time())
    claims = {"sub": SUBJECT, "aud": [AUDIENCE], "iat": now, "nbf": now, "exp": now + 600}
    return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": kid})


def whoami(target: str, token: str) -> bytes:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/test.Echo/Whoami")
        result: bytes = call(
            b"", timeout=TIMEOUT_S, metadata=[("authorization", f"Bearer {token}")]
        )
        return result


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def assert_no_secret(logs: list[dict[str, Any]], *texts: str) -> None:
    for secret in SECRETS:
        assert not any(secret in repr(e) for e in logs), secret
        assert not any(secret in t for t in texts), secret


def cfg_for(server: HttpsJwksServer, **kw: Any) -> AuthConfig:
    return AuthConfig(jwks_url=server.url, **kw)


# ------------------------------------------------------------------ fetching with CA + token


def test_jwt_authenticates_with_the_private_ca_and_the_fetch_token(
    pki: Pki,
    signer: rsa.RSAPrivateKey,
    jwks_server: HttpsJwksServer,
    token_file: Path,
    echo_server: Any,
    logs: list[dict[str, Any]],
) -> None:
    env = {
        "IDEALRT_AUTH_JWKS_URL": jwks_server.url,
        "IDEALRT_AUTH_JWKS_CA": str(pki.ca_file),
        "IDEALRT_AUTH_JWKS_TOKEN_FILE": str(token_file),
    }
    cfg = AuthConfig.from_env(env)
    assert (cfg.jwks_ca, cfg.jwks_token_file) == (pki.ca_file, token_file)
    target = echo_server(Authenticator(cfg))
    assert jwks_server.served == 0  # nothing is fetched before the first JWT
    token = sa_jwt(signer)
    for _ in range(3):
        assert whoami(target, token) == SUBJECT.encode()
    assert (jwks_server.served, jwks_server.refused) == (1, 0)  # cached, as without TLS
    assert jwks_server.seen == [f"Bearer {FETCH_TOKEN}"]
    assert_no_secret(logs)


def test_without_the_ca_setting_the_fetch_fails_unavailable(
    signer: rsa.RSAPrivateKey,
    jwks_server: HttpsJwksServer,
    token_file: Path,
    echo_server: Any,
    logs: list[dict[str, Any]],
) -> None:
    """The system trust store does not know the test CA: the handshake fails, the caller
    gets UNAVAILABLE / JWKS_UNAVAILABLE, and the token never left (no request was made)."""
    target = echo_server(Authenticator(cfg_for(jwks_server, jwks_token_file=token_file)))
    with pytest.raises(grpc.RpcError) as e:
        whoami(target, sa_jwt(signer))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(e.value) == JWKS_UNAVAILABLE
    assert jwks_server.seen == []
    failed = [x for x in logs if x["event"] == "jwks_fetch_failed"]
    assert failed and "CERTIFICATE_VERIFY_FAILED" in failed[0]["error"]
    assert_no_secret(logs, e.value.details() or "")


def test_a_ca_that_did_not_issue_the_servers_certificate_fails(
    tmp_path: Path,
    signer: rsa.RSAPrivateKey,
    jwks_server: HttpsJwksServer,
    token_file: Path,
) -> None:
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    auth = Authenticator(cfg_for(jwks_server, jwks_ca=other.ca_file, jwks_token_file=token_file))
    with pytest.raises(Unavailable) as e:
        auth.authenticate(f"Bearer {sa_jwt(signer)}")
    assert e.value.reason == JWKS_UNAVAILABLE
    assert jwks_server.seen == []


@pytest.mark.parametrize("sent", [WRONG_TOKEN, None], ids=["wrong-token", "no-token-file"])
def test_a_refused_fetch_token_is_jwks_unavailable(
    tmp_path: Path,
    pki: Pki,
    signer: rsa.RSAPrivateKey,
    jwks_server: HttpsJwksServer,
    echo_server: Any,
    logs: list[dict[str, Any]],
    sent: str | None,
) -> None:
    kw: dict[str, Any] = {"jwks_ca": pki.ca_file}
    if sent is not None:
        (tmp_path / "wrong.token").write_text(sent + "\n")
        kw["jwks_token_file"] = tmp_path / "wrong.token"
    target = echo_server(Authenticator(cfg_for(jwks_server, **kw)))
    with pytest.raises(grpc.RpcError) as e:
        whoami(target, sa_jwt(signer))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(e.value) == JWKS_UNAVAILABLE
    assert (jwks_server.served, jwks_server.refused) == (0, 1)
    assert jwks_server.seen == [f"Bearer {sent}" if sent else ""]
    failed = [x for x in logs if x["event"] == "jwks_fetch_failed"]
    assert failed and "401" in failed[0]["error"]
    # the server echoed the header it got in its reason phrase: redacted in the log line
    assert_no_secret(logs, e.value.details() or "")


def test_a_rotated_token_file_is_sent_on_the_next_fetch(
    pki: Pki,
    signer: rsa.RSAPrivateKey,
    jwks_server: HttpsJwksServer,
    token_file: Path,
    logs: list[dict[str, Any]],
) -> None:
    """The kubelet rotates the projected token; the API server then wants the new one. The
    cached JWKS keeps serving; the next fetch (here: a JWT with a new kid) sends the new
    token."""
    auth = Authenticator(cfg_for(jwks_server, jwks_ca=pki.ca_file, jwks_token_file=token_file))
    assert auth.authenticate(f"Bearer {sa_jwt(signer)}").subject == SUBJECT
    rotated_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.keys = [jwk_of(signer, "k1"), jwk_of(rotated_key, "k2")]
    jwks_server.want = ROTATED_TOKEN
    token_file.write_text(ROTATED_TOKEN + "\n")
    st = token_file.stat()  # a new (mtime, size) whatever the clock's resolution
    os.utime(token_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert auth.authenticate(f"Bearer {sa_jwt(signer)}").subject == SUBJECT  # cache hit
    assert jwks_server.served == 1
    assert auth.authenticate(f"Bearer {sa_jwt(rotated_key, kid='k2')}").subject == SUBJECT
    assert (jwks_server.served, jwks_server.refused) == (2, 0)
    assert jwks_server.seen == [f"Bearer {FETCH_TOKEN}", f"Bearer {ROTATED_TOKEN}"]
    assert [x["variable"] for x in logs if x["event"] == "auth_reloaded"] == [
        "IDEALRT_AUTH_JWKS_TOKEN_FILE"
    ]
    assert_no_secret(logs)


def test_a_broken_rotated_token_file_keeps_the_previous_token(
    pki: Pki,
    signer: rsa.RSAPrivateKey,
    jwks_server: HttpsJwksServer,
    token_file: Path,
    logs: list[dict[str, Any]],
) -> None:
    auth = Authenticator(cfg_for(jwks_server, jwks_ca=pki.ca_file, jwks_token_file=token_file))
    token_file.write_text("\n")  # empty: rejected, the previous token stays
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.keys = [jwk_of(signer, "k1"), jwk_of(other_key, "k2")]
    assert auth.authenticate(f"Bearer {sa_jwt(other_key, kid='k2')}").subject == SUBJECT
    assert jwks_server.seen == [f"Bearer {FETCH_TOKEN}"]
    (failed,) = [x for x in logs if x["event"] == "auth_reload_failed"]
    assert "IDEALRT_AUTH_JWKS_TOKEN_FILE" in failed["error"]
    assert_no_secret(logs)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "var", ["IDEALRT_AUTH_JWKS_CA", "IDEALRT_AUTH_JWKS_TOKEN_FILE"], ids=["ca", "token-file"]
)
def test_half_configurations_are_value_errors_naming_the_variables(
    tmp_path: Path, var: str
) -> None:
    for env in (
        {var: "/some/file"},
        {var: "/some/file", "IDEALRT_AUTH_JWKS_FILE": str(tmp_path / "jwks.json")},
    ):
        with pytest.raises(ValueError, match=var) as e:
            AuthConfig.from_env(env)
        assert "IDEALRT_AUTH_JWKS_URL" in str(e.value)


def test_the_ca_needs_an_https_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IDEALRT_AUTH_JWKS_CA") as e:
        AuthConfig(jwks_url="http://127.0.0.1:8080/jwks", jwks_ca=tmp_path / "ca.crt")
    assert "IDEALRT_AUTH_JWKS_URL" in str(e.value)
    # a fetch token over plain http is allowed on loopback, like the URL itself
    AuthConfig(jwks_url="http://127.0.0.1:8080/jwks", jwks_token_file=tmp_path / "t")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a certificate\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "text", "bad-pem"],
)
def test_a_ca_file_that_does_not_parse_stops_the_start(tmp_path: Path, content: bytes) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(content)
    cfg = AuthConfig(jwks_url="https://kubernetes.default.svc/openid/v1/jwks", jwks_ca=ca)
    with pytest.raises(ValueError, match="IDEALRT_AUTH_JWKS_CA"):
        Authenticator(cfg)
    with pytest.raises(ValueError, match=r"IDEALRT_AUTH_JWKS_CA.*cannot read"):
        Authenticator(dataclasses.replace(cfg, jwks_ca=tmp_path / "missing.crt"))


def test_a_bad_token_file_stops_the_start_without_showing_the_token(tmp_path: Path) -> None:
    url = "https://kubernetes.default.svc/openid/v1/jwks"
    path = tmp_path / "t"
    for content, needle in (("\n", "empty"), (f"{FETCH_TOKEN} {WRONG_TOKEN}\n", "printable")):
        path.write_text(content)
        with pytest.raises(ValueError, match="IDEALRT_AUTH_JWKS_TOKEN_FILE") as e:
            Authenticator(AuthConfig(jwks_url=url, jwks_token_file=path))
        assert needle in str(e.value)
        assert_no_secret([], str(e.value))
    with pytest.raises(ValueError, match=r"IDEALRT_AUTH_JWKS_TOKEN_FILE.*cannot read"):
        Authenticator(AuthConfig(jwks_url=url, jwks_token_file=tmp_path / "missing"))
