"""Where the profiler's HTTP targets may go, and which secrets go with them.

A caller never chooses which of the server's secrets is sent where. API credentials are
named objects the operator configures (IDEALRT_OUTBOUND_CONFIG, a TOML file): each has an
id, the namespaces that may use it, the base URLs it may be sent to, and where its key is
(a file, e.g. a mounted Kubernetes Secret key, or an environment variable the operator
names). A profile names a credential by id (`target.credential`); the key is read on the
profiler for each request and sent as `Authorization: Bearer` only to a base URL under one
of the credential's `base_urls`. An unknown id, an id of another namespace and a URL the
credential is not bound to get one and the same answer (PERMISSION_DENIED
CREDENTIAL_NOT_AVAILABLE), so no answer tells which credentials exist.

Hosts: a namespace's HTTP targets may reach only the hosts on its allow-list (`[hosts]`),
and a host must resolve to global addresses only; one listed under `[private_hosts]` may
resolve to loopback, private, link-local (cloud metadata included) or other non-global
addresses. An entry is a host name ("api.openai.com"), a host and port
("10.0.0.7:8000"), a suffix wildcard ("*.example.com": subdomains only), or for IP
literals a network ("127.0.0.0/8"). The address rule is checked when a profile is created
(if the name resolves then) and again at every connection (`check_address`, from the HTTP
target's network backend), so a name that resolves differently later is caught when it
connects. A base URL with userinfo ("user:pw@host") is refused outright: credentials never
travel, or get stored, in a URL.

    [credentials.openai]
    namespaces = ["default"]
    base_urls = ["https://api.openai.com/v1"]
    key_file = "/var/run/secrets/idealrt/openai/api-key"   # or: env = "OPENAI_API_KEY"

    [hosts]
    default = ["api.openai.com"]

    [private_hosts]
    default = ["127.0.0.1:8000"]

Without a file there are no credentials and no hosts: a standalone profiler refuses HTTP
targets until its operator says where they may go. The embedded suite (`idealrt up`, on
loopback) uses `OutboundPolicy.loopback()`: loopback hosts, no credentials.

Not modelled: a proxy from the environment (HttpOptions.trust_env) resolves the name
itself, so the address rule then applies to the proxy's address, not the API's; the host
allow-list still applies. The namespace checked is the profile's (Profile.namespace).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import structlog

from idealrt.core.domain import DEFAULT_NAMESPACE
from idealrt.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied, invalid
from idealrt.services.profiler.reasons import (
    BASE_URL_INVALID,
    BASE_URL_USERINFO,
    CREDENTIAL_NOT_AVAILABLE,
    CREDENTIAL_UNREADABLE,
    OUTBOUND_ADDRESS_NOT_ALLOWED,
    OUTBOUND_HOST_NOT_ALLOWED,
)

__all__ = ["DEFAULT_NAMESPACE", "Credential", "OutboundPolicy", "parse_base_url"]

log = structlog.get_logger(__name__)

_URL_FIELD = "profile.target.base_url"
_CREDENTIAL_FIELD = "profile.target.credential"

Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (getaddrinfo, TCP)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def parse_base_url(base_url: str) -> httpx.URL:
    """The base URL, refused (INVALID_ARGUMENT, field profile.target.base_url) when it is
    not http(s) with a host, or carries userinfo (never echoed)."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise invalid(
            _URL_FIELD, BASE_URL_INVALID, "base_url is not a URL (e.g. http://127.0.0.1:8000/v1)"
        ) from None
    if url.userinfo:
        raise invalid(
            _URL_FIELD,
            BASE_URL_USERINFO,
            "base_url must not carry credentials (user:password@host); name a credential "
            "configured on the profiler (target.credential) instead",
        )
    if url.scheme not in ("http", "https") or not url.host:
        raise invalid(
            _URL_FIELD,
            BASE_URL_INVALID,
            "base_url must be http:// or https:// with a host (e.g. http://127.0.0.1:8000/v1)",
        )
    return url


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclasses.dataclass(frozen=True)
class _HostPattern:
    """One allow-list entry (see the module docstring)."""

    text: str

    def matches(self, host: str, port: int) -> bool:
        entry = self.text.lower()
        host = host.lower().strip("[]")
        try:
            net = ipaddress.ip_network(entry, strict=False) if "/" in entry else None
        except ValueError:
            net = None
        if net is not None:
            ip = _ip(host)
            return ip is not None and ip in net
        name, want_port = entry, None
        if entry.startswith("["):  # [v6]:port
            name, _, rest = entry[1:].partition("]")
            want_port = int(rest[1:]) if rest.startswith(":") else None
        elif entry.count(":") == 1:
            name, _, p = entry.partition(":")
            want_port = int(p)
        if want_port is not None and want_port != port:
            return False
        if name.startswith("*."):
            return host.endswith(name[1:]) and host != name[2:]
        ip_entry, ip_host = _ip(name), _ip(host)
        if ip_entry is not None and ip_host is not None:
            return ip_entry == ip_host
        return host == name


@dataclasses.dataclass(frozen=True)
class Credential:
    """A named API credential: who may use it, where it may be sent, where its key is."""

    id: str
    namespaces: frozenset[str]
    base_urls: tuple[str, ...]
    key_file: Path | None = None
    env: str = ""

    def covers(self, url: httpx.URL) -> bool:
        """Whether `url` is under one of the credential's base URLs (same scheme, host and
        port, and a path that continues the configured one at a segment boundary)."""
        for base in self.base_urls:
            b = httpx.URL(base)
            if (b.scheme, (b.host or "").lower(), _port(b)) != (
                url.scheme,
                (url.host or "").lower(),
                _port(url),
            ):
                continue
            prefix = b.path.rstrip("/")
            path = url.path.rstrip("/")
            if path == prefix or path.startswith(prefix + "/"):
                return True
        return False

    def read(self) -> str:
        """The key (read now, so a rotated Secret takes effect); FAILED_PRECONDITION
        CREDENTIAL_UNREADABLE naming only the credential, with the cause in the log."""
        try:
            if self.key_file is not None:
                key = self.key_file.read_text().strip()
            else:
                key = os.environ.get(self.env, "")
        except OSError as exc:
            log.error("credential_unreadable", credential=self.id, error=str(exc))
            key = ""
        if not key:
            log.error("credential_empty", credential=self.id)
            raise FailedPrecondition(
                CREDENTIAL_UNREADABLE,
                f"credential {self.id!r} could not be read on the profiler (its operator's "
                "log says why)",
                field=_CREDENTIAL_FIELD,
            )
        return key


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _namespace_lists(table: Any, where: str) -> dict[str, tuple[str, ...]]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ValueError(f"[{where}] must be a table of namespace = [entries]")
    out = {ns: _strings(v, f"{where}.{ns}") for ns, v in table.items()}
    for ns, entries in out.items():
        for e in entries:
            _check_entry(e, f"{where}.{ns}")
    return out


def _check_entry(entry: str, where: str) -> None:
    try:
        _HostPattern(entry).matches("example.com", 443)
    except ValueError:
        raise ValueError(
            f"{where}: {entry!r} is not a host, host:port, *.suffix or network"
        ) from None


@dataclasses.dataclass(frozen=True)
class OutboundPolicy:
    """The credentials and the per-namespace host allow-lists; `resolve` is the name
    lookup (tests replace it)."""

    credentials: Mapping[str, Credential] = dataclasses.field(default_factory=dict)
    hosts: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    private_hosts: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    resolve: Resolver = _resolve

    # ------------------------------------------------------------ building one

    @classmethod
    def loopback(cls) -> OutboundPolicy:
        """The embedded suite's: loopback hosts of the default namespace, no credentials."""
        return cls(private_hosts={DEFAULT_NAMESPACE: ("localhost", "127.0.0.0/8", "::1/128")})

    @classmethod
    def load(cls, path: Path | None) -> OutboundPolicy:
        """From IDEALRT_OUTBOUND_CONFIG (None: nothing allowed). A file that cannot be read
        or parsed is a ValueError naming it: the profiler does not start with half a policy."""
        if path is None:
            return cls()
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"IDEALRT_OUTBOUND_CONFIG {path}: {exc}") from exc
        try:
            return cls.from_toml(text)
        except (tomllib.TOMLDecodeError, ValueError) as exc:
            raise ValueError(f"IDEALRT_OUTBOUND_CONFIG {path}: {exc}") from exc

    @classmethod
    def from_toml(cls, text: str) -> OutboundPolicy:
        doc = tomllib.loads(text)
        unknown = set(doc) - {"credentials", "hosts", "private_hosts"}
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}")
        creds: dict[str, Credential] = {}
        table = doc.get("credentials", {})
        if not isinstance(table, dict):
            raise ValueError("[credentials] must be a table of credentials")
        for cid, c in table.items():
            where = f"credentials.{cid}"
            if not isinstance(c, dict):
                raise ValueError(f"[{where}] must be a table")
            extra = set(c) - {"namespaces", "base_urls", "key_file", "env"}
            if extra:
                raise ValueError(f"[{where}]: unknown keys {sorted(extra)}")
            if ("key_file" in c) == ("env" in c):
                raise ValueError(f"[{where}] needs exactly one of key_file or env")
            base_urls = _strings(c.get("base_urls"), f"{where}.base_urls")
            for b in base_urls:
                try:
                    parse_base_url(b)
                except InvalidArgument:
                    raise ValueError(f"{where}.base_urls: {b!r} is not an http(s) URL") from None
            creds[cid] = Credential(
                id=cid,
                namespaces=frozenset(_strings(c.get("namespaces"), f"{where}.namespaces")),
                base_urls=base_urls,
                key_file=Path(c["key_file"]) if "key_file" in c else None,
                env=str(c.get("env", "")),
            )
        return cls(
            credentials=creds,
            hosts=_namespace_lists(doc.get("hosts"), "hosts"),
            private_hosts=_namespace_lists(doc.get("private_hosts"), "private_hosts"),
        )

    # ------------------------------------------------------------ checks

    def check_url(self, namespace: str, base_url: str) -> httpx.URL:
        """The URL, if `namespace` may reach its host (and the name, when it resolves now,
        has only addresses the host may have); PERMISSION_DENIED otherwise."""
        url = parse_base_url(base_url)
        host, port = url.host, _port(url)
        listed = self._listed(namespace, host, port)
        if listed is None:
            raise PermissionDenied(
                OUTBOUND_HOST_NOT_ALLOWED,
                f"host {host}:{port} is not on the outbound allow-list of namespace "
                f"{namespace!r} (the profiler's IDEALRT_OUTBOUND_CONFIG [hosts] or "
                "[private_hosts])",
                field=_URL_FIELD,
            )
        try:
            addresses = self.resolve(host, port)
        except OSError:
            addresses = []  # not resolvable now: checked again at connect time
        self.check_address(namespace, host, port, addresses)
        return url

    def check_address(self, namespace: str, host: str, port: int, addresses: Iterable[str]) -> None:
        """PERMISSION_DENIED unless every address may be reached for `host`: global ones
        for a [hosts] entry, any for a [private_hosts] one."""
        listed = self._listed(namespace, host, port)
        if listed == "private":
            return
        for a in addresses:
            ip = _ip(a)
            if listed is None or ip is None or not ip.is_global:
                raise PermissionDenied(
                    OUTBOUND_ADDRESS_NOT_ALLOWED,
                    f"{host} resolves to {a}, which is not a global address; only hosts under "
                    f"[private_hosts] of namespace {namespace!r} may reach loopback, private "
                    "or link-local addresses",
                    field=_URL_FIELD,
                )

    def credential(self, namespace: str, credential_id: str, url: httpx.URL) -> Credential:
        """The credential `credential_id` if `namespace` may send it to `url`; one answer
        for every other case (unknown, another namespace's, not bound to this URL)."""
        c = self.credentials.get(credential_id)
        if c is None or namespace not in c.namespaces or not c.covers(url):
            raise PermissionDenied(
                CREDENTIAL_NOT_AVAILABLE,
                f"credential {credential_id!r} is not available to namespace {namespace!r} "
                "for this base_url",
                field=_CREDENTIAL_FIELD,
            )
        return c

    def _listed(self, namespace: str, host: str, port: int) -> str | None:
        if any(_HostPattern(e).matches(host, port) for e in self.private_hosts.get(namespace, ())):
            return "private"
        if any(_HostPattern(e).matches(host, port) for e in self.hosts.get(namespace, ())):
            return "public"
        return None
