"""Connections for one CLI invocation: a deployed suite (addresses from flags or
IDEALRT_* env), or the embedded suite started in this process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from idealrt.clients.metrics import MetricsClient
from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.serving import ServingClient
from idealrt.clients.store import StoreClient
from idealrt.core.auth import CLIENT_TOKEN_FILE_VAR, CLIENT_TOKEN_VAR, audit_to_file
from idealrt.core.auth import client_token as _client_token
from idealrt.core.grpc_client import Token
from idealrt.core.tls import ENV_VARS, TlsConfig

__all__ = ["Session", "client_tls", "client_token", "open_session"]


@dataclass
class Session:
    profiler: ProfilerClient
    metrics: MetricsClient
    store: StoreClient
    serving: ServingClient | None
    addresses: dict[str, str]
    embedded: bool


def client_tls(ca: str = "", cert: str = "", key: str = "") -> TlsConfig | None:
    """The client side of TLS from --ca/--cert/--key, each defaulting to its IDEALRT_TLS_*
    variable; None when none is set (plaintext)."""
    ca = ca or os.environ.get(ENV_VARS["ca_file"], "")
    cert = cert or os.environ.get(ENV_VARS["client_cert_file"], "")
    key = key or os.environ.get(ENV_VARS["client_key_file"], "")
    if bool(cert) != bool(key):
        raise SystemExit(
            f"give both --cert and --key (or {ENV_VARS['client_cert_file']} and "
            f"{ENV_VARS['client_key_file']}), or neither"
        )
    if not (ca or cert):
        return None
    return TlsConfig(
        ca_file=Path(ca) if ca else None,
        client_cert_file=Path(cert) if cert else None,
        client_key_file=Path(key) if key else None,
    )


def client_token(token_file: str = "") -> Token | None:
    """The bearer token from --token-file, else the file named by IDEALRT_TOKEN_FILE, else
    IDEALRT_TOKEN; None when none is set (no token is sent)."""
    try:
        return _client_token(token_file)
    except ValueError as exc:  # the message names the file or variable, never the token
        raise SystemExit(
            f"error: {exc} (--token-file, {CLIENT_TOKEN_FILE_VAR} or {CLIENT_TOKEN_VAR})"
        ) from None


@contextlib.contextmanager
def open_session(
    *,
    data_dir: Path,
    store_url: str = "",
    profiler: str = "",
    metrics: str = "",
    store: str = "",
    serving_target: str = "",
    tls: TlsConfig | None = None,
    token: Token | None = None,
) -> Iterator[Session]:
    """Clients of a deployed suite (TLS when `tls` has a client side; `token` sent as the
    bearer token of every call), or of the embedded one (plaintext on loopback, no
    authentication: `tls` and `token` do not apply)."""
    profiler = profiler or os.environ.get("IDEALRT_PROFILER", "")
    metrics = metrics or os.environ.get("IDEALRT_METRICS", "")
    store = store or os.environ.get("IDEALRT_STORE", "")
    if profiler and metrics and store:
        try:
            clients = (
                ProfilerClient(profiler, tls=tls, token=token),
                MetricsClient(metrics, tls=tls, token=token),
                StoreClient(store, tls=tls, token=token),
            )
        except ValueError as exc:  # an unreadable or invalid --ca/--cert/--key
            raise SystemExit(f"error: {exc}") from None
        try:
            yield Session(
                *clients,
                serving=None,
                embedded=False,
                addresses={"profiler": profiler, "metrics": metrics, "store": store},
            )
        finally:
            for c in clients:
                c.close()
        return
    if profiler or metrics or store:
        raise SystemExit("give all of --profiler, --metrics and --store (or none: embedded)")
    from idealrt.services.suite import start_suite

    # the embedded suite's audit trail goes under its data dir, not to the user's terminal
    with (
        audit_to_file(data_dir / "audit.log"),
        start_suite(data_dir=data_dir, store_url=store_url, serving_target=serving_target) as suite,
    ):
        pc, mc, sc = (
            ProfilerClient(suite.profiler),
            MetricsClient(suite.metrics),
            StoreClient(suite.store),
        )
        sv = ServingClient(suite.serving)
        try:
            yield Session(pc, mc, sc, sv, addresses=suite.addresses(), embedded=True)
        finally:
            for closer in (pc.close, mc.close, sc.close, sv.close):
                closer()
