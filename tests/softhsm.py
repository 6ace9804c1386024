"""A throwaway SoftHSM2 token for the PKCS#11 seal tests.

SoftHSM2 reads ``SOFTHSM2_CONF`` once, in ``C_Initialize``, and python-pkcs11 keeps one loaded,
initialised module per path for the whole process. So the token lives for the whole test
session: the first test that asks for it writes a private config (``directories.tokendir`` in a
temp folder, ``objectstore.backend = file``), runs ``softhsm2-util --init-token --free`` with
that config in the child's environment, and writes the user PIN to a 0600 file. Every test
gets the same token and tells keys apart by label (``SoftHsmToken.new_label``,
``SoftHsmToken.new_kek``).

The fixture ``softhsm_token`` (import it into a test module) sets ``SOFTHSM2_CONF`` with
monkeypatch for the test, makes sure the process's module sees this token (re-initialising it
when it was first loaded with another config), and yields a ``SoftHsmToken``, which unpacks as
``(module, token_label, pin_file)``. At teardown it re-initialises the module, which closes
every session the test left open and logs the process out, so a test never inherits a login
(PKCS#11 logins are per process, not per session). Seals built by a test therefore stop
working after it; build new ones.

Missing ``softhsm2-util``, the module or python-pkcs11 skips the tests (fails under CI=true).
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

try:
    from tests.requirements import missing
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): only tests/ is on sys.path
    from requirements import missing  # type: ignore[no-redef]

INSTALL = "apt-get install softhsm2"
TOKEN_LABEL = "faceseal-test"
# Where Debian/Ubuntu, Fedora and source builds put the module; FACESEAL_SOFTHSM_MODULE overrides.
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

_labels = itertools.count(1)


class SoftHsmToken(NamedTuple):
    """One initialised SoftHSM2 token; unpacks as ``(module, token_label, pin_file)``."""

    module: Path
    token_label: str
    pin_file: Path

    @property
    def pin(self) -> str:
        return self.pin_file.read_text(encoding="utf-8").strip()

    @property
    def conf(self) -> Path:
        return self.pin_file.parent / "softhsm2.conf"

    def new_label(self, prefix: str = "kek") -> str:
        """A key label no other test in this session uses."""
        return f"{prefix}-{os.getpid()}-{next(_labels)}"

    def new_kek(self, prefix: str = "kek") -> str:
        """Create a fresh non-extractable KEK (version 1) under a new label; return the label."""
        from faceseal.server.seal.pkcs11 import create_kek

        label = self.new_label(prefix)
        create_kek(self.module, self.token_label, label, self.pin)
        return label


_created: dict[str, SoftHsmToken] = {}


def find_module() -> Path:
    """The SoftHSM2 PKCS#11 module, or skip (fail under CI) saying how to install it."""
    override = os.environ.get("FACESEAL_SOFTHSM_MODULE")
    for candidate in (override,) if override else MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    missing("the SoftHSM2 PKCS#11 module (libsofthsm2.so)", INSTALL)
    raise AssertionError("unreachable")


def _create(home: Path, module: Path, util: str, token_label: str) -> SoftHsmToken:
    tokens = home / "tokens"
    tokens.mkdir(mode=0o700)
    conf = home / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        encoding="utf-8",
    )
    pin = secrets.token_hex(8)
    so_pin = secrets.token_hex(8)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    result = subprocess.run(
        [util, "--init-token", "--free", "--label", token_label, "--pin", pin, "--so-pin", so_pin],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {result.stderr.strip() or result.stdout.strip()}")
    pin_file = home / "user.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(pin + "\n")
    return SoftHsmToken(module, token_label, pin_file)


def _make_visible(token: SoftHsmToken) -> None:
    """Load the module under this token's config; re-initialise it if it was loaded otherwise."""
    from faceseal.server.seal.pkcs11 import load_module

    lib = load_module(token.module)
    if not any(t.label == token.token_label for t in lib.get_tokens()):
        lib.reinitialize()  # reads SOFTHSM2_CONF again
        if not any(t.label == token.token_label for t in lib.get_tokens()):
            raise RuntimeError(f"SoftHSM2 does not show the token {token.token_label!r} from {token.conf}")


def _reset(token: SoftHsmToken) -> None:
    """Close every session of the process and log it out (C_Finalize + C_Initialize)."""
    from faceseal.server.seal.pkcs11 import load_module

    load_module(token.module).reinitialize()


@pytest.fixture
def softhsm_token(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsmToken]:
    """The session's SoftHSM2 token, with SOFTHSM2_CONF pointing at it for this test."""
    util = shutil.which("softhsm2-util")
    if util is None:
        missing("SoftHSM2 (softhsm2-util)", INSTALL)
        raise AssertionError("unreachable")
    module = find_module()
    token = _created.get(TOKEN_LABEL)
    if token is None:
        token = _create(tmp_path_factory.mktemp("softhsm"), module, util, TOKEN_LABEL)
        _created[TOKEN_LABEL] = token
    monkeypatch.setenv("SOFTHSM2_CONF", str(token.conf))
    _make_visible(token)
    try:
        yield token
    finally:
        _reset(token)
