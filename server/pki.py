"""A throwaway certificate authority for development and tests.

faceseal accepts only mutual TLS, so even a laptop run needs a CA, a server certificate and
client certificates. Generating them here, at run time, means no key is ever committed to the
repository and every checkout gets its own. Production deployments bring their own PKI.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Tolerate a little clock skew between the machine that issues and the one that verifies.
_BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key; the key stays out of ``repr`` so logs cannot leak it."""

    cert: x509.Certificate = field(repr=False)
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    def __repr__(self) -> str:
        return f"Issued(subject={self.cert.subject.rfc4514_string()!r})"

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the key first, so a refused key (it already exists) leaves the cert untouched too."""
        write_private_file(key_path, self.key_pem())
        fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # the umask must not make the mode depend on the shell
            f.write(self.cert_pem())


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, from the first instant.

    Writing then chmod-ing would leave a window where the secret is world-readable; O_EXCL also
    refuses to follow a planted symlink or to overwrite a key someone still relies on.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_ca(common_name: str, *, days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def issue_server(ca: Issued, *, dns_names: list[str], ips: list[str], days: int = 825) -> Issued:
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    now = datetime.now(UTC)
    return _issue(
        ca,
        common_name=dns_names[0] if dns_names else "faceseal",
        sans=sans,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=now - _BACKDATE,
        not_after=now + timedelta(days=days),
    )


def issue_client(
    ca: Issued,
    common_name: str,
    *,
    spiffe_id: str | None = None,
    dns_names: list[str] | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """Issue a client certificate; the explicit validity window lets tests build expired ones."""
    sans: list[x509.GeneralName] = []
    if spiffe_id is not None:
        sans.append(x509.UniformResourceIdentifier(spiffe_id))
    sans += [x509.DNSName(n) for n in dns_names or []]
    now = datetime.now(UTC)
    return _issue(
        ca,
        common_name=common_name,
        sans=sans,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=now - _BACKDATE if not_before is None else not_before,
        not_after=now + timedelta(days=825) if not_after is None else not_after,
    )


def _issue(
    ca: Issued,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    not_before: datetime,
    not_after: datetime,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:  # an empty SAN extension is invalid; a CN-only client certificate is allowed
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(cert=builder.sign(ca.key, hashes.SHA256()), key=key)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
