"""``faceseald init --dev``: everything a first run needs, generated fresh on this machine.

The daemon refuses to start without mutual TLS, a policy and a seal, so a newcomer would
otherwise face a page of openssl commands before ``make run`` works.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from faceseal.server import pki
from faceseal.server.errors import ConfigError

_HOST = re.compile(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]")
_CLIENTS = ("enroller", "gateway", "admin")
_TRUST_DOMAIN = "spiffe://faceseal.dev"

# Every file init writes, relative to the directory. faceseal.toml comes last on purpose: its
# presence means a setup is complete, which is what the refusal check and `make run` look at.
_LAYOUT = (
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    *(f"clients/{name}.{ext}" for name in _CLIENTS for ext in ("crt", "key")),
    "seal.key",
    "policy.toml",
    "faceseal.toml",
)

# A file seal key is replaced by --force, so a database sealed under the old one is useless.
_DATABASE = ("data/faceseal.db", "data/faceseal.db-wal", "data/faceseal.db-shm", "data/faceseal.db-journal")

_CONFIG = """\
# faceseal development configuration, written by `faceseald init --dev`. Not for production:
# the file seal keeps the key-encryption key on the same disk as the data.
mode = "dev"
default_gallery = "faces"

[server]
listen = "{listen}"
tls_cert = "server.crt"
tls_key = "server.key"
client_ca = "ca.crt"
policy = "policy.toml"

[store]
url = "sqlite:data/faceseal.db"

[audit]
# One JSON line per call, HMAC-chained; check with: faceseald audit verify --config faceseal.toml
dir = "data/audit"

[metrics]
# Prometheus scrapes http://{metrics_listen}/metrics (loopback only; set tls_cert/tls_key for TLS).
listen = "{metrics_listen}"

[seal]
type = "file"
key_file = "seal.key"

[galleries.faces]
dimension = 128
metric = "euclidean"
threshold = 0.6
"""

_POLICY = """\
# Who may do what. Anything not granted here is denied.
[[callers]]
identity = "spiffe://faceseal.dev/enroller"
permissions = ["enroll", "delete"]
galleries = ["*"]

[[callers]]
identity = "spiffe://faceseal.dev/gateway"
permissions = ["match", "identify"]
galleries = ["*"]
disclosure = "decision"

[[callers]]
identity = "spiffe://faceseal.dev/admin"
permissions = ["admin"]
galleries = ["*"]
"""


def init_dev(directory: Path, *, force: bool = False, listen: str = "127.0.0.1:50051") -> None:
    """Write a dev CA, certificates, seal key, config and policy into ``directory``.

    Without ``force`` nothing existing is touched. With it, the old files are removed first,
    including the database: it was sealed under the old seal key and could never open again.
    """
    _check_listen(listen)
    config = directory / "faceseal.toml"
    if not force:
        if config.exists():
            raise ConfigError(f"{config} already exists; pass --force to replace the whole dev setup")
        for rel in _LAYOUT:
            if (directory / rel).exists():
                raise ConfigError(f"{directory / rel} exists (did an earlier init stop half-way?); pass --force")
    _make_private_dir(directory)
    _make_private_dir(directory / "clients")
    _make_private_dir(directory / "data")
    if force:
        for rel in (*_LAYOUT, *_DATABASE):
            (directory / rel).unlink(missing_ok=True)

    ca = pki.make_ca("faceseal dev CA")
    ca.write(directory / "ca.crt", directory / "ca.key")
    server = pki.issue_server(ca, dns_names=["localhost"], ips=["127.0.0.1", "::1"])
    server.write(directory / "server.crt", directory / "server.key")
    for name in _CLIENTS:
        client = pki.issue_client(ca, name, spiffe_id=f"{_TRUST_DOMAIN}/{name}")
        client.write(directory / "clients" / f"{name}.crt", directory / "clients" / f"{name}.key")
    pki.write_private_file(directory / "seal.key", secrets.token_bytes(32))
    (directory / "policy.toml").write_text(_POLICY, encoding="utf-8")
    # A test asking for any free gRPC port (port 0) gets any free metrics port too.
    metrics_listen = "127.0.0.1:0" if listen.endswith(":0") else "127.0.0.1:9464"
    config_text = _CONFIG.format(listen=listen, metrics_listen=metrics_listen)
    (directory / "faceseal.toml").write_text(config_text, encoding="utf-8")


def _check_listen(listen: str) -> None:
    """Catch a typo here rather than at the daemon's first start, and keep the TOML well formed."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535 or not _HOST.fullmatch(host):
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT")


def _make_private_dir(path: Path) -> None:
    """Create ``path`` as 0700; an existing directory is left as its owner set it."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise ConfigError(f"{path} exists and is not a directory") from None
        return
    path.chmod(0o700)  # mkdir's mode is filtered by the umask
