"""Who is calling: bearer-token authentication and the authorization primitives.

One idea, both sides of it, which is why this module is long: a caller presents a bearer
token (gRPC metadata `authorization: Bearer <token>`), `Authenticator.authenticate` turns it
into a `Principal` (subject + role per namespace) or raises `Unauthenticated`, the server's
interceptor (idealrt.core.grpc_server) puts that principal in a contextvar for the RPC's
duration (`acting_as`), and the domain asks `current_principal().require(namespace, role)`.
The client side (`TokenFile`, `client_token`) reads the token a client sends.

Two kinds of token:
- **static tokens** (`IDEALRT_AUTH_TOKENS_FILE`, TOML): only the SHA-256 of each token is
  stored, compared with `hmac.compare_digest`; `idealrt token-hash` prints a token's hash.
      [[token]]
      sha256 = "<64 hex>"
      subject = "ci-bot"
      roles = { "team-a" = "writer", "*" = "reader" }
- **JWTs** verified against a JWKS (`IDEALRT_AUTH_JWKS_URL`, fetched and cached, or
  `IDEALRT_AUTH_JWKS_FILE`, e.g. a Kubernetes API server's /openid/v1/jwks saved by an
  operator; a URL's server may be verified by `IDEALRT_AUTH_JWKS_CA` instead of the system
  trust store and the fetch may send `IDEALRT_AUTH_JWKS_TOKEN_FILE`'s token, which is what
  the in-cluster `https://kubernetes.default.svc/openid/v1/jwks` needs): RS256/ES256 only,
  audience `IDEALRT_AUTH_AUDIENCE` (default "idealrt"), issuer `IDEALRT_AUTH_ISSUER` when
  set, exp/nbf/iat with `IDEALRT_AUTH_LEEWAY_S` of leeway. A JWT subject's roles come from
  the bindings file (`IDEALRT_AUTH_BINDINGS_FILE`) and, when `IDEALRT_AUTH_ROLES_CLAIM`
  names one, from a claim {namespace: role}:
      [[binding]]
      subject_prefix = "system:serviceaccount:team-a:"   # or subject = "..." (exact)
      roles = { "team-a" = "writer" }

The files are reloaded when they change (a Kubernetes Secret update needs no restart); a
broken new file keeps the previous contents and logs `auth_reload_failed`. A token is never
logged and never part of an error message. Without a tokens file or a JWKS the
authenticator is off and every caller is `ANONYMOUS_ADMIN` (the embedded zero-config suite).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar
from urllib.parse import urlparse

import structlog

from idealrt.core.errors import PermissionDenied, Unauthenticated, Unavailable
from idealrt.core.reasons import JWKS_UNAVAILABLE, NAMESPACE_FORBIDDEN, UNAUTHENTICATED

__all__ = [
    "ALL_NAMESPACES",
    "ANONYMOUS_ADMIN",
    "ENV_VARS",
    "AuthConfig",
    "Authenticator",
    "Principal",
    "Role",
    "TokenFile",
    "acting_as",
    "audit",
    "audit_to_file",
    "client_token",
    "current_principal",
    "token_sha256",
]

log = structlog.get_logger("idealrt.auth")

ALL_NAMESPACES = "*"
ALGORITHMS = ("RS256", "ES256")  # never "none", never HS* (a public key is no shared secret)
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
BEARER = "bearer"

# field -> the environment variable `AuthConfig.from_env` reads it from (and errors name)
ENV_VARS: dict[str, str] = {
    "tokens_file": "IDEALRT_AUTH_TOKENS_FILE",
    "jwks_url": "IDEALRT_AUTH_JWKS_URL",
    "jwks_file": "IDEALRT_AUTH_JWKS_FILE",
    "jwks_ca": "IDEALRT_AUTH_JWKS_CA",
    "jwks_token_file": "IDEALRT_AUTH_JWKS_TOKEN_FILE",
    "audience": "IDEALRT_AUTH_AUDIENCE",
    "issuer": "IDEALRT_AUTH_ISSUER",
    "bindings_file": "IDEALRT_AUTH_BINDINGS_FILE",
    "roles_claim": "IDEALRT_AUTH_ROLES_CLAIM",
    "leeway_s": "IDEALRT_AUTH_LEEWAY_S",
    "jwks_cache_s": "IDEALRT_AUTH_JWKS_CACHE_S",
    "service_token_file": "IDEALRT_SERVICE_TOKEN_FILE",
}
CLIENT_TOKEN_FILE_VAR = "IDEALRT_TOKEN_FILE"
CLIENT_TOKEN_VAR = "IDEALRT_TOKEN"


# ------------------------------------------------------------------ principals


class Role(enum.IntEnum):
    """What a principal may do in a namespace; each role includes the ones below it."""

    READER = 1
    WRITER = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r} (reader, writer or admin)") from None


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller. `roles`: namespace -> role; the key "*" is every namespace."""

    subject: str
    roles: Mapping[str, Role] = dataclasses.field(default_factory=dict)
    kind: str = "token"  # "token", "jwt", "anonymous"

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))

    def role_in(self, namespace: str) -> Role | None:
        """The highest role in `namespace` (its own or the "*" one); None: no access."""
        found = [r for r in (self.roles.get(namespace), self.roles.get(ALL_NAMESPACES)) if r]
        return max(found) if found else None

    def require(self, namespace: str, role: Role) -> None:
        """PermissionDenied (NAMESPACE_FORBIDDEN) unless the principal has `role` (or more)
        in `namespace`."""
        have = self.role_in(namespace)
        if have is None or have < role:
            held = f"holds {have.name.lower()}" if have is not None else "has no role there"
            raise PermissionDenied(
                NAMESPACE_FORBIDDEN,
                f"{self.subject!r} needs the {role.name.lower()} role in namespace "
                f"{namespace!r} ({held})",
            )

    def namespaces(self, min_role: Role = Role.READER) -> frozenset[str] | None:
        """The namespaces where the principal has at least `min_role`; None: all of them."""
        star = self.roles.get(ALL_NAMESPACES)
        if star is not None and star >= min_role:
            return None
        return frozenset(
            ns for ns, r in self.roles.items() if ns != ALL_NAMESPACES and r >= min_role
        )


ANONYMOUS_ADMIN = Principal("anonymous", {ALL_NAMESPACES: Role.ADMIN}, kind="anonymous")

_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("idealrt_principal")


def current_principal() -> Principal:
    """The principal of the RPC being handled; ANONYMOUS_ADMIN outside an RPC (in-process
    use, background work of the server itself, unit tests of domain code)."""
    return _CURRENT.get(ANONYMOUS_ADMIN)


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Run the block as `principal` (the server's interceptor, tests)."""
    token = _CURRENT.set(principal)
    try:
        yield principal
    finally:
        _CURRENT.reset(token)


# audit lines are never filtered by IDEALRT_LOG_LEVEL (a filtering wrapper of its own at
# INFO; the configured processors and output are the same as every other line's)
_audit_log = structlog.wrap_logger(
    None, wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
)


# where audit lines go instead of the log, innermost last (`audit_to_file`)
_audit_files: list[Any] = []
_audit_files_lock = threading.Lock()


@contextlib.contextmanager
def audit_to_file(path: Path) -> Iterator[None]:
    """While the block runs, audit lines go to `path` (JSON lines, appended, one write and
    flush per line) instead of the process's log: the embedded CLI keeps its suite's audit
    trail under its data dir (`<data dir>/audit.log`), off the user's terminal. The lines
    are the same as the log's (event "audit", the principal, what, where, the outcome,
    an ISO UTC timestamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        with _audit_files_lock:
            _audit_files.append(f)
        try:
            yield
        finally:
            with _audit_files_lock:
                _audit_files.remove(f)


def audit(rpc: str, namespace: str, object_id: str, outcome: str, **extra: Any) -> None:
    """One `audit` log line for a write: who (the current principal), what, where, and how
    it ended. Emitted whatever the log level (to the file of `audit_to_file`, if any)."""
    p = current_principal()
    fields = {
        "rpc": rpc,
        "namespace": namespace,
        "object_id": object_id,
        "outcome": outcome,
        "subject": p.subject,
        "subject_kind": p.kind,
        **extra,
    }
    with _audit_files_lock:
        if _audit_files:
            stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            line = {"event": "audit", **fields, "level": "info", "timestamp": stamp}
            _audit_files[-1].write(json.dumps(line, default=str) + "\n")
            _audit_files[-1].flush()
            return
    _audit_log.info("audit", **fields)


def _roles(raw: Any, where: str) -> dict[str, Role]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: roles must be a table {{namespace = role}}")
    out: dict[str, Role] = {}
    for ns, role in raw.items():
        if not isinstance(ns, str) or not ns or not isinstance(role, str):
            raise ValueError(f"{where}: roles must map namespace names to role names")
        try:
            out[ns] = Role.parse(role)
        except ValueError as exc:
            raise ValueError(f"{where}: namespace {ns!r}: {exc}") from None
    return out


def _merge(into: dict[str, Role], more: Mapping[str, Role]) -> None:
    for ns, role in more.items():
        into[ns] = max(role, into.get(ns, role))


# ------------------------------------------------------------------ config


def _loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Server side: how callers authenticate (enabled when a tokens file or a JWKS is set;
    `bindings_file` and `roles_claim` apply to JWTs, so without a JWKS they are unused;
    `jwks_ca` (PEM; None: the system trust store) and `jwks_token_file` (sent as
    `Authorization: Bearer`) only to fetching `jwks_url`).
    Client side: `service_token_file`, the token this service presents to the others."""

    tokens_file: Path | None = None
    jwks_url: str = ""
    jwks_file: Path | None = None
    jwks_ca: Path | None = None
    jwks_token_file: Path | None = None
    audience: str = "idealrt"
    issuer: str = ""
    bindings_file: Path | None = None
    roles_claim: str = ""
    leeway_s: float = 30.0
    jwks_cache_s: float = 300.0
    service_token_file: Path | None = None

    def __post_init__(self) -> None:
        if self.jwks_url and self.jwks_file is not None:
            raise ValueError(f"set {ENV_VARS['jwks_url']} or {ENV_VARS['jwks_file']}, not both")
        if self.jwks_url:
            url = urlparse(self.jwks_url)
            if url.scheme not in ("https", "http") or not url.hostname:
                raise ValueError(f"{ENV_VARS['jwks_url']} must be an https:// URL")
            if url.scheme == "http" and not _loopback_host(url.hostname):
                raise ValueError(
                    f"{ENV_VARS['jwks_url']} must be https:// (plain http only on loopback): "
                    "keys fetched in the clear could be replaced on the way"
                )
        for field in ("jwks_ca", "jwks_token_file"):
            if getattr(self, field) is not None and not self.jwks_url:
                raise ValueError(
                    f"{ENV_VARS[field]} needs {ENV_VARS['jwks_url']}: it applies only to "
                    "fetching the JWKS from a URL"
                )
        if self.jwks_ca is not None and urlparse(self.jwks_url).scheme != "https":
            raise ValueError(
                f"{ENV_VARS['jwks_ca']} verifies an https:// {ENV_VARS['jwks_url']}; "
                "this one is plain http"
            )
        if self.jwt and not self.audience:
            raise ValueError(f"{ENV_VARS['audience']} must not be empty")
        if not (0 <= self.leeway_s <= 600):
            raise ValueError(f"{ENV_VARS['leeway_s']} must be 0-600 seconds, got {self.leeway_s}")
        if not (1 <= self.jwks_cache_s <= 86400):
            raise ValueError(
                f"{ENV_VARS['jwks_cache_s']} must be 1-86400 seconds, got {self.jwks_cache_s}"
            )

    @property
    def jwt(self) -> bool:
        return bool(self.jwks_url) or self.jwks_file is not None

    @property
    def enabled(self) -> bool:
        """Whether a server with this config authenticates its callers."""
        return self.tokens_file is not None or self.jwt

    def service_token(self) -> TokenFile | None:
        """The token this service sends to the services it calls (re-read when the file
        changes, e.g. a projected service-account token); None: it sends none."""
        if self.service_token_file is None:
            return None
        return TokenFile(self.service_token_file, ENV_VARS["service_token_file"])

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuthConfig:
        e = os.environ if env is None else env

        def path(field: str) -> Path | None:
            raw = e.get(ENV_VARS[field], "")
            return Path(raw) if raw else None

        def number(field: str, default: float) -> float:
            raw = e.get(ENV_VARS[field], "")
            if not raw:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{ENV_VARS[field]} must be a number, got {raw!r}") from None

        return cls(
            tokens_file=path("tokens_file"),
            jwks_url=e.get(ENV_VARS["jwks_url"], ""),
            jwks_file=path("jwks_file"),
            jwks_ca=path("jwks_ca"),
            jwks_token_file=path("jwks_token_file"),
            audience=e.get(ENV_VARS["audience"], "") or cls.audience,
            issuer=e.get(ENV_VARS["issuer"], ""),
            bindings_file=path("bindings_file"),
            roles_claim=e.get(ENV_VARS["roles_claim"], ""),
            leeway_s=number("leeway_s", cls.leeway_s),
            jwks_cache_s=number("jwks_cache_s", cls.jwks_cache_s),
            service_token_file=path("service_token_file"),
        )


# ------------------------------------------------------------------ files

T = TypeVar("T")


class _Watched(Generic[T]):
    """A file parsed at start (a ValueError naming `var` stops the server) and again when
    its (mtime, size) changes; a broken new version keeps the previous value."""

    def __init__(self, path: Path, var: str, parse: Callable[[bytes, str], T]) -> None:
        self._path, self._var, self._parse = path, var, parse
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._value = self._load()

    def _stat(self) -> tuple[int, int]:
        try:
            st = self._path.stat()
        except OSError:
            return (-1, -1)
        return (st.st_mtime_ns, st.st_size)

    def _load(self) -> T:
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise ValueError(
                f"{self._var}: cannot read {self._path}: {exc.strerror or exc}"
            ) from None
        return self._parse(data, f"{self._var} ({self._path})")

    def get(self) -> T:
        with self._lock:
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp  # a broken version is reported once, not per RPC
                try:
                    self._value = self._load()
                    log.info("auth_reloaded", variable=self._var)
                except ValueError as exc:
                    log.error("auth_reload_failed", error=str(exc), kept="previous contents")
            return self._value


def _toml(data: bytes, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid TOML ({exc})") from None


@dataclasses.dataclass(frozen=True)
class _StaticToken:
    sha256: bytes  # the digest, never the token
    principal: Principal


def _parse_tokens(data: bytes, where: str) -> tuple[_StaticToken, ...]:
    doc = _toml(data, where)
    unknown = set(doc) - {"token"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (expected [[token]] tables)")
    entries = doc.get("token", [])
    if not isinstance(entries, list):
        raise ValueError(f"{where}: `token` must be an array of tables ([[token]])")
    out: list[_StaticToken] = []
    seen: set[bytes] = set()
    for i, entry in enumerate(entries):
        at = f"{where}: token #{i + 1}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at}: must be a table")
        extra = set(entry) - {"sha256", "subject", "roles"}
        if extra:
            hint = " (store only its sha256: `idealrt token-hash`)" if "token" in extra else ""
            raise ValueError(f"{at}: unknown keys {sorted(extra)}{hint}")
        digest, subject = entry.get("sha256"), entry.get("subject")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{at}: sha256 must be 64 hex digits (`idealrt token-hash`)")
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raise ValueError(f"{at}: sha256 must be 64 hex digits (`idealrt token-hash`)") from None
        if not isinstance(subject, str) or not subject:
            raise ValueError(f"{at}: subject must be a non-empty string")
        if raw in seen:
            raise ValueError(f"{at}: the same sha256 appears twice")
        seen.add(raw)
        roles = _roles(entry.get("roles", {}), at)
        out.append(_StaticToken(raw, Principal(subject, roles, kind="token")))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Binding:
    subject: str
    prefix: bool
    roles: Mapping[str, Role]

    def matches(self, subject: str) -> bool:
        return subject.startswith(self.subject) if self.prefix else subject == self.subject


def _parse_bindings(data: bytes, where: str) -> tuple[_Binding, ...]:
    doc = _toml(data, where)
    unknown = set(doc) - {"binding"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (expected [[binding]] tables)")
    entries = doc.get("binding", [])
    if not isinstance(entries, list):
        raise ValueError(f"{where}: `binding` must be an array of tables ([[binding]])")
    out: list[_Binding] = []
    for i, entry in enumerate(entries):
        at = f"{where}: binding #{i + 1}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at}: must be a table")
        extra = set(entry) - {"subject", "subject_prefix", "roles"}
        if extra:
            raise ValueError(f"{at}: unknown keys {sorted(extra)}")
        exact, prefix = entry.get("subject"), entry.get("subject_prefix")
        if (exact is None) == (prefix is None):
            raise ValueError(f"{at}: give exactly one of subject and subject_prefix")
        name = exact if exact is not None else prefix
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at}: subject / subject_prefix must be a non-empty string")
        out.append(_Binding(name, prefix is not None, _roles(entry.get("roles", {}), at)))
    return tuple(out)


def _parse_jwks(data: bytes, where: str) -> Any:
    jwt = _import_jwt()
    try:
        return jwt.PyJWKSet.from_dict(json.loads(data.decode()))
    except (ValueError, UnicodeDecodeError, jwt.PyJWTError) as exc:
        raise ValueError(f"{where}: not a usable JWKS ({exc})") from None


def _parse_ca(data: bytes, where: str) -> ssl.SSLContext:
    """An SSL context (hostname checked, certificate required) trusting only the PEM
    certificates of `data`; what `ssl.create_default_context(cafile=...)` makes, from the
    bytes _Watched read, so a rotated CA file is picked up like the other files."""
    if not data.strip():  # an empty cadata would load the system trust store instead
        raise ValueError(f"{where}: the file is empty (expected PEM CA certificates)")
    try:
        ctx = ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where}: not PEM CA certificates ({exc})") from None
    if not ctx.cert_store_stats()["x509"]:
        raise ValueError(f"{where}: not PEM CA certificates (none found)")
    return ctx


def _bearer(token: str | None) -> dict[str, str]:
    """The JWKS request's headers: `Authorization: Bearer <token>` when there is one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _redact(text: str, secret: str | None) -> str:
    """`text` (an error of the JWKS fetch, whose reason phrase the server chose) without
    the fetch token in it."""
    return text.replace(secret, "[redacted]") if secret else text


def _import_jwt() -> Any:
    try:
        import jwt
    except ImportError:  # pragma: no cover - a declared dependency
        raise ValueError("JWT authentication needs PyJWT: pip install 'pyjwt[crypto]'") from None
    return jwt


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token: what a tokens file stores (`idealrt token-hash`)."""
    return hashlib.sha256(token.encode()).hexdigest()


# ------------------------------------------------------------------ JWT


class _JwtVerifier:
    """Verifies a JWT's signature (a key of the JWKS, matched by `kid`), its time claims,
    audience and issuer; the principal's roles come from the bindings and the roles claim."""

    REFRESH_COOLDOWN_S = 30.0  # unknown kids refetch the JWKS at most this often

    def __init__(self, cfg: AuthConfig) -> None:
        self._jwt = _import_jwt()
        self._cfg = cfg
        self._file = (
            _Watched(cfg.jwks_file, ENV_VARS["jwks_file"], _parse_jwks)
            if cfg.jwks_file is not None
            else None
        )
        self._ca = (
            _Watched(cfg.jwks_ca, ENV_VARS["jwks_ca"], _parse_ca)
            if cfg.jwks_ca is not None
            else None
        )
        self._fetch_token = (
            _Watched(cfg.jwks_token_file, ENV_VARS["jwks_token_file"], _parse_token)
            if cfg.jwks_token_file is not None
            else None
        )
        self._client = (
            self._jwt.PyJWKClient(
                cfg.jwks_url,
                cache_jwk_set=True,
                lifespan=cfg.jwks_cache_s,
                ssl_context=self._ca.get() if self._ca is not None else None,
                headers=_bearer(self._fetch_token.get() if self._fetch_token is not None else None),
            )
            if cfg.jwks_url
            else None
        )
        self._bindings = (
            _Watched(cfg.bindings_file, ENV_VARS["bindings_file"], _parse_bindings)
            if cfg.bindings_file is not None
            else None
        )
        self._lock = threading.Lock()
        self._last_refresh = -float("inf")

    def _keys(self, refresh: bool) -> list[Any]:
        if self._file is not None:
            jwk_set = self._file.get()
        else:
            assert self._client is not None
            jwt = self._jwt
            # PyJWKClient reads `headers` and `ssl_context` at each fetch, so the next fetch
            # after a rotation sends the new token (and trusts the new CA). Updating them
            # keeps its cache: a rebuilt client would drop it, and a fetch failing then
            # would refuse every JWT. _Watched re-reads a file only when its (mtime, size)
            # changed: on a cache hit this costs a stat() per file.
            secret = self._fetch_token.get() if self._fetch_token is not None else None
            if secret is not None:
                self._client.headers = _bearer(secret)
            if self._ca is not None:
                self._client.ssl_context = self._ca.get()
            try:
                jwk_set = self._client.get_jwk_set(refresh=refresh)
            except jwt.PyJWKClientConnectionError as exc:
                log.error(
                    "jwks_fetch_failed", url=self._cfg.jwks_url, error=_redact(str(exc), secret)
                )
                raise Unavailable(
                    JWKS_UNAVAILABLE, "the JWKS that verifies tokens cannot be fetched now"
                ) from None
            except jwt.PyJWTError as exc:
                log.error("jwks_invalid", url=self._cfg.jwks_url, error=_redact(str(exc), secret))
                raise Unavailable(
                    JWKS_UNAVAILABLE, "the JWKS that verifies tokens is not usable now"
                ) from None
        return [k for k in jwk_set.keys if getattr(k, "public_key_use", None) in (None, "sig")]

    def _key_for(self, kid: str | None, alg: str) -> Any:
        def pick(keys: list[Any]) -> Any:
            usable = [k for k in keys if _key_kind(k) == _KEY_TYPES[alg]]
            if kid is None:
                return usable[0] if len(usable) == 1 else None
            return next((k for k in usable if k.key_id == kid), None)

        key = pick(self._keys(refresh=False))
        if key is None and self._client is not None:
            with self._lock:  # a rotated key: refetch, but not once per forged kid
                now = time.monotonic()
                if now - self._last_refresh >= self.REFRESH_COOLDOWN_S:
                    self._last_refresh = now
                    key = pick(self._keys(refresh=True))
        if key is None:
            raise Unauthenticated(UNAUTHENTICATED, "token signed by an unknown key")
        return key

    def verify(self, token: str) -> Principal:
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated(UNAUTHENTICATED, "malformed token") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(
                UNAUTHENTICATED,
                f"token algorithm not allowed (only {', '.join(ALGORITHMS)})",
            )
        kid = header.get("kid")
        key = self._key_for(kid if isinstance(kid, str) else None, alg)
        cfg = self._cfg
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=cfg.issuer or None,
                leeway=cfg.leeway_s,
                options={"require": ["exp", "sub"], "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(UNAUTHENTICATED, "token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(UNAUTHENTICATED, "token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                UNAUTHENTICATED, f"token audience is not {cfg.audience!r}"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(UNAUTHENTICATED, "token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(UNAUTHENTICATED, f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(UNAUTHENTICATED, "bad token signature") from None
        except (jwt.PyJWTError, TypeError, ValueError):
            raise Unauthenticated(UNAUTHENTICATED, "invalid token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated(UNAUTHENTICATED, "token subject is empty")
        return Principal(subject, self._roles_of(subject, claims), kind="jwt")

    def _roles_of(self, subject: str, claims: Mapping[str, Any]) -> dict[str, Role]:
        roles: dict[str, Role] = {}
        if self._bindings is not None:
            for b in self._bindings.get():
                if b.matches(subject):
                    _merge(roles, b.roles)
        if self._cfg.roles_claim and self._cfg.roles_claim in claims:
            try:
                _merge(roles, _roles(claims[self._cfg.roles_claim], "claim"))
            except ValueError:
                raise Unauthenticated(
                    UNAUTHENTICATED,
                    f"token claim {self._cfg.roles_claim!r} must map namespaces to "
                    "reader, writer or admin",
                ) from None
        return roles


def _key_kind(key: Any) -> str:
    """ "RSA" / "EC" of a PyJWK, from its key object (independent of the JWK's `alg`)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    k = key.key
    if isinstance(k, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(k, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "EC" if k.curve.name == "secp256r1" else "EC-other"
    return "other"


# ------------------------------------------------------------------ authenticator


class Authenticator:
    """Turns the `authorization` metadata of an RPC into a Principal."""

    def __init__(self, cfg: AuthConfig | None = None) -> None:
        """Reads the configured files now: a missing or broken one is a ValueError naming
        its variable (the server does not start with half a configuration)."""
        self.cfg = cfg or AuthConfig()
        self._tokens = (
            _Watched(self.cfg.tokens_file, ENV_VARS["tokens_file"], _parse_tokens)
            if self.cfg.tokens_file is not None
            else None
        )
        self._jwt = _JwtVerifier(self.cfg) if self.cfg.jwt else None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def authenticate(self, bearer: str | None) -> Principal:
        """`bearer`: the `authorization` metadata value ("Bearer <token>"), None when the
        call has none. Unauthenticated (reason UNAUTHENTICATED) when missing, malformed,
        unknown, expired, for another audience or badly signed; the message says which,
        never the token. Not enabled: ANONYMOUS_ADMIN."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if bearer is None or not bearer.strip():
            raise Unauthenticated(
                UNAUTHENTICATED, "missing bearer token (metadata 'authorization: Bearer <token>')"
            )
        scheme, _, token = bearer.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != BEARER or not token or any(c.isspace() for c in token):
            raise Unauthenticated(
                UNAUTHENTICATED, "malformed authorization metadata (expected 'Bearer <token>')"
            )
        if self._tokens is not None:
            found = self._static(token)
            if found is not None:
                return found
        if self._jwt is not None and token.count(".") == 2:
            return self._jwt.verify(token)
        raise Unauthenticated(UNAUTHENTICATED, "unknown token")

    def _static(self, token: str) -> Principal | None:
        assert self._tokens is not None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self._tokens.get():  # every entry: no early exit
            if hmac.compare_digest(digest, entry.sha256):
                found = entry.principal
        return found


# ------------------------------------------------------------------ client side


class TokenFile:
    """A bearer token read from a file, re-read when the file changes (a rotated projected
    service-account token, an updated Secret); callable: the token now."""

    def __init__(self, path: Path, var: str = "--token-file") -> None:
        self._watched = _Watched(path, var, _parse_token)

    def __call__(self) -> str:
        return self._watched.get()


def _parse_token(data: bytes, where: str) -> str:
    try:
        token = data.decode().strip()
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not a text token") from None
    _check_token(token, where)
    return token


def _check_token(token: str, where: str) -> None:
    if not token:
        raise ValueError(f"{where}: the token is empty")
    if not all(33 <= ord(c) <= 126 for c in token):
        # gRPC metadata values are printable ASCII; a token never contains spaces
        raise ValueError(f"{where}: the token must be printable ASCII without spaces")


def client_token(
    token_file: str = "", env: Mapping[str, str] | None = None
) -> TokenFile | str | None:
    """The token a client sends: `token_file` (--token-file), else the file named by
    IDEALRT_TOKEN_FILE, else IDEALRT_TOKEN itself; None when none is set. ValueError
    (naming the file or variable, never the token) when unreadable or malformed."""
    e = os.environ if env is None else env
    if token_file:
        return TokenFile(Path(token_file), "--token-file")
    if e.get(CLIENT_TOKEN_FILE_VAR):
        return TokenFile(Path(e[CLIENT_TOKEN_FILE_VAR]), CLIENT_TOKEN_FILE_VAR)
    raw = e.get(CLIENT_TOKEN_VAR, "").strip()
    if raw:
        _check_token(raw, CLIENT_TOKEN_VAR)
        return raw
    return None
