"""Transport security over real TLS: real gRPC servers (the services' own `build_server`)
on 127.0.0.1 port 0, real TLS handshakes, and X.509 certificates and CAs generated here
with the `cryptography` package (EC P-256, so each is made in milliseconds).

Nothing is mocked: a refused connection is a real handshake failing, seen by the client as
UNAVAILABLE (`idealrt.core.errors.Unavailable`, the mirrored error of the real RPC);
rotation rewrites the real files the server was started with.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import structlog.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from idealrt.clients.cli import main as cli_main
from idealrt.clients.profiler import ProfilerClient
from idealrt.clients.store import StoreClient
from idealrt.core.config import MetricsConfig, ProfilerConfig, StoreConfig
from idealrt.core.errors import Unavailable
from idealrt.core.grpc_server import GrpcServer, is_loopback
from idealrt.core.tls import TlsConfig, channel_credentials, server_credentials
from idealrt.services.metrics.server import build_server as build_metrics
from idealrt.services.profiler.server import build_server as build_profiler
from idealrt.services.store.server import build_server as build_store
from idealrt.store.v1 import store_service_pb2 as stpb
from idealrt.store.v1 import store_service_pb2_grpc as stpbg
from tests._pki import Ca, make_ca

pytestmark = pytest.mark.timeout(120)

NOW = dt.datetime.now(dt.UTC)
TIMEOUT_S = 5.0  # per client call: bounds grpc's retries of a refused handshake


# ------------------------------------------------------------------ certificates


@pytest.fixture
def pki(tmp_path: Path) -> Callable[[str], Ca]:
    return lambda name: make_ca(tmp_path, name)


@pytest.fixture
def servers() -> Iterator[list[GrpcServer]]:
    started: list[GrpcServer] = []
    yield started
    for s in reversed(started):
        s.stop(0)


def start_store(tmp_path: Path, servers: list[GrpcServer], tls: TlsConfig) -> str:
    server, port = build_store(
        StoreConfig(address="127.0.0.1:0", data_dir=tmp_path / "store", tls=tls)
    )
    servers.append(server)
    return f"127.0.0.1:{port}"


def list_profiles(target: str, tls: TlsConfig | None) -> list[object]:
    """One real ListProfiles RPC on a fresh channel (so a fresh TLS handshake)."""
    client = StoreClient(target, timeout=TIMEOUT_S, tls=tls)
    try:
        profiles, _ = client.list_profiles()
        return list(profiles)
    finally:
        client.close()


def refused(target: str, tls: TlsConfig | None) -> bool:
    try:
        list_profiles(target, tls)
    except Unavailable:
        return True
    return False


# ------------------------------------------------------------------ server TLS


def test_client_trusting_the_servers_ca_talks_tls(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: a TLS store server and a client verifying it against the right CA; a
    plaintext client gets nowhere with the TLS port."""
    ca = pki("ca")
    crt, key = ca.issue(tmp_path, "store")
    target = start_store(tmp_path, servers, TlsConfig(cert_file=crt, key_file=key))
    assert list_profiles(target, TlsConfig(ca_file=ca.path)) == []
    assert refused(target, None)


def test_client_trusting_another_ca_is_refused(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: the server's certificate is from CA "ca"; the client trusts only "other"."""
    ca, other = pki("ca"), pki("other")
    crt, key = ca.issue(tmp_path, "store")
    target = start_store(tmp_path, servers, TlsConfig(cert_file=crt, key_file=key))
    assert refused(target, TlsConfig(ca_file=other.path))


def test_expired_server_certificate_is_refused(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: a server certificate whose validity ended yesterday, from a CA the client
    trusts: the client's handshake rejects it."""
    ca = pki("ca")
    crt, key = ca.issue(tmp_path, "store", not_after=NOW - dt.timedelta(days=1))
    target = start_store(tmp_path, servers, TlsConfig(cert_file=crt, key_file=key))
    assert refused(target, TlsConfig(ca_file=ca.path))


# ------------------------------------------------------------------ mTLS


def test_mtls_requires_a_client_certificate_from_the_client_ca(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: a store with client_ca_file set (mTLS). No client certificate: refused; one
    from the client CA: served; one from another CA: refused."""
    server_ca, client_ca, other = pki("server-ca"), pki("client-ca"), pki("other")
    crt, key = server_ca.issue(tmp_path, "store")
    target = start_store(
        tmp_path,
        servers,
        TlsConfig(cert_file=crt, key_file=key, client_ca_file=client_ca.path),
    )
    good_crt, good_key = client_ca.issue(tmp_path, "good-client", client=True)
    bad_crt, bad_key = other.issue(tmp_path, "bad-client", client=True)

    assert refused(target, TlsConfig(ca_file=server_ca.path))
    assert (
        list_profiles(
            target,
            TlsConfig(ca_file=server_ca.path, client_cert_file=good_crt, client_key_file=good_key),
        )
        == []
    )
    assert refused(
        target,
        TlsConfig(ca_file=server_ca.path, client_cert_file=bad_crt, client_key_file=bad_key),
    )


def test_profiler_and_metrics_reach_an_mtls_store_with_their_client_certificates(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: the suite's own services over mTLS, as deployed (one CA, one certificate per
    pod used both to serve and to call). A TLS profiler built by its `build_server` reaches
    the mTLS store with its client certificate (ListProfiles goes profiler -> store; the
    store refuses any caller without one, see the test above), a metrics server is built
    the same way, and the CLI lists profiles over TLS with --ca/--cert/--key (without
    --cert: refused, exit 2)."""
    ca = pki("suite-ca")
    store_crt, store_key = ca.issue(tmp_path, "store")
    store = start_store(
        tmp_path,
        servers,
        TlsConfig(cert_file=store_crt, key_file=store_key, client_ca_file=ca.path),
    )
    svc_crt, svc_key = _dual_use(ca, tmp_path, "service")
    full = TlsConfig(
        cert_file=svc_crt,
        key_file=svc_key,
        client_ca_file=ca.path,
        ca_file=ca.path,
        client_cert_file=svc_crt,
        client_key_file=svc_key,
    )
    profiler, p_port = build_profiler(
        ProfilerConfig(
            address="127.0.0.1:0",
            store_target=store,
            data_dir=tmp_path / "profiler",
            resume=False,
            tls=full,
        )
    )
    servers.append(profiler)
    metrics, m_port = build_metrics(
        MetricsConfig(address="127.0.0.1:0", store_target=store, tls=full)
    )
    servers.append(metrics)
    client_side = TlsConfig(ca_file=ca.path, client_cert_file=svc_crt, client_key_file=svc_key)
    pc = ProfilerClient(f"127.0.0.1:{p_port}", timeout=TIMEOUT_S, tls=client_side)
    try:
        assert pc.list_profiles() == ([], "")
    finally:
        pc.close()

    args = ["profiles", "--json", "--store", store, "--profiler", f"127.0.0.1:{p_port}"]
    args += ["--metrics", f"127.0.0.1:{m_port}", "--ca", str(ca.path)]
    assert cli_main([*args, "--cert", str(svc_crt), "--key", str(svc_key)]) == 0
    # the CLI's client certificate is required by the profiler (mTLS): without it, exit 2
    assert cli_main(args) == 2


def _dual_use(ca: Ca, dest: Path, name: str) -> tuple[Path, Path]:
    """A certificate good for serving and for calling (SANs and both key usages), as one
    cert-manager Certificate per service gives with usages [server auth, client auth]."""
    crt, key_path = ca.issue(dest, name)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    both = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    crt.write_bytes(both.public_bytes(serialization.Encoding.PEM))
    return crt, key_path


# ------------------------------------------------------------------ rotation


def _replace(src: Path, dest: Path) -> None:
    """Swap dest for src atomically (as a Secret volume's symlink swap does) and give it a
    newer mtime: a filesystem with coarse timestamps could otherwise keep the old one."""
    old = dest.stat().st_mtime_ns
    os.replace(src, dest)
    os.utime(dest, ns=(old + 10**9, old + 10**9))


def _poll(check: Callable[[], bool], attempts: int = 20) -> bool:
    """Bounded retries of a check that opens a fresh connection each time (no sleeps:
    each refused attempt already waits out grpc's reconnect backoff)."""
    return any(check() for _ in range(attempts))


def test_rotated_certificate_is_served_to_new_connections_without_restart(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: a running TLS store whose certificate and key files are replaced on disk by
    ones from a new CA. A new connection trusting the new CA is served, one trusting only
    the old CA is refused, with the same server process and port throughout. A broken new
    certificate file afterwards keeps the current certificate in service and logs
    `tls_reload_failed` once."""
    old_ca, new_ca = pki("old-ca"), pki("new-ca")
    live = tmp_path / "live"
    live.mkdir()
    crt, key = old_ca.issue(live, "tls")
    target = start_store(tmp_path, servers, TlsConfig(cert_file=crt, key_file=key))
    assert list_profiles(target, TlsConfig(ca_file=old_ca.path)) == []

    staged = tmp_path / "staged"
    staged.mkdir()
    new_crt, new_key = new_ca.issue(staged, "tls")
    _replace(new_key, key)
    _replace(new_crt, crt)

    def new_served() -> bool:
        try:
            return list_profiles(target, TlsConfig(ca_file=new_ca.path)) == []
        except Unavailable:
            return False

    assert _poll(new_served)
    assert refused(target, TlsConfig(ca_file=old_ca.path))

    # a broken write: the server keeps the new (valid) certificate
    garbage = staged / "garbage.crt"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    with structlog.testing.capture_logs() as logs:
        _replace(garbage, crt)
        assert list_profiles(target, TlsConfig(ca_file=new_ca.path)) == []
        assert list_profiles(target, TlsConfig(ca_file=new_ca.path)) == []
    # logged once per change of the files, not at every connection
    assert [e["log_level"] for e in logs if e["event"] == "tls_reload_failed"] == ["error"]


def test_a_long_lived_client_follows_its_rotated_client_certificate(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: one StoreClient (one channel object, as a running profiler holds) to an mTLS
    store. Its client certificate and key files are replaced on disk by ones a new client
    CA issued, and the store is restarted on the same port trusting only that new CA (so
    the client must make a new connection, a new handshake). The same client object goes
    on working: its next calls use a channel made from the new files. With the channel
    made once (grpc's own), the reconnect presents the old certificate and is refused."""
    server_ca, old_clients, new_clients = pki("server-ca"), pki("old-clients"), pki("new-clients")
    crt, key = server_ca.issue(tmp_path, "store")
    port = _free_port()

    def store(client_ca: Path) -> GrpcServer:
        server, _ = build_store(
            StoreConfig(
                address=f"127.0.0.1:{port}",
                data_dir=tmp_path / "store",
                tls=TlsConfig(cert_file=crt, key_file=key, client_ca_file=client_ca),
            )
        )
        servers.append(server)
        return server

    first = store(old_clients.path)
    live = tmp_path / "live"
    live.mkdir()
    my_crt, my_key = old_clients.issue(live, "me", client=True)
    target = f"127.0.0.1:{port}"
    client = StoreClient(
        target,
        timeout=TIMEOUT_S,
        tls=TlsConfig(ca_file=server_ca.path, client_cert_file=my_crt, client_key_file=my_key),
    )
    try:
        assert client.list_profiles()[0] == []
        staged = tmp_path / "staged"
        staged.mkdir()
        new_crt, new_key = new_clients.issue(staged, "me", client=True)
        _replace(new_key, my_key)
        _replace(new_crt, my_crt)
        first.stop(0)
        store(new_clients.path)  # trusts only the new client CA

        def served() -> bool:
            try:
                return client.list_profiles()[0] == []
            except Unavailable:
                return False

        assert _poll(served)
    finally:
        client.close()


# ------------------------------------------------------------------ health port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_health_port_answers_probes_in_plaintext_and_nothing_else(
    tmp_path: Path, pki: Callable[[str], Ca], servers: list[GrpcServer]
) -> None:
    """Real: a TLS store with health_port (for kubelet gRPC probes, which cannot speak TLS):
    grpc.health.v1 answers SERVING in plaintext there, the store's own RPCs are not served
    on it (UNIMPLEMENTED), and a stop turns health to NOT_SERVING before the port closes."""
    ca = pki("ca")
    crt, key = ca.issue(tmp_path, "store")
    health_port = _free_port()
    start_store(tmp_path, servers, TlsConfig(cert_file=crt, key_file=key, health_port=health_port))
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        assert (
            check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.RpcError) as err:
            stpbg.StoreServiceStub(ch).ListProfiles(stpb.ListProfilesRequest(), timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------ refusing plaintext


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:0", True),
        ("127.8.9.10:50051", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("unix:/tmp/idealrt.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.7:50051", False),
        ("idealrt-store:50051", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    """Pure function: which listen addresses count as loopback."""
    assert is_loopback(address) is loopback


def test_plaintext_on_a_public_address_refuses_to_start_unless_insecure(
    tmp_path: Path, servers: list[GrpcServer]
) -> None:
    """Real: the store's build_server on 0.0.0.0:0 without TLS raises before binding,
    naming the address and the settings that fix it; with allow_insecure (IDEALRT_INSECURE=1,
    read by StoreConfig.from_env) it starts and serves."""
    cfg = StoreConfig.from_env(
        {"IDEALRT_STORE_ADDRESS": "0.0.0.0:0", "IDEALRT_DATA_DIR": str(tmp_path)}
    )
    assert cfg.allow_insecure is False
    with pytest.raises(ValueError) as err:
        build_store(cfg)
    for name in ("0.0.0.0:0", "IDEALRT_TLS_CERT", "IDEALRT_TLS_KEY", "IDEALRT_INSECURE=1"):
        assert name in str(err.value)

    cfg = StoreConfig.from_env(
        {
            "IDEALRT_STORE_ADDRESS": "0.0.0.0:0",
            "IDEALRT_DATA_DIR": str(tmp_path),
            "IDEALRT_INSECURE": "1",
        }
    )
    assert cfg.allow_insecure is True
    server, port = build_store(cfg)
    servers.append(server)
    assert list_profiles(f"127.0.0.1:{port}", None) == []


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"IDEALRT_TLS_CERT": "/c.pem"}, ("IDEALRT_TLS_CERT", "IDEALRT_TLS_KEY")),
        ({"IDEALRT_TLS_KEY": "/k.pem"}, ("IDEALRT_TLS_KEY", "IDEALRT_TLS_CERT")),
        ({"IDEALRT_TLS_CLIENT_CERT": "/c.pem"}, ("IDEALRT_TLS_CLIENT_KEY",)),
        ({"IDEALRT_TLS_CLIENT_KEY": "/k.pem"}, ("IDEALRT_TLS_CLIENT_CERT",)),
        ({"IDEALRT_TLS_CLIENT_CA": "/ca.pem"}, ("IDEALRT_TLS_CLIENT_CA", "IDEALRT_TLS_CERT")),
        ({"IDEALRT_HEALTH_PORT": "x"}, ("IDEALRT_HEALTH_PORT",)),
    ],
)
def test_half_configured_tls_is_a_clear_error(env: dict[str, str], names: tuple[str, ...]) -> None:
    """Pure config: every service's from_env rejects an incomplete TLS setting, naming
    the variables involved."""
    for cfg_cls in (StoreConfig, ProfilerConfig, MetricsConfig):
        with pytest.raises(ValueError) as err:
            cfg_cls.from_env(env)
        for name in names:
            assert name in str(err.value)


def test_unreadable_or_invalid_files_are_clear_errors(
    tmp_path: Path, pki: Callable[[str], Ca]
) -> None:
    """Real files: a missing certificate, a key that does not belong to the certificate
    and a CA file that holds no certificate each fail at once, naming the variable."""
    ca = pki("ca")
    crt, key = ca.issue(tmp_path, "a")
    _, other_key = ca.issue(tmp_path, "b")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    cases: list[tuple[Callable[[], object], str]] = [
        (
            lambda: server_credentials(TlsConfig(cert_file=tmp_path / "nope", key_file=key)),
            "IDEALRT_TLS_CERT",
        ),
        (
            lambda: server_credentials(TlsConfig(cert_file=crt, key_file=other_key)),
            "IDEALRT_TLS_KEY",
        ),
        (
            lambda: server_credentials(TlsConfig(cert_file=crt, key_file=key, client_ca_file=junk)),
            "IDEALRT_TLS_CLIENT_CA",
        ),
        (lambda: channel_credentials(TlsConfig(ca_file=junk)), "IDEALRT_TLS_CA"),
        (
            lambda: channel_credentials(
                TlsConfig(client_cert_file=crt, client_key_file=tmp_path / "nope")
            ),
            "IDEALRT_TLS_CLIENT_KEY",
        ),
    ]
    for make, name in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert name in str(err.value)


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    """Pure config: the IDEALRT_TLS_* variables land in the matching fields; none set is
    plaintext on both sides."""
    env = {
        "IDEALRT_TLS_CERT": "/tls/tls.crt",
        "IDEALRT_TLS_KEY": "/tls/tls.key",
        "IDEALRT_TLS_CLIENT_CA": "/tls/ca.crt",
        "IDEALRT_TLS_CA": "/tls/ca.crt",
        "IDEALRT_TLS_CLIENT_CERT": "/tls/tls.crt",
        "IDEALRT_TLS_CLIENT_KEY": "/tls/tls.key",
        "IDEALRT_HEALTH_PORT": "8081",
    }
    cfg = TlsConfig.from_env(env)
    assert cfg == TlsConfig(
        cert_file=Path("/tls/tls.crt"),
        key_file=Path("/tls/tls.key"),
        client_ca_file=Path("/tls/ca.crt"),
        ca_file=Path("/tls/ca.crt"),
        client_cert_file=Path("/tls/tls.crt"),
        client_key_file=Path("/tls/tls.key"),
        health_port=8081,
    )
    assert cfg.server_tls and cfg.mtls and cfg.client_tls
    assert ProfilerConfig.from_env(env).tls == cfg
    plain = TlsConfig.from_env({})
    assert not (plain.server_tls or plain.mtls or plain.client_tls)
    assert StoreConfig().tls == plain and StoreConfig().allow_insecure is False
