"""The end-to-end tests on each seal: the dev file seal, PKCS#11 (SoftHSM2) and Transit (OpenBao).

A test module runs on every seal with ``pytestmark = EACH_SEAL``: the ``seal_kind`` fixture
(conftest.py, "file" unless parametrised) picks the seal, ``seal_setup`` provisions a fresh KEK
for the test, and the ``dev`` fixture writes that KEK's [seal] table into its faceseal.toml
(and deletes init_dev's seal.key, so a daemon that still read it would fail):

* ``pkcs11``: a new non-extractable AES-256 key in the session's SoftHSM2 token
  (``SoftHsmToken.new_kek``). ``SOFTHSM2_CONF`` is set in this process's environment for the
  test (monkeypatch), which is what a child process (``faceseald serve``, ``seal migrate``)
  needs to find the token: ``SubprocessDaemon`` passes its environment on, and
  ``SealSetup.env`` names the variable for a child started with an explicit ``env=``.
* ``transit``: a new aes256-gcm96 key (not exportable, no plaintext backup) on one OpenBao dev
  server shared by the session, with its own policy and token (file 0600 in the test's tmp
  dir). Sharing the server keeps the parametrised suite fast (a server per test costs ~1 s).

``SealSetup.secrets`` names what must never appear in a file or log the daemon writes: the PIN,
the Vault tokens. The KEKs themselves cannot be searched for: the token and the engine refuse
to reveal them, which ``assert_kek_stays_in_token`` / ``assert_transit_key_stays_in_engine``
check.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import FACESEALD, Dev, dump_toml, write_atomically

if TYPE_CHECKING:
    from pkcs11.types import Session

    try:
        from tests.openbao import OpenBao
        from tests.softhsm import SoftHsmToken
    except ModuleNotFoundError:
        from openbao import OpenBao  # type: ignore[no-redef]
        from softhsm import SoftHsmToken  # type: ignore[no-redef]

SEAL_KINDS = ("file", "pkcs11", "transit")
# Module level: ``pytestmark = EACH_SEAL`` runs every test of the module once per seal.
EACH_SEAL = pytest.mark.parametrize("seal_kind", SEAL_KINDS, indirect=True)

_transit_keys = itertools.count(1)


def tests_module(name: str) -> Any:
    """``tests.<name>``, or ``<name>`` when only tests/ is on sys.path (plain ``pytest``): one
    module object either way, so the SoftHSM2 token is created once per session."""
    try:
        return importlib.import_module(f"tests.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(name)


@dataclass
class SealSetup:
    """One test's seal: the [seal] table to use (None: init_dev's file seal) and its secrets."""

    kind: str
    table: dict[str, Any] | None = None
    # name -> bytes that must appear in no file or log written by the daemon (safe to print the name)
    secrets: dict[str, bytes] = field(default_factory=dict)
    # what a child process needs in its environment (SOFTHSM2_CONF for PKCS#11)
    env: dict[str, str] = field(default_factory=dict)
    token: SoftHsmToken | None = None
    key_label: str = ""
    bao: OpenBao | None = None
    key_name: str = ""


# ---------------------------------------------------------------------------------- [seal] tables


def pkcs11_table(token: SoftHsmToken, key_label: str) -> dict[str, Any]:
    return {
        "type": "pkcs11",
        "module": str(token.module),
        "token_label": token.token_label,
        "key_label": key_label,
        "pin_file": str(token.pin_file),
    }


def transit_table(address: str, key_name: str, token_file: Path) -> dict[str, Any]:
    # A short timeout: the engine is on loopback, and a sealed-start test waits for retries.
    return {
        "type": "transit",
        "address": address,
        "key_name": key_name,
        "token_file": str(token_file),
        "timeout_seconds": 2.0,
    }


def _write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def provision_transit_key(bao: OpenBao, directory: Path) -> tuple[str, Path, str]:
    """A new Transit key on a running server, a policy for just that key, and a token for it.

    Returns (key name, 0600 token file, token).
    """
    policy_template: str = tests_module("openbao").SEAL_POLICY
    name = f"faceseal-{os.getpid()}-{next(_transit_keys)}"
    with bao.admin() as client:
        client.secrets.transit.create_key(
            name,
            key_type="aes256-gcm96",
            exportable=False,
            allow_plaintext_backup=False,
            mount_point=bao.mount,
        )
        policy = f"faceseal-seal-{name}"
        client.sys.create_or_update_policy(policy, policy_template.format(mount=bao.mount, key=name))
        token: str = client.auth.token.create(policies=[policy], no_default_policy=True, ttl="1h")["auth"][
            "client_token"
        ]
    directory.mkdir(parents=True, exist_ok=True)
    return name, _write_secret(directory / f"{name}.token", token), token


def make_seal_setup(kind: str, request: pytest.FixtureRequest, directory: Path) -> SealSetup:
    """Provision a fresh KEK of ``kind`` for the requesting test (see the module docstring)."""
    if kind == "file":
        return SealSetup("file")
    if kind == "pkcs11":
        token: SoftHsmToken = request.getfixturevalue("softhsm_token")
        # softhsm_token already set it for this test; say so where a reader of the helper looks.
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("SOFTHSM2_CONF", str(token.conf))
        label = token.new_kek()
        return SealSetup(
            "pkcs11",
            pkcs11_table(token, label),
            secrets={"PKCS#11 user PIN": token.pin.encode()},
            env={"SOFTHSM2_CONF": str(token.conf)},
            token=token,
            key_label=label,
        )
    if kind == "transit":
        bao: OpenBao = request.getfixturevalue("shared_openbao")
        name, token_file, vault_token = provision_transit_key(bao, directory)
        return SealSetup(
            "transit",
            transit_table(bao.address, name, token_file),
            secrets={"Vault token": vault_token.encode(), "Vault root token": bao.root_token.encode()},
            bao=bao,
            key_name=name,
        )
    raise ValueError(f"unknown seal kind {kind!r}; one of {SEAL_KINDS}")


def apply_seal(dev: Dev, setup: SealSetup) -> None:
    """Put ``setup``'s [seal] table into the dev config; drop the unused dev key file."""
    if setup.table is None:
        return
    table = setup.table
    dev.edit_config(lambda c: c.__setitem__("seal", dict(table)))
    (dev.dir / "seal.key").unlink()


def seal_toml(path: Path, table: dict[str, Any]) -> Path:
    """A file holding only a [seal] table, as ``faceseald seal migrate --to`` reads it."""
    write_atomically(path, dump_toml({"seal": table}))
    return path


def seal_migrate(config: Path, target: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``faceseald seal migrate --config C --to T`` as a child process with exactly ``env``
    (os.environ plus SOFTHSM2_CONF for a PKCS#11 seal on either side)."""
    assert FACESEALD.is_file(), f"{FACESEALD} is missing: is the package installed in this venv?"
    return subprocess.run(
        [str(FACESEALD), "seal", "migrate", "--config", str(config), "--to", str(target)],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ----------------------------------------------------------------------- the KEK stays in the seal


@contextlib.contextmanager
def _user_session(token: SoftHsmToken) -> Iterator[Session]:
    from pkcs11 import exceptions as p11e

    from faceseal.server.seal.pkcs11 import load_module

    tok = load_module(token.module).get_token(token_label=token.token_label)
    try:
        session = tok.open(rw=False, user_pin=token.pin)
    except p11e.UserAlreadyLoggedIn:  # logins are per process: share the one already made
        session = tok.open(rw=False)
    try:
        yield session
    finally:
        session.close()


def assert_kek_stays_in_token(token: SoftHsmToken, key_label: str) -> None:
    """The token holds the KEK as sensitive and never extractable, and refuses to hand out its
    value, whether asked for it directly or wrapped under another key."""
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
    from pkcs11 import exceptions as p11e

    with _user_session(token) as session:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_label}))
        assert keys, f"no key labelled {key_label!r} in the token"
        for kek in keys:
            assert kek[Attribute.SENSITIVE] is True
            assert kek[Attribute.EXTRACTABLE] is False
            assert kek[Attribute.ALWAYS_SENSITIVE] is True
            assert kek[Attribute.NEVER_EXTRACTABLE] is True
            with pytest.raises(p11e.AttributeSensitive):
                kek[Attribute.VALUE]
            # A session key allowed to wrap, generated only to try exporting the KEK under it.
            wrapper = session.generate_key(
                KeyType.AES, 256, store=False, capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
            )
            try:
                with pytest.raises(p11e.KeyUnextractable):
                    wrapper.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP)
            finally:
                wrapper.destroy()


def assert_transit_key_stays_in_engine(bao: OpenBao, key_name: str) -> None:
    """The Transit key is not exportable and has no plaintext backup, even for the root token."""
    import hvac.exceptions  # type: ignore[import-untyped]

    with bao.admin() as admin:
        config = admin.secrets.transit.read_key(key_name, mount_point=bao.mount)["data"]
        assert config["exportable"] is False
        assert config["allow_plaintext_backup"] is False
        for path in (f"export/encryption-key/{key_name}", f"backup/{key_name}"):
            with pytest.raises(hvac.exceptions.VaultError):
                admin.adapter.get(f"/v1/{bao.mount}/{path}")


def unwrapped_keyring(dev: Dev) -> dict[str, bytes]:
    """The plaintext keys of the dev store (index key, data keys), unwrapped here through the
    configured seal: needles for the leak tests. The daemon must be stopped."""
    import sqlite3

    from faceseal.server.config import load_config
    from faceseal.server.crypto.vault import wrap_aad
    from faceseal.server.seal import seal_from_config

    config = load_config(dev.config_path)
    seal = seal_from_config(config.seal, config.path)
    with contextlib.closing(sqlite3.connect(f"file:{dev.db_path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT purpose, version, wrapped FROM wrapped_keys").fetchall()
    assert rows, "the store holds no wrapped keys"
    keys = {
        f"{purpose} key v{version}": seal.unwrap(bytes(wrapped), wrap_aad(purpose, version))
        for purpose, version, wrapped in rows
    }
    close = getattr(seal, "close", None)
    if close is not None:
        close()
    return keys
