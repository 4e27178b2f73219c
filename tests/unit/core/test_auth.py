"""idealrt.core.auth: static tokens, JWTs verified against a JWKS (keys generated here with
`cryptography`, RS256 and ES256), bindings and the roles claim, Principal's checks, the
client-side token sources, and that a token never reaches a log line or an error."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from idealrt.core.auth import (
    ANONYMOUS_ADMIN,
    AuthConfig,
    Authenticator,
    Principal,
    Role,
    TokenFile,
    acting_as,
    audit,
    audit_to_file,
    client_token,
    current_principal,
    token_sha256,
)
from idealrt.core.errors import PermissionDenied, Unauthenticated
from idealrt.core.logging import configure_logging
from idealrt.core.reasons import NAMESPACE_FORBIDDEN, UNAUTHENTICATED

TOKEN = "s3cr3t-token-value-0123456789"
OTHER = "another-token-abcdefghijklmnop"


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every log line, info included (tests run at warning: tests/conftest.py)."""
    configure_logging("info", json=True)
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        configure_logging("warning", json=True)


def write_tokens(path: Path, entries: list[tuple[str, str, dict[str, str]]]) -> Path:
    lines = []
    for token, subject, roles in entries:
        role_items = ", ".join(f'"{ns}" = "{r}"' for ns, r in roles.items())
        lines += [
            "[[token]]",
            f'sha256 = "{token_sha256(token)}"',
            f'subject = "{subject}"',
            f"roles = {{ {role_items} }}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ principal


def test_principal_roles_namespaces_and_require() -> None:
    p = Principal("alice", {"team-a": Role.WRITER, "*": Role.READER})
    assert p.role_in("team-a") is Role.WRITER
    assert p.role_in("team-b") is Role.READER
    assert p.namespaces(Role.READER) is None  # "*" reads everything
    assert p.namespaces(Role.WRITER) == frozenset({"team-a"})
    assert p.namespaces(Role.ADMIN) == frozenset()
    p.require("team-a", Role.WRITER)
    p.require("team-b", Role.READER)
    with pytest.raises(PermissionDenied) as e:
        p.require("team-b", Role.WRITER)
    assert e.value.reason == NAMESPACE_FORBIDDEN
    assert "team-b" in e.value.message and "writer" in e.value.message
    nobody = Principal("bob", {})
    assert nobody.role_in("x") is None and nobody.namespaces() == frozenset()
    with pytest.raises(PermissionDenied):
        nobody.require("x", Role.READER)
    assert Role.READER < Role.WRITER < Role.ADMIN


def test_principal_roles_are_immutable() -> None:
    roles = {"a": Role.ADMIN}
    p = Principal("x", roles)
    roles["b"] = Role.ADMIN
    assert "b" not in p.roles
    with pytest.raises(TypeError):
        p.roles["c"] = Role.ADMIN  # type: ignore[index]


def test_current_principal_and_acting_as() -> None:
    assert current_principal() is ANONYMOUS_ADMIN
    ANONYMOUS_ADMIN.require("anything", Role.ADMIN)
    alice = Principal("alice", {"a": Role.READER})
    with acting_as(alice):
        assert current_principal() is alice
    assert current_principal() is ANONYMOUS_ADMIN


def test_audit_line_names_the_principal(logs: list[dict[str, Any]]) -> None:
    with acting_as(Principal("alice", {}, kind="jwt")):
        audit("CreateProfile", "team-a", "prof_1", "ok", created=True)
    (line,) = [e for e in logs if e["event"] == "audit"]
    assert line["subject"] == "alice" and line["subject_kind"] == "jwt"
    assert (line["rpc"], line["namespace"], line["object_id"], line["outcome"]) == (
        "CreateProfile",
        "team-a",
        "prof_1",
        "ok",
    )
    assert line["created"] is True


# ------------------------------------------------------------------ static tokens


def test_disabled_authenticator_is_anonymous_admin() -> None:
    auth = Authenticator(AuthConfig())
    assert not auth.enabled
    assert auth.authenticate(None) is ANONYMOUS_ADMIN
    assert auth.authenticate("Bearer whatever") is ANONYMOUS_ADMIN


def test_static_tokens(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    path = write_tokens(
        tmp_path / "tokens.toml",
        [(TOKEN, "ci-bot", {"team-a": "writer", "*": "reader"}), (OTHER, "ops", {"*": "admin"})],
    )
    assert TOKEN not in path.read_text()  # only the hash is stored
    auth = Authenticator(AuthConfig(tokens_file=path))
    assert auth.enabled
    p = auth.authenticate(f"Bearer {TOKEN}")
    assert (p.subject, p.kind) == ("ci-bot", "token")
    assert p.role_in("team-a") is Role.WRITER and p.role_in("zzz") is Role.READER
    assert auth.authenticate(f"bearer   {OTHER} ").subject == "ops"  # scheme is case-blind
    problems = {
        None: "missing",
        "": "missing",
        "Bearer": "malformed",
        f"Basic {TOKEN}": "malformed",
        f"Bearer {TOKEN} extra": "malformed",
        f"Bearer {TOKEN}x": "unknown",
        "Bearer a.b.c": "unknown",  # looks like a JWT, but no JWKS is configured
    }
    for bearer, kind in problems.items():
        with pytest.raises(Unauthenticated) as e:
            auth.authenticate(bearer)
        assert e.value.reason == UNAUTHENTICATED
        assert kind in e.value.message, (bearer, e.value.message)
        assert TOKEN not in e.value.message
    assert not any(TOKEN in repr(line) or OTHER in repr(line) for line in logs)


def test_tokens_file_is_reloaded_and_a_broken_one_keeps_the_old(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    path = write_tokens(tmp_path / "t.toml", [(TOKEN, "a", {"*": "reader"})])
    auth = Authenticator(AuthConfig(tokens_file=path))
    write_tokens(path, [(OTHER, "b", {"*": "reader"}), (TOKEN, "a", {"*": "writer"})])
    assert auth.authenticate(f"Bearer {OTHER}").subject == "b"
    assert auth.authenticate(f"Bearer {TOKEN}").role_in("x") is Role.WRITER
    path.write_text("[[token]]\nsha256 = 'nothex'\n# broken, longer than before\n")
    assert auth.authenticate(f"Bearer {OTHER}").subject == "b"
    assert [e for e in logs if e["event"] == "auth_reload_failed"]


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[[token]]\ntoken = "plain"\nsubject = "x"\n', "token-hash"),
        ('[[token]]\nsha256 = "abc"\nsubject = "x"\n', "64 hex"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\n', "subject"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nsubject = "x"\nroles = {{ a = "owner" }}\n', "role"),
        ("not toml [", "TOML"),
    ],
)
def test_a_broken_tokens_file_stops_the_start(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="IDEALRT_AUTH_TOKENS_FILE") as e:
        Authenticator(AuthConfig(tokens_file=path))
    assert needle in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        Authenticator(AuthConfig(tokens_file=tmp_path / "missing.toml"))


def test_config_from_env_and_its_checks(tmp_path: Path) -> None:
    env = {
        "IDEALRT_AUTH_TOKENS_FILE": "/t.toml",
        "IDEALRT_AUTH_JWKS_FILE": "/jwks.json",
        "IDEALRT_AUTH_BINDINGS_FILE": "/b.toml",
        "IDEALRT_AUTH_ROLES_CLAIM": "idealrt_roles",
        "IDEALRT_AUTH_ISSUER": "https://issuer",
        "IDEALRT_SERVICE_TOKEN_FILE": "/token",
    }
    cfg = AuthConfig.from_env(env)
    assert cfg.enabled and cfg.jwt and cfg.audience == "idealrt"
    assert cfg.tokens_file == Path("/t.toml") and cfg.service_token_file == Path("/token")
    assert not AuthConfig.from_env({}).enabled
    assert not AuthConfig.from_env({"IDEALRT_SERVICE_TOKEN_FILE": "/t"}).enabled
    with pytest.raises(ValueError, match="not both"):
        AuthConfig(jwks_url="https://x/jwks", jwks_file=Path("/j"))
    with pytest.raises(ValueError, match="https"):
        AuthConfig(jwks_url="http://issuer.example.com/jwks")
    AuthConfig(jwks_url="http://127.0.0.1:8080/jwks")  # loopback may be plain http
    assert not AuthConfig(bindings_file=Path("/b.toml")).enabled  # JWT subjects only


# ------------------------------------------------------------------ JWT


class Issuer:
    """Keys of a token issuer and its JWKS document."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key, alg in (("rsa-1", self.rsa, "RS256"), ("ec-1", self.ec, "ES256")):
            algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
            jwk = json.loads(algo.to_jwk(key.public_key()))
            jwk.update(kid=kid, use="sig", alg=alg)
            keys.append(jwk)
        return {"keys": keys}

    def token(self, alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "sub": "system:serviceaccount:team-a:runner",
            "aud": ["idealrt"],
            "iss": "https://issuer.test",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key = self.rsa if alg == "RS256" else self.ec
        default_kid = "rsa-1" if alg == "RS256" else "ec-1"
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid or default_kid})


def hs256(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT itself refuses a PEM key as an HMAC secret)."""
    b64 = jwt.utils.base64url_encode
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def jwt_auth(issuer: Issuer, tmp_path: Path) -> Callable[..., Authenticator]:
    def make(**overrides: Any) -> Authenticator:
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps(issuer.jwks()))
        bindings = tmp_path / "bindings.toml"
        bindings.write_text(
            "[[binding]]\n"
            'subject = "system:serviceaccount:team-a:runner"\n'
            'roles = { "team-a" = "writer" }\n'
            "[[binding]]\n"
            'subject_prefix = "system:serviceaccount:team-a:"\n'
            'roles = { "team-a" = "reader", "shared" = "reader" }\n'
            "[[binding]]\n"
            'subject_prefix = "system:serviceaccount:team-b:"\n'
            'roles = { "team-b" = "admin" }\n'
        )
        kw: dict[str, Any] = {"jwks_file": jwks, "bindings_file": bindings}
        kw.update(overrides)
        return Authenticator(AuthConfig(**kw))

    return make


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_jwt_and_bindings(
    alg: str, issuer: Issuer, jwt_auth: Callable[..., Authenticator]
) -> None:
    auth = jwt_auth(issuer="https://issuer.test")
    p = auth.authenticate(f"Bearer {issuer.token(alg)}")
    assert (p.subject, p.kind) == ("system:serviceaccount:team-a:runner", "jwt")
    # exact and prefix bindings merge, the higher role wins
    assert dict(p.roles) == {"team-a": Role.WRITER, "shared": Role.READER}
    other = auth.authenticate(f"Bearer {issuer.token(alg, sub='system:serviceaccount:team-a:x')}")
    assert dict(other.roles) == {"team-a": Role.READER, "shared": Role.READER}
    # authenticated, but bound to nothing: no namespace at all
    nobody = auth.authenticate(f"Bearer {issuer.token(alg, sub='user@example.com')}")
    assert nobody.namespaces() == frozenset()


def test_roles_claim(issuer: Issuer, jwt_auth: Callable[..., Authenticator]) -> None:
    auth = jwt_auth(roles_claim="idealrt_roles")
    token = issuer.token(idealrt_roles={"team-c": "admin", "team-a": "reader"})
    p = auth.authenticate(f"Bearer {token}")
    assert dict(p.roles) == {"team-a": Role.WRITER, "shared": Role.READER, "team-c": Role.ADMIN}
    with pytest.raises(Unauthenticated, match="idealrt_roles"):
        auth.authenticate(f"Bearer {issuer.token(idealrt_roles={'x': 'owner'})}")
    # without roles_claim configured, the claim is ignored
    p = jwt_auth().authenticate(f"Bearer {token}")
    assert "team-c" not in p.roles


def test_refused_jwts(
    issuer: Issuer, jwt_auth: Callable[..., Authenticator], logs: list[dict[str, Any]]
) -> None:
    auth = jwt_auth(issuer="https://issuer.test", leeway_s=5)
    now = int(time.time())
    stranger = Issuer()
    public_pem = issuer.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "none", "typ": "JWT", "kid": "rsa-1"}
    b64 = jwt.utils.base64url_encode
    unsigned = (
        b64(json.dumps(header).encode()).decode()
        + "."
        + b64(json.dumps({"sub": "x", "aud": "idealrt", "exp": now + 600}).encode()).decode()
        + "."
    )
    cases = {
        "expired": issuer.token(exp=now - 60, iat=now - 700, nbf=now - 700),
        "not yet valid": issuer.token(nbf=now + 300, iat=now),
        "audience": issuer.token(aud="someone-else"),
        "issuer": issuer.token(iss="https://evil.test"),
        "unknown key": stranger.token(kid="rsa-9"),
        "bad token signature": stranger.token(),  # right kid, wrong key
        # the classic confusion: the public key used as an HMAC secret
        "not allowed": hs256({"sub": "x", "aud": "idealrt", "exp": now + 600}, public_pem),
        "lacks": issuer.token(exp=None),
        "algorithm": unsigned,
    }
    for needle, token in cases.items():
        with pytest.raises(Unauthenticated) as e:
            auth.authenticate(f"Bearer {token}")
        assert e.value.reason == UNAUTHENTICATED
        assert needle in e.value.message, (needle, e.value.message)
        assert token not in e.value.message
    assert not any(any(t in repr(line) for t in cases.values()) for line in logs)


def test_an_es256_header_never_verifies_with_an_rsa_key(
    issuer: Issuer, jwt_auth: Callable[..., Authenticator]
) -> None:
    token = issuer.token("ES256", kid="rsa-1")
    with pytest.raises(Unauthenticated, match="unknown key"):
        jwt_auth().authenticate(f"Bearer {token}")


def test_static_tokens_and_jwts_together(
    issuer: Issuer, jwt_auth: Callable[..., Authenticator], tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "t.toml", [(TOKEN, "ci", {"*": "reader"})])
    auth = jwt_auth(tokens_file=tokens)
    assert auth.authenticate(f"Bearer {TOKEN}").kind == "token"
    assert auth.authenticate(f"Bearer {issuer.token()}").kind == "jwt"
    with pytest.raises(Unauthenticated, match="unknown token"):
        auth.authenticate(f"Bearer {OTHER}")


def test_bindings_file_checks(tmp_path: Path, issuer: Issuer) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    bad = tmp_path / "b.toml"
    for text in (
        '[[binding]]\nsubject = "a"\nsubject_prefix = "b"\n',
        '[[binding]]\nsubject_prefix = ""\n',
        '[[binding]]\nroles = { a = "reader" }\n',
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match="IDEALRT_AUTH_BINDINGS_FILE"):
            Authenticator(AuthConfig(jwks_file=jwks, bindings_file=bad))
    jwks.write_text("{}")
    with pytest.raises(ValueError, match="IDEALRT_AUTH_JWKS_FILE"):
        Authenticator(AuthConfig(jwks_file=jwks))


# ------------------------------------------------------------------ client side


def test_client_token_sources(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    src = client_token(str(f), env={})
    assert isinstance(src, TokenFile) and src() == TOKEN
    f.write_text(OTHER + "\n\n")  # rotated in place: the next call sends the new one
    assert src() == OTHER
    from_env = client_token("", env={"IDEALRT_TOKEN_FILE": str(f)})
    assert callable(from_env) and from_env() == OTHER
    assert client_token("", env={"IDEALRT_TOKEN": f" {TOKEN} "}) == TOKEN
    assert client_token("", env={}) is None
    f.write_text("two words")
    with pytest.raises(ValueError) as e:
        client_token(str(f), env={})
    assert "two words" not in str(e.value) and "--token-file" in str(e.value)
    with pytest.raises(ValueError, match="IDEALRT_TOKEN_FILE"):
        client_token("", env={"IDEALRT_TOKEN_FILE": str(tmp_path / "missing")})


def test_audit_lines_go_to_the_file_while_it_is_set(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """The embedded CLI's sink: inside `audit_to_file` the line is appended to the file
    (JSON, the same fields, a timestamp) and not logged; after it, the log again."""
    path = tmp_path / "data" / "audit.log"
    with acting_as(Principal("alice", {}, kind="jwt")), audit_to_file(path):
        audit("CreateProfile", "team-a", "prof_1", "ok", created=True)
    assert not [e for e in logs if e["event"] == "audit"]
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["event"] == "audit" and line["subject"] == "alice" and line["created"] is True
    assert (line["rpc"], line["namespace"], line["object_id"], line["outcome"]) == (
        "CreateProfile",
        "team-a",
        "prof_1",
        "ok",
    )
    assert line["timestamp"].endswith("Z")
    audit("UpdateProfile", "team-a", "prof_1", "ok")
    assert [e["rpc"] for e in logs if e["event"] == "audit"] == ["UpdateProfile"]
    assert len(path.read_text().splitlines()) == 1
