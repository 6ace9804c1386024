"""The dev PKI must produce certificates a strict verifier accepts, and keys nobody else can read."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from faceseal.server import pki


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.make_ca("test CA")


def _verify_client(ca: pki.Issued, leaf: pki.Issued, at: datetime | None = None) -> None:
    builder = verification.PolicyBuilder().store(verification.Store([ca.cert]))
    if at is not None:
        builder = builder.time(at)
    builder.build_client_verifier().verify(leaf.cert, [])


def _sans(issued: pki.Issued) -> x509.SubjectAlternativeName:
    return issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_ca_is_a_constrained_signing_ca(ca: pki.Issued) -> None:
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ca.cert.subject == ca.cert.issuer


def test_client_certificate_verifies_against_its_ca(ca: pki.Issued) -> None:
    client = pki.issue_client(ca, "gateway", spiffe_id="spiffe://faceseal.dev/gateway")
    _verify_client(ca, client)
    assert _sans(client).get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://faceseal.dev/gateway"]
    assert client.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gateway"
    eku = client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_client_certificate_from_another_ca_is_rejected(ca: pki.Issued) -> None:
    stranger = pki.issue_client(pki.make_ca("other CA"), "x", spiffe_id="spiffe://faceseal.dev/x")
    with pytest.raises(verification.VerificationError):
        _verify_client(ca, stranger)


def test_client_dns_sans_and_cn_only(ca: pki.Issued) -> None:
    client = pki.issue_client(ca, "svc", dns_names=["a.example", "b.example"])
    assert _sans(client).get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
    bare = pki.issue_client(ca, "bare")
    with pytest.raises(x509.ExtensionNotFound):
        _sans(bare)


def test_expired_and_not_yet_valid_clients_are_rejected(ca: pki.Issued) -> None:
    now = datetime.now(UTC)
    expired = pki.issue_client(
        ca,
        "old",
        spiffe_id="spiffe://t/old",
        not_before=now - timedelta(days=2),
        not_after=now - timedelta(days=1),
    )
    early = pki.issue_client(
        ca,
        "new",
        spiffe_id="spiffe://t/new",
        not_before=now + timedelta(days=1),
        not_after=now + timedelta(days=2),
    )
    assert expired.cert.not_valid_after_utc < now < early.cert.not_valid_before_utc
    for leaf in (expired, early):
        with pytest.raises(verification.VerificationError):
            _verify_client(ca, leaf, at=now)
    assert expired.cert.not_valid_after_utc == (now - timedelta(days=1)).replace(microsecond=0)


def test_server_certificate_sans_and_usage(ca: pki.Issued) -> None:
    server = pki.issue_server(ca, dns_names=["localhost"], ips=["127.0.0.1", "::1"])
    sans = _sans(server)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca.cert]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    verifier.verify(server.cert, [])


def test_write_makes_the_key_owner_only(ca: pki.Issued, tmp_path: Path) -> None:
    client = pki.issue_client(ca, "c", spiffe_id="spiffe://t/c")
    client.write(tmp_path / "c.crt", tmp_path / "c.key")
    assert stat.S_IMODE((tmp_path / "c.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c.crt").stat().st_mode) == 0o644
    assert (tmp_path / "c.key").read_bytes() == client.key_pem()
    assert x509.load_pem_x509_certificate((tmp_path / "c.crt").read_bytes()) == client.cert


def test_write_refuses_to_replace_a_key(ca: pki.Issued, tmp_path: Path) -> None:
    (tmp_path / "c.key").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        ca.write(tmp_path / "c.crt", tmp_path / "c.key")
    assert (tmp_path / "c.key").read_bytes() == b"keep me"
    assert not (tmp_path / "c.crt").exists()


def test_repr_carries_no_key_material(ca: pki.Issued) -> None:
    text = repr(ca) + str(ca)
    assert text == "Issued(subject='CN=test CA')" * 2
    assert b"PRIVATE KEY" in ca.key_pem()
    assert "PRIVATE" not in text
