"""Seal migration from the dev file seal to the PKCS#11 seal (SoftHSM2), end to end.

Subjects are enrolled under the file seal; with the daemon stopped, ``faceseald seal migrate``
(a child process, SOFTHSM2_CONF in its environment) re-wraps the keyring under a KEK in the
token; the config switches to the PKCS#11 seal, the old seal.key is deleted, and the daemon,
started again, matches every template. The template blobs are not touched (only the keyring is
re-wrapped), the old key file no longer opens the keyring, the HSM key cannot be read out of
the token, and the PIN appears in no file or log.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import pytest
from helpers import Dev, SubprocessDaemon, random_encodings
from seals import assert_kek_stays_in_token, pkcs11_table, seal_migrate, seal_toml

from faceseal.server.crypto.vault import wrap_aad
from faceseal.server.seal.base import SealError
from faceseal.server.seal.file import FileSeal

try:
    from tests.softhsm import SoftHsmToken
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): only tests/ is on sys.path
    from softhsm import SoftHsmToken  # type: ignore[no-redef]

pytestmark = pytest.mark.slow

ENCODINGS = random_encodings(12, seed=800)
# Ten subjects; the first two have a second template.
SUBJECTS = {f"person-{i:02d}": [ENCODINGS[i]] for i in range(10)}
SUBJECTS["person-00"].append(ENCODINGS[10])
SUBJECTS["person-01"].append(ENCODINGS[11])


def _table(db: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return sorted(conn.execute(sql).fetchall())


def _templates(dev: Dev) -> list[tuple[object, ...]]:
    return _table(dev.db_path, "SELECT * FROM templates")


def _wrapped(dev: Dev) -> list[tuple[object, ...]]:
    return _table(dev.db_path, "SELECT purpose, version, wrapped FROM wrapped_keys")


def _assert_every_template_matches(daemon: SubprocessDaemon) -> None:
    gateway = daemon.dev.client(daemon.target, "gateway")
    for subject, encodings in SUBJECTS.items():
        for encoding in encodings:
            assert gateway.match(subject, encoding).match is True, subject
            assert [c.subject_id for c in gateway.identify(encoding, top_k=3)] == [subject]
        other = ENCODINGS[(int(subject[-2:]) + 1) % 10]
        assert gateway.match(subject, other).match is False, subject


def test_file_seal_to_pkcs11_keeps_every_template_matchable(
    subprocess_daemon: SubprocessDaemon, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    dev = subprocess_daemon.dev
    assert dev.config()["seal"]["type"] == "file"
    subprocess_daemon.start()
    enroller = dev.client(subprocess_daemon.target, "enroller")
    for subject, encodings in SUBJECTS.items():
        for n, encoding in enumerate(encodings, 1):
            assert enroller.enroll(subject, encoding).template_count == n
    _assert_every_template_matches(subprocess_daemon)
    assert subprocess_daemon.stop() == 0

    templates, wrapped = _templates(dev), _wrapped(dev)
    assert len(templates) == 12
    assert {bytes(w)[:1] for _, _, w in wrapped} == {b"\x02"}  # the file seal's format
    old_kek = dev.kek()
    env = {**os.environ, "SOFTHSM2_CONF": str(softhsm_token.conf)}

    # A target whose key does not exist fails and changes nothing.
    missing = seal_toml(tmp_path / "missing.toml", pkcs11_table(softhsm_token, softhsm_token.new_label()))
    failed = seal_migrate(dev.config_path, missing, env)
    assert failed.returncode == 1, failed.stderr
    assert "nothing changed" in failed.stderr
    assert _wrapped(dev) == wrapped

    label = softhsm_token.new_kek()
    target = seal_toml(tmp_path / "hsm.toml", pkcs11_table(softhsm_token, label))
    result = seal_migrate(dev.config_path, target, env)
    assert result.returncode == 0, result.stderr
    assert f"re-wrapped {len(wrapped)} keys from file:" in result.stdout
    assert f"key='{label}'" in result.stdout
    for output in (result.stdout, result.stderr, failed.stdout, failed.stderr):
        assert softhsm_token.pin not in output

    # Only the keyring was re-wrapped: every template blob is byte for byte what it was.
    assert _templates(dev) == templates
    rewrapped = _wrapped(dev)
    assert [(p, v) for p, v, _ in rewrapped] == [(p, v) for p, v, _ in wrapped]
    assert {bytes(w)[:1] for _, _, w in rewrapped} == {b"\x11"}  # the PKCS#11 seal's format
    # The old key file opens nothing any more: with a copy of it and of the database, a disk
    # thief gets no key.
    old_copy = tmp_path / "old-seal.key"
    fd = os.open(old_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(old_kek)
    for purpose, version, blob in rewrapped:
        with pytest.raises(SealError):
            FileSeal(old_copy).unwrap(bytes(blob), wrap_aad(str(purpose), int(str(version))))

    # Switch the config to the HSM and delete the old key file: the daemon no longer needs it.
    dev.edit_config(lambda c: c.__setitem__("seal", pkcs11_table(softhsm_token, label)))
    (dev.dir / "seal.key").unlink()
    subprocess_daemon.start()  # SOFTHSM2_CONF reaches the child through this process's environment
    _assert_every_template_matches(subprocess_daemon)
    enroller = dev.client(subprocess_daemon.target, "enroller")  # a new port after the restart
    assert enroller.enroll("person-new", ENCODINGS[10]).template_count == 1  # and it writes, too
    assert dev.client(subprocess_daemon.target, "gateway").match("person-new", ENCODINGS[10]).match is True
    assert subprocess_daemon.stop() == 0

    log = subprocess_daemon.log()
    unsealed = [line for line in log.splitlines() if '"msg":"unsealed"' in line]
    assert len(unsealed) == 2
    assert '"seal":"file:' in unsealed[0]
    assert f"key='{label}'" in unsealed[1]

    # The KEK appears in no file the daemon wrote because it cannot: the token refuses to reveal it.
    assert_kek_stays_in_token(softhsm_token, label)
    # And the PIN (which could use it) is in no file the daemon or the migration wrote.
    pin = softhsm_token.pin.encode()
    written = [p for p in dev.dir.rglob("*") if p.is_file()]  # the store, audit log, config (names the PIN file)
    assert dev.db_path in written
    assert dev.config_path in written
    leaks = [p.name for p in [*written, subprocess_daemon.log_path] if pin in p.read_bytes()]
    assert leaks == []
