"""The dev file seal and the keyring it protects.

The file seal holds the key-encryption key: it must refuse a key file that others can read or
that is not what it seems (wrong size, a symlink), and no message it writes may carry the key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from faceseal.server.crypto import vault
from faceseal.server.seal.base import SealError
from faceseal.server.seal.file import FileSeal
from faceseal.server.store.base import WrappedKey
from faceseal.server.store.sqlite import SQLiteStore

# Printable, so a message that formatted the raw bytes would show them as text.
KEK = b"KEK-0123456789abcdefghijklmnopqr"
assert len(KEK) == 32


def _write_key(path: Path, data: bytes = KEK, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(mode)
    return path


def _assert_no_key(text: str, key: bytes = KEK) -> None:
    for form in (
        key.hex(),
        key.hex().upper(),
        repr(key)[2:-1],
        key.decode("latin-1"),
        key[:12].decode("latin-1"),
    ):
        assert form not in text, text


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return _write_key(tmp_path / "seal.key")


def test_wrap_unwrap_round_trip(key_file: Path) -> None:
    seal = FileSeal(key_file)
    data_key = secrets.token_bytes(32)
    aad = vault.wrap_aad("data", 1)
    wrapped = seal.wrap(data_key, aad)
    assert data_key not in wrapped
    assert seal.unwrap(wrapped, aad) == data_key
    # A fresh nonce each time: wrapping twice does not reveal that two keys are equal.
    assert seal.wrap(data_key, aad) != wrapped
    # Another instance on the same file (a restart) unwraps what the first wrapped.
    assert FileSeal(key_file).unwrap(wrapped, aad) == data_key


def test_owner_read_only_file_is_accepted(tmp_path: Path) -> None:
    seal = FileSeal(_write_key(tmp_path / "ro.key", mode=0o400))
    assert seal.unwrap(seal.wrap(b"k" * 32, b"aad"), b"aad") == b"k" * 32


def test_wrong_aad_fails(key_file: Path) -> None:
    seal = FileSeal(key_file)
    wrapped = seal.wrap(b"\x11" * 32, vault.wrap_aad("data", 1))
    for aad in (vault.wrap_aad("data", 2), vault.wrap_aad("index", 1), b""):
        with pytest.raises(SealError):
            seal.unwrap(wrapped, aad)


def test_other_kek_or_tampered_wrapped_key_fails(key_file: Path, tmp_path: Path) -> None:
    seal = FileSeal(key_file)
    aad = vault.wrap_aad("data", 1)
    wrapped = seal.wrap(b"\x22" * 32, aad)
    other = FileSeal(_write_key(tmp_path / "other.key", secrets.token_bytes(32)))
    with pytest.raises(SealError):
        other.unwrap(wrapped, aad)
    for i in range(len(wrapped)):  # format byte, key id, nonce, ciphertext, tag: all covered
        with pytest.raises(SealError):
            seal.unwrap(wrapped[:i] + bytes([wrapped[i] ^ 0x01]) + wrapped[i + 1 :], aad)
    for bad in (wrapped[:-1], wrapped[:20], b"", wrapped + b"\0"):
        with pytest.raises(SealError):
            seal.unwrap(bad, aad)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610])
def test_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _write_key(tmp_path / "seal.key", mode=mode)
    with pytest.raises(SealError) as info:
        FileSeal(path)
    message = str(info.value)
    assert "chmod 600" in message
    assert str(path) in message
    _assert_no_key(message)


@pytest.mark.parametrize("size", [0, 31, 33, 64, 1024])
def test_key_file_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    content = (KEK * 40)[:size]
    path = _write_key(tmp_path / "seal.key", content)
    with pytest.raises(SealError) as info:
        FileSeal(path)
    _assert_no_key(str(info.value))
    assert str(path) in str(info.value)


def test_symlink_is_refused(key_file: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(key_file)
    with pytest.raises(SealError) as info:
        FileSeal(link)
    _assert_no_key(str(info.value))


def test_missing_file_and_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SealError):
        FileSeal(tmp_path / "absent.key")
    folder = tmp_path / "dir.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(SealError):
        FileSeal(folder)


def test_key_never_appears_in_repr_describe_or_errors(key_file: Path) -> None:
    seal = FileSeal(key_file)
    texts = [repr(seal), str(seal), seal.describe()]
    wrapped = seal.wrap(b"\x33" * 32, b"aad")
    for bad in (b"", wrapped[:-1] + bytes([wrapped[-1] ^ 1])):
        with pytest.raises(SealError) as info:
            seal.unwrap(bad, b"aad")
        texts.append(str(info.value))
        assert info.value.__cause__ is None
    for text in texts:
        _assert_no_key(text)
    assert str(key_file) in seal.describe()


# -- KEK rotation (crypto-shredding) ---------------------------------------------------------------


def test_rotation_then_retire_destroys_the_old_kek(key_file: Path) -> None:
    seal = FileSeal(key_file)
    aad = vault.wrap_aad("data", 1)
    old_wrapped = seal.wrap(b"\x44" * 32, aad)
    seal.rotate()
    pending = key_file.with_name(key_file.name + ".next")
    assert pending.exists()
    assert pending.stat().st_mode & 0o777 == 0o600
    new_wrapped = seal.wrap(b"\x55" * 32, aad)
    # Between rotate and retire both KEKs unwrap, also after a crash and restart.
    for s in (seal, FileSeal(key_file)):
        assert s.unwrap(old_wrapped, aad) == b"\x44" * 32
        assert s.unwrap(new_wrapped, aad) == b"\x55" * 32
    seal.retire_previous()
    assert not pending.exists()
    assert key_file.stat().st_mode & 0o777 == 0o600
    for s in (seal, FileSeal(key_file)):
        assert s.unwrap(new_wrapped, aad) == b"\x55" * 32
        with pytest.raises(SealError):
            s.unwrap(old_wrapped, aad)
    assert KEK not in key_file.read_bytes()


# -- the keyring through the seal ----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "faceseal.db")
    yield s
    s.close()


def test_first_start_creates_index_and_data_v1(store: SQLiteStore, key_file: Path) -> None:
    keyring = vault.load_or_create(store, FileSeal(key_file))
    assert keyring.versions() == [1]
    assert keyring.active == 1
    stored = store.wrapped_keys()
    assert [(k.purpose, k.version) for k in stored] == [("data", 1), ("index", 1)]
    plain = {keyring.index_key.reveal(), keyring.data_keys[1].reveal()}
    assert len(plain) == 2
    for k in stored:
        for secret in plain:
            assert secret not in k.wrapped


def test_second_start_returns_the_same_keys(tmp_path: Path, store: SQLiteStore, key_file: Path) -> None:
    first = vault.load_or_create(store, FileSeal(key_file))
    rows_before = store.wrapped_keys()
    store.close()
    reopened = SQLiteStore(tmp_path / "faceseal.db")
    try:
        second = vault.load_or_create(reopened, FileSeal(key_file))
        assert second.versions() == first.versions()
        assert second.index_key.reveal() == first.index_key.reveal()
        assert second.data_keys[1].reveal() == first.data_keys[1].reveal()
        assert reopened.wrapped_keys() == rows_before  # nothing new was written
    finally:
        reopened.close()


def test_another_key_file_cannot_open_the_keyring(store: SQLiteStore, key_file: Path, tmp_path: Path) -> None:
    vault.load_or_create(store, FileSeal(key_file))
    before = store.wrapped_keys()
    other = FileSeal(_write_key(tmp_path / "other.key", secrets.token_bytes(32)))
    with pytest.raises(SealError):
        vault.load_or_create(store, other)
    assert store.wrapped_keys() == before  # a wrong key must not start a second keyring


def test_wrapped_key_moved_to_another_slot_does_not_unwrap(store: SQLiteStore, key_file: Path) -> None:
    seal = FileSeal(key_file)
    vault.load_or_create(store, seal)
    data = next(k for k in store.wrapped_keys() if k.purpose == "data")
    assert store.delete_wrapped_key("index", 1)
    store.add_wrapped_keys([WrappedKey("index", 1, data.wrapped)])
    with pytest.raises(SealError):
        vault.load_or_create(store, seal)


def test_incomplete_keyring_is_refused(store: SQLiteStore, key_file: Path) -> None:
    seal = FileSeal(key_file)
    vault.load_or_create(store, seal)
    assert store.delete_wrapped_key("index", 1)
    with pytest.raises(SealError):
        vault.load_or_create(store, seal)
