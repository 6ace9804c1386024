"""``faceseald seal migrate``: move the keyring to another seal without touching a template.

File seal -> another file seal key here; the helpers (``write_seal_toml``, ``migrate_and_restart``
in tests/helpers.py) take any [seal] table, so the PKCS#11 and Transit variants reuse them.
A migration to a broken seal must exit non-zero and change nothing: the old seal keeps working.
The real encodings are biometric data: failures name subjects, never vectors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    F32,
    Dev,
    InProcessDaemon,
    admin_client,
    db_snapshot,
    free_port,
    key_versions_in_db,
    lift_rate_limit,
    load_real_encodings,
    migrate_and_restart,
    run_seal_migrate,
    write_key_file,
    write_seal_toml,
)

from faceseal.server.crypto import vault
from faceseal.server.seal.base import SealError
from faceseal.server.seal.file import FileSeal
from faceseal.server.store.sqlite import SQLiteStore


def _enroll(harness: InProcessDaemon) -> dict[str, F32]:
    """The 140 real encodings as subjects, half before and half after a rotation, so the keyring
    holds the index key and data keys 1 and 2, and templates use both versions."""
    real, _ = load_real_encodings()
    people = {f"face-{i:03d}": e for i, e in enumerate(real)}
    lift_rate_limit(harness.dev)
    harness.start()
    enroller = harness.client("enroller")
    for n, (subject, encoding) in enumerate(people.items()):
        if n == len(people) // 2:
            assert admin_client(harness.dev, harness.target).rotate_key() == 2
        enroller.enroll(subject, encoding)
    return people


def _not_matching(harness: InProcessDaemon, people: dict[str, F32]) -> list[str]:
    gateway = harness.client("gateway")
    return [subject for subject, encoding in people.items() if not gateway.match(subject, encoding).match]


def _keyring_versions(store_path: Path, key_file: Path) -> list[int]:
    store = SQLiteStore(store_path)
    try:
        return vault.load(store, FileSeal(key_file)).versions()
    finally:
        store.close()


def test_migrate_to_another_key_file(harness: InProcessDaemon) -> None:
    dev = harness.dev
    people = _enroll(harness)
    status_before = admin_client(dev, harness.target).status()
    templates_before = db_snapshot(dev.db_path)["templates"]
    old_key, new_key = dev.dir / "seal.key", dev.dir / "seal-new.key"
    write_key_file(new_key)
    target = write_seal_toml(dev.dir / "seal-new.toml", {"type": "file", "key_file": "seal-new.key"})

    def retire_old_key() -> None:
        # The keyring really moved: the new key opens it, the old one no longer does.
        assert _keyring_versions(dev.db_path, new_key) == [1, 2]
        with pytest.raises(SealError, match="key-encryption key"):
            _keyring_versions(dev.db_path, old_key)
        old_key.unlink()

    out = migrate_and_restart(harness, target, between=retire_old_key)

    assert out.splitlines()[0] == f"re-wrapped 3 keys from file:{old_key} to file:{new_key}"
    assert dev.config()["seal"] == {"type": "file", "key_file": str(new_key)}
    assert not old_key.exists()
    # Serving on the new seal: same keys, same templates byte for byte, every subject matches.
    assert db_snapshot(dev.db_path)["templates"] == templates_before
    assert admin_client(dev, harness.target).status() == status_before
    refused = _not_matching(harness, people)
    assert refused == [], f"{len(refused)} subjects no longer match, e.g. {refused[:5]}"

    # Key administration works on the new seal too (RetireKey rotates the new key file).
    admin = admin_client(dev, harness.target)
    list(admin.rewrap())
    admin.retire_key(1)
    harness.restart()
    assert key_versions_in_db(dev.db_path) == ({2: len(people)}, [2])
    assert _not_matching(harness, people) == []


def _file_seal(key_file: str) -> dict[str, Any]:
    return {"type": "file", "key_file": key_file}


def _broken_targets(directory: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Name -> (a [seal] table that cannot work, what stderr must say)."""
    write_key_file(directory / "short.key", os.urandom(31))
    write_key_file(directory / "loose.key", mode=0o644)
    (directory / "dir.key").mkdir()
    (directory / "token").write_text("s.not-a-real-token\n", encoding="utf-8")
    (directory / "token").chmod(0o600)
    targets = {
        "missing key file": (_file_seal("absent.key"), "cannot open the seal key file"),
        "key file of 31 bytes": (_file_seal("short.key"), "exactly 32 bytes"),
        "key file readable by others": (_file_seal("loose.key"), "readable by group or others"),
        "key file is a directory": (_file_seal("dir.key"), "not a regular file"),
        "transit engine unreachable": (
            {
                "type": "transit",
                "address": f"http://127.0.0.1:{free_port()}",
                "key_name": "faceseal",
                "token_file": "token",
                "timeout_seconds": 2.0,
            },
            "seal migration failed, nothing changed",
        ),
    }
    if os.geteuid() != 0:  # root reads a mode-0000 file anyway
        write_key_file(directory / "unreadable.key", mode=0o000)
        targets["unreadable key file"] = (_file_seal("unreadable.key"), "cannot open the seal key file")
    return targets


def test_migrate_to_a_broken_seal_changes_nothing(harness: InProcessDaemon) -> None:
    dev: Dev = harness.dev
    real, _ = load_real_encodings()
    people = {f"face-{i:03d}": e for i, e in enumerate(real[:20])}
    harness.start()
    enroller = harness.client("enroller")
    for subject, encoding in people.items():
        enroller.enroll(subject, encoding)
    harness.stop()

    before, kek, config = db_snapshot(dev.db_path), dev.kek(), dev.config_path.read_text(encoding="utf-8")
    targets_dir = dev.dir / "targets"
    targets_dir.mkdir()
    for name, (table, why) in _broken_targets(targets_dir).items():
        result = run_seal_migrate(dev.config_path, write_seal_toml(targets_dir / f"{name}.toml", table))
        assert result.returncode != 0, f"{name}: exited 0:\n{result.stdout}"
        assert why in result.stderr, f"{name}: {result.stderr}"
        assert result.stdout == "", name
        # Nothing changed: the store (keyring and templates), the KEK file, the config.
        assert db_snapshot(dev.db_path) == before, name
        assert dev.kek() == kek, name
        assert not (dev.dir / "seal.key.next").exists(), name
        assert dev.config_path.read_text(encoding="utf-8") == config, name

    harness.start()  # the old seal still opens everything
    assert _not_matching(harness, people) == []


class _WrapsButCannotUnwrap:
    """A seal that accepts keys and cannot give them back (a misconfigured HSM key, say)."""

    def __init__(self, inner: FileSeal) -> None:
        self._inner = inner

    def describe(self) -> str:
        return "broken"

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        return self._inner.wrap(key, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        raise SealError("this seal cannot unwrap")

    def rotate(self) -> None:
        raise SealError("this seal cannot rotate")

    def retire_previous(self) -> None:
        raise SealError("this seal cannot retire")


def test_migrate_proves_the_new_seal_before_replacing_the_keyring(harness: InProcessDaemon, tmp_path: Path) -> None:
    dev = harness.dev
    harness.start()
    harness.client("enroller").enroll("alice", load_real_encodings()[0][0])
    harness.stop()
    before = db_snapshot(dev.db_path)
    write_key_file(tmp_path / "other.key")
    store = SQLiteStore(dev.db_path)
    try:
        broken = _WrapsButCannotUnwrap(FileSeal(tmp_path / "other.key"))
        with pytest.raises(SealError, match="cannot unwrap"):
            vault.migrate(store, FileSeal(dev.dir / "seal.key"), broken)
    finally:
        store.close()
    assert db_snapshot(dev.db_path) == before


def test_migrating_a_store_without_a_keyring_is_refused(dev: Dev) -> None:
    # A setup that never started has no keyring: there is nothing to migrate (switch the config
    # instead), and the command must not create one under the old seal on the way.
    write_key_file(dev.dir / "seal-new.key")
    target = write_seal_toml(dev.dir / "seal-new.toml", _file_seal("seal-new.key"))
    result = run_seal_migrate(dev.config_path, target)
    assert result.returncode == 1, result.stdout
    assert "no keyring" in result.stderr
    assert key_versions_in_db(dev.db_path) == ({}, [])
    assert db_snapshot(dev.db_path)["wrapped_keys"] == []


def test_migrate_helpers_resolve_relative_paths_against_the_target_file(
    harness: InProcessDaemon, tmp_path: Path
) -> None:
    # A target TOML outside the dev directory, naming its key file relative to itself.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_key_file(elsewhere / "k.key")
    alice = load_real_encodings()[0][0]
    harness.start()
    harness.client("enroller").enroll("alice", alice)
    migrate_and_restart(harness, write_seal_toml(elsewhere / "s.toml", _file_seal("k.key")))
    assert harness.dev.config()["seal"]["key_file"] == str(elsewhere / "k.key")
    matched = harness.client("gateway").match("alice", alice).match  # (never print a real encoding)
    assert matched is True
