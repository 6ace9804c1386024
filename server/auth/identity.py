"""A verified peer certificate -> the caller's identity string.

The TLS layer has already verified the chain against our CA; this only decides which name in
the certificate is the identity: the SPIFFE URI SAN if present, else the first DNS SAN, else the
subject CN. That order lets a SPIFFE deployment and a plain-PKI one share the same policy model.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID


def identity_of(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://"):
                return uri
        dns = san.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return value if isinstance(value, str) else value.decode()
    return None


def identity_from_pem(pem: bytes) -> str | None:
    return identity_of(x509.load_pem_x509_certificate(pem))
