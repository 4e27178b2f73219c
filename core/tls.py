"""Transport security: TLS on every server, mTLS between the suite's own services.

`TlsConfig` names PEM files (from IDEALRT_TLS_* in `from_env`); `server_credentials` turns
its server side into grpc credentials that reload the certificate, key and client CA when
their files change (cert-manager rotates them in place: no restart), and
`channel_credentials` its client side into a channel's credentials.

Server side: `cert_file` + `key_file` switch TLS on; `client_ca_file` additionally
requires every client to present a certificate that chains to that CA (mTLS). Client side
(a CLI, a library user, or a service calling another): `ca_file` is the CA the server's
certificate must chain to (unset: the system roots), `client_cert_file` +
`client_key_file` the certificate presented to an mTLS server.

Rotation: grpc asks the fetcher of `dynamic_ssl_server_credentials` for a configuration
at every new connection; `_Reloader` answers "unchanged" unless a file's (mtime, size)
moved, and then loads and checks the new files (PEM parses, key matches certificate, via
the stdlib `ssl`). A broken or half-written new set keeps the old configuration and logs
`tls_reload_failed` once per change, so connections never fail because of a bad write.
Established connections keep the certificate they were made with; client credentials
are read once, when a channel is opened.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import grpc
import structlog

__all__ = [
    "ENV_VARS",
    "INSECURE_VAR",
    "TlsConfig",
    "channel_credentials",
    "insecure_from_env",
    "server_credentials",
]

log = structlog.get_logger("idealrt.tls")

# field -> the environment variable `from_env` reads it from (and errors name)
ENV_VARS: dict[str, str] = {
    "cert_file": "IDEALRT_TLS_CERT",
    "key_file": "IDEALRT_TLS_KEY",
    "client_ca_file": "IDEALRT_TLS_CLIENT_CA",
    "ca_file": "IDEALRT_TLS_CA",
    "client_cert_file": "IDEALRT_TLS_CLIENT_CERT",
    "client_key_file": "IDEALRT_TLS_CLIENT_KEY",
    "health_port": "IDEALRT_HEALTH_PORT",
}
INSECURE_VAR = "IDEALRT_INSECURE"


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """PEM files of both sides of a connection; every field unset: plaintext.

    `health_port` > 0 adds a plaintext listener that serves only grpc.health.v1 (no data,
    no other service): Kubernetes' built-in gRPC probes cannot speak TLS."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    health_port: int = 0

    def __post_init__(self) -> None:
        _pair(self.cert_file, "cert_file", self.key_file, "key_file")
        _pair(self.client_cert_file, "client_cert_file", self.client_key_file, "client_key_file")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError(
                f"{ENV_VARS['client_ca_file']} (mTLS) needs TLS: set "
                f"{ENV_VARS['cert_file']} and {ENV_VARS['key_file']} too"
            )
        if not 0 <= self.health_port <= 65535:
            raise ValueError(f"{ENV_VARS['health_port']} must be 0-65535, got {self.health_port}")

    @property
    def server_tls(self) -> bool:
        """Whether a server with this config listens with TLS."""
        return self.cert_file is not None

    @property
    def mtls(self) -> bool:
        """Whether a server with this config requires client certificates."""
        return self.client_ca_file is not None

    @property
    def client_tls(self) -> bool:
        """Whether a channel opened with this config is secure."""
        return self.ca_file is not None or self.client_cert_file is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsConfig:
        e = os.environ if env is None else env

        def path(field: str) -> Path | None:
            raw = e.get(ENV_VARS[field], "")
            return Path(raw) if raw else None

        raw_port = e.get(ENV_VARS["health_port"], "") or "0"
        try:
            health_port = int(raw_port)
        except ValueError:
            raise ValueError(
                f"{ENV_VARS['health_port']} must be an integer, got {raw_port!r}"
            ) from None
        return cls(
            cert_file=path("cert_file"),
            key_file=path("key_file"),
            client_ca_file=path("client_ca_file"),
            ca_file=path("ca_file"),
            client_cert_file=path("client_cert_file"),
            client_key_file=path("client_key_file"),
            health_port=health_port,
        )


def insecure_from_env(env: Mapping[str, str] | None = None) -> bool:
    """IDEALRT_INSECURE=1: plaintext is allowed on non-loopback addresses."""
    e = os.environ if env is None else env
    return e.get(INSECURE_VAR, "") == "1"


def _pair(a: Path | None, a_name: str, b: Path | None, b_name: str) -> None:
    if (a is None) != (b is None):
        given, missing = (a_name, b_name) if a is not None else (b_name, a_name)
        raise ValueError(
            f"{ENV_VARS[given]} is set but {ENV_VARS[missing]} is not: "
            "a certificate and its private key go together"
        )


def _read(path: Path, field: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{ENV_VARS[field]}: cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ValueError(f"{ENV_VARS[field]}: {path} is empty")
    return data


def _check_pair(cert: Path, cert_field: str, key: Path, key_field: str) -> None:
    """The certificate chain and key parse as PEM and belong together."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"{ENV_VARS[cert_field]}/{ENV_VARS[key_field]}: {cert} and {key} are not a "
            f"PEM certificate chain and its private key ({exc})"
        ) from None


def _check_ca(data: bytes, path: Path, field: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode())
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{ENV_VARS[field]}: {path} holds no PEM CA certificate ({exc})") from None


# ------------------------------------------------------------------ server


_Stamp = tuple[tuple[int, int], ...]


class _Reloader:
    """The certificate-configuration fetcher: a new configuration when the files changed
    and the new ones are valid, else None (grpc keeps the current one)."""

    def __init__(self, cfg: TlsConfig) -> None:
        assert cfg.cert_file is not None and cfg.key_file is not None
        self._files: list[tuple[Path, str]] = [
            (cfg.cert_file, "cert_file"),
            (cfg.key_file, "key_file"),
        ]
        if cfg.client_ca_file is not None:
            self._files.append((cfg.client_ca_file, "client_ca_file"))
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._load()

    def _stat(self) -> _Stamp:
        """(mtime, size) per file; (-1, -1) for one that is missing (loading it then
        fails with the error naming its variable)."""
        out = []
        for path, _ in self._files:
            try:
                st = path.stat()
            except OSError:
                out.append((-1, -1))
            else:
                out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        (cert, _), (key, _) = self._files[:2]
        cert_pem, key_pem = _read(cert, "cert_file"), _read(key, "key_file")
        _check_pair(cert, "cert_file", key, "key_file")
        ca_pem = None
        if len(self._files) > 2:
            ca, _ = self._files[2]
            ca_pem = _read(ca, "client_ca_file")
            _check_ca(ca_pem, ca, "client_ca_file")
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], ca_pem)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        # called by grpc at every new connection: one stat per file when nothing changed
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                new = self._load()
                if self._stat() != stamp:  # still being written: look again next time
                    return None
            except ValueError as exc:
                log.error("tls_reload_failed", error=str(exc), kept="previous certificate")
                self._stamp = self._stat()  # logged once per change, not per connection
                return None
            except Exception:  # a grpc callback's top: never let it take the handshake
                log.exception("tls_reload_failed", kept="previous certificate")
                return None
            self._stamp = stamp
            log.info("tls_reloaded", cert_file=str(self._files[0][0]))
            return new


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials of a server (cfg.cert_file/key_file; client certificates required
    when cfg.client_ca_file is set) that follow the files as they change. ValueError
    naming the variable when a file is missing or not valid PEM."""
    if not cfg.server_tls:
        raise ValueError(f"no server certificate: set {ENV_VARS['cert_file']}")
    reloader = _Reloader(cfg)
    # grpc's fetcher returns None for "unchanged"; grpc-stubs types it without the None
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], reloader)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, fetcher, require_client_authentication=cfg.mtls
    )


# ------------------------------------------------------------------ client


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    """Credentials of a secure channel: servers verified against cfg.ca_file (the system
    roots when unset), cfg.client_cert_file/client_key_file presented when set. Read once:
    a channel keeps them for its life."""
    root = None
    if cfg.ca_file is not None:
        root = _read(cfg.ca_file, "ca_file")
        _check_ca(root, cfg.ca_file, "ca_file")
    key = chain = None
    if cfg.client_cert_file is not None and cfg.client_key_file is not None:
        chain = _read(cfg.client_cert_file, "client_cert_file")
        key = _read(cfg.client_key_file, "client_key_file")
        _check_pair(
            cfg.client_cert_file, "client_cert_file", cfg.client_key_file, "client_key_file"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )
