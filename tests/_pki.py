"""Certificates for tests, made with `cryptography`: a CA and leaf certificates it issues
(server certificates for localhost and 127.0.0.1, or client certificates), written as PEM
files. Shared by the TLS, authentication and authorization tests."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from idealrt.core.tls import TlsConfig

__all__ = ["Ca", "make_ca", "server_pki"]

NOW = dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path  # the CA certificate, PEM

    def issue(
        self,
        dest: Path,
        name: str,
        *,
        client: bool = False,
        not_after: dt.datetime | None = None,
    ) -> tuple[Path, Path]:
        """A leaf certificate (server: SANs localhost and 127.0.0.1) written as
        dest/name.crt and dest/name.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        not_before = NOW - dt.timedelta(days=2)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after or NOW + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
        )
        if not client:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        crt, pem_key = dest / f"{name}.crt", dest / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem_key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return crt, pem_key


def make_ca(dest: Path, name: str) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=2))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = dest / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(key, cert, path)


def server_pki(dest: Path) -> tuple[TlsConfig, TlsConfig]:
    """(server side, client side): a CA (dest/ca.crt) and one server certificate for
    localhost / 127.0.0.1 (dest/tls.crt, dest/tls.key) by it."""
    ca = make_ca(dest, "ca")
    crt, key = ca.issue(dest, "tls")
    return TlsConfig(cert_file=crt, key_file=key), TlsConfig(ca_file=ca.path)
