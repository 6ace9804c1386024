"""`faceseald init --dev` must leave a complete, owner-only setup, and never clobber one silently."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from faceseal.server.cli import main
from faceseal.server.devinit import init_dev
from faceseal.server.errors import ConfigError

PRIVATE = {
    "ca.key",
    "server.key",
    "clients/enroller.key",
    "clients/gateway.key",
    "clients/admin.key",
    "seal.key",
}
PUBLIC = {
    "ca.crt",
    "server.crt",
    "clients/enroller.crt",
    "clients/gateway.crt",
    "clients/admin.crt",
    "faceseal.toml",
    "policy.toml",
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    directory = tmp_path / "dev"
    init_dev(directory, listen="127.0.0.1:50999")
    return directory


def test_layout_and_modes(dev: Path) -> None:
    assert set(_snapshot(dev)) == PRIVATE | PUBLIC
    for rel in PRIVATE:
        assert _mode(dev / rel) == 0o600, rel
    for rel in ("", "clients", "data"):
        assert (dev / rel).is_dir()
    assert _mode(dev) == 0o700
    assert _mode(dev / "data") == 0o700
    assert len((dev / "seal.key").read_bytes()) == 32


def test_client_certificates_name_their_role(dev: Path) -> None:
    for role in ("enroller", "gateway", "admin"):
        cert = x509.load_pem_x509_certificate((dev / "clients" / f"{role}.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://faceseal.dev/{role}"]
        assert cert.subject.rfc4514_string() == f"CN={role}"


def test_config_and_policy_parse(dev: Path) -> None:
    config = tomllib.loads((dev / "faceseal.toml").read_text())
    assert config == {
        "mode": "dev",
        "default_gallery": "faces",
        "server": {
            "listen": "127.0.0.1:50999",
            "tls_cert": "server.crt",
            "tls_key": "server.key",
            "client_ca": "ca.crt",
            "policy": "policy.toml",
        },
        "store": {"url": "sqlite:data/faceseal.db"},
        "audit": {"dir": "data/audit"},
        "metrics": {"listen": "127.0.0.1:9464"},
        "seal": {"type": "file", "key_file": "seal.key"},
        "galleries": {"faces": {"dimension": 128, "metric": "euclidean", "threshold": 0.6}},
    }
    policy = tomllib.loads((dev / "policy.toml").read_text())
    assert policy == {
        "callers": [
            {
                "identity": "spiffe://faceseal.dev/enroller",
                "permissions": ["enroll", "delete"],
                "galleries": ["*"],
            },
            {
                "identity": "spiffe://faceseal.dev/gateway",
                "permissions": ["match", "identify"],
                "galleries": ["*"],
                "disclosure": "decision",
            },
            {"identity": "spiffe://faceseal.dev/admin", "permissions": ["admin"], "galleries": ["*"]},
        ]
    }


def test_second_init_refuses_and_changes_nothing(dev: Path) -> None:
    before = _snapshot(dev)
    with pytest.raises(ConfigError, match=r"faceseal\.toml already exists"):
        init_dev(dev)
    assert _snapshot(dev) == before


def test_force_replaces_keys_and_database(dev: Path) -> None:
    before = _snapshot(dev)
    (dev / "data" / "faceseal.db").write_bytes(b"sealed under the old key")
    init_dev(dev, force=True)
    after = _snapshot(dev)
    assert set(after) == PRIVATE | PUBLIC
    assert after["seal.key"] != before["seal.key"]
    assert after["ca.key"] != before["ca.key"]


def test_half_finished_init_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "seal.key").write_bytes(b"x" * 32)
    with pytest.raises(ConfigError, match="--force"):
        init_dev(tmp_path)
    assert _snapshot(tmp_path) == {"seal.key": b"x" * 32}


def test_bad_listen_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        init_dev(tmp_path / "dev", listen='0.0.0.0:1"\nmode = "prod')
    assert not (tmp_path / "dev").exists()


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "dev"
    assert main(["init", "--dev", str(directory)]) == 0
    assert (directory / "faceseal.toml").is_file()
    out = capsys.readouterr().out
    assert str(directory / "faceseal.toml") in out
    assert "PRIVATE" not in out

    assert main(["init", "--dev", str(directory)]) == 2
    assert "faceseald: " in capsys.readouterr().err


def test_cli_init_requires_dev(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["init"])
    assert exc.value.code == 2
