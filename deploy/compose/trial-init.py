"""One-shot setup of the Compose trial, run by the `trial-init` service as uid 10001.

Writes into the `trial` volume (mounted at the path given as the only argument), once:

    pki/ca.crt, pki/server.{crt,key}           a throwaway CA and the daemon's certificate
                                                (names: localhost, 127.0.0.1, ::1)
    pki/clients/{enroller,gateway,admin,probe}.{crt,key}
                                                client certificates (probe: the health check)
    pgpass                                      libpq password file for the daemon (0600)
    postgres/password                           the same password for the postgres image (0444)

It uses `faceseald init --dev`'s code for the PKI, then removes what the trial does not use: the
dev seal key (the trial seals with OpenBao Transit), the dev config and policy (the trial has its
own), and the CA's private key (no container needs it; a fresh volume makes a fresh CA).
Not for production: see docs/operator-guide.md for certificates and secrets.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from faceseal.server import pki
from faceseal.server.devinit import init_dev

TRUST_DOMAIN = "spiffe://faceseal.dev"


def write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    path.chmod(mode)


def main(root: Path) -> int:
    done = root / ".complete"
    if done.exists():
        print(f"trial setup already in {root}; remove the volume (docker compose down -v) for a new one")
        return 0
    pki_dir = root / "pki"
    init_dev(pki_dir, force=True, listen="0.0.0.0:50051")
    for unused in ("seal.key", "faceseal.toml", "policy.toml"):
        (pki_dir / unused).unlink()
    (pki_dir / "data").rmdir()

    ca_key = pki_dir / "ca.key"
    ca = pki.Issued(
        cert=x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes()),
        key=serialization.load_pem_private_key(ca_key.read_bytes(), password=None),  # type: ignore[arg-type]
    )
    probe_cert, probe_key = pki_dir / "clients" / "probe.crt", pki_dir / "clients" / "probe.key"
    for left_over in (probe_cert, probe_key):  # from an earlier run that stopped half-way
        left_over.unlink(missing_ok=True)
    pki.issue_client(ca, "probe", spiffe_id=f"{TRUST_DOMAIN}/probe").write(probe_cert, probe_key)
    ca_key.unlink()

    password = secrets.token_urlsafe(24)
    write(root / "pgpass", f"postgres:5432:faceseal:faceseal:{password}\n", 0o600)
    (root / "postgres").mkdir(mode=0o755, exist_ok=True)
    (root / "postgres").chmod(0o755)
    write(root / "postgres" / "password", password + "\n", 0o444)
    # Others may pass through the volume's root to postgres/ (the postgres image runs as its own
    # uid), but not list it; pki/ and the secret files stay the daemon's own.
    root.chmod(0o711)
    done.touch()
    print(f"trial setup written to {root}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: trial-init.py DIRECTORY")
    sys.exit(main(Path(sys.argv[1])))
