"""The Transit seal against a real OpenBao dev server (tests/openbao.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hvac.exceptions  # type: ignore[import-untyped]
import pytest

from faceseal.server.config import TransitSealConfig
from faceseal.server.crypto.vault import add_version, load_or_create, retire_version, wrap_aad
from faceseal.server.errors import ConfigError
from faceseal.server.seal import seal_from_config
from faceseal.server.seal.base import SealError, SealUnreachable
from faceseal.server.seal.transit import TransitSeal
from faceseal.server.store.sqlite import SQLiteStore

try:
    from tests.openbao import SERVE_POLICY, OpenBao, free_port, openbao_factory
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): only tests/ is on sys.path
    from openbao import (  # type: ignore[no-redef] # noqa: F401
        SERVE_POLICY,
        OpenBao,
        free_port,
        openbao_factory,
    )

Factory = Callable[..., OpenBao]
KEY = bytes(range(32))
AAD = wrap_aad("data", 1)


@pytest.fixture
def bao(openbao_factory: Factory) -> OpenBao:
    return openbao_factory()


@pytest.fixture
def seal(bao: OpenBao) -> TransitSeal:
    return TransitSeal.from_config(bao.seal_config())


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_round_trip(seal: TransitSeal) -> None:
    wrapped = seal.wrap(KEY, AAD)
    assert wrapped[:1] == b"\x01"
    assert wrapped[1:].startswith(b"vault:v1:")
    assert KEY not in wrapped
    assert seal.unwrap(wrapped, AAD) == KEY
    assert seal.wrap(KEY, AAD) != wrapped  # a fresh nonce every time


def test_wrong_aad_fails(seal: TransitSeal) -> None:
    wrapped = seal.wrap(KEY, AAD)
    with pytest.raises(SealError) as info:
        seal.unwrap(wrapped, wrap_aad("data", 2))
    assert not isinstance(info.value, SealUnreachable)
    with pytest.raises(SealError):
        seal.unwrap(wrapped, b"")


def test_tampered_or_malformed_wrapped_key_fails(seal: TransitSeal) -> None:
    wrapped = seal.wrap(KEY, AAD)
    body = bytearray(wrapped)
    body[-5] = ord("A") if body[-5] != ord("A") else ord("B")
    for bad in (bytes(body), b"\x02" + wrapped[1:], b"", b"\x01not a ciphertext"):
        with pytest.raises(SealError) as info:
            seal.unwrap(bad, AAD)
        assert not isinstance(info.value, SealUnreachable)


def test_key_is_not_exportable(bao: OpenBao) -> None:
    with bao.admin() as admin:
        config = admin.secrets.transit.read_key(bao.key_name)["data"]
        assert config["exportable"] is False
        assert config["allow_plaintext_backup"] is False
        assert config["type"] == "aes256-gcm96"
        # Even the root token cannot take the key out.
        with pytest.raises(hvac.exceptions.VaultError):
            admin.adapter.get(f"/v1/{bao.mount}/export/encryption-key/{bao.key_name}")
        with pytest.raises(hvac.exceptions.VaultError):
            admin.adapter.get(f"/v1/{bao.mount}/backup/{bao.key_name}")


def test_seal_token_is_bound_to_its_key(bao: OpenBao) -> None:
    seal = TransitSeal.from_config(bao.seal_config())
    assert seal.unwrap(seal.wrap(KEY, AAD), AAD) == KEY
    other = TransitSeal.from_config(bao.seal_config(key_name="other"))
    with pytest.raises(SealError, match="permission denied"):
        other.wrap(KEY, AAD)


# -- KEK rotation (crypto-shredding) ---------------------------------------------------------------


def test_rotate_then_retire_destroys_the_old_version(bao: OpenBao, seal: TransitSeal) -> None:
    old = seal.wrap(KEY, AAD)
    seal.rotate()
    new = seal.wrap(KEY[::-1], AAD)
    assert new[1:].startswith(b"vault:v2:")
    # Between rotate and retire both versions unwrap, from any seal (another replica, a restart).
    for s in (seal, TransitSeal.from_config(bao.seal_config())):
        assert s.unwrap(old, AAD) == KEY
        assert s.unwrap(new, AAD) == KEY[::-1]
    seal.retire_previous()
    assert seal.unwrap(new, AAD) == KEY[::-1]
    with pytest.raises(SealError) as info:
        seal.unwrap(old, AAD)
    assert not isinstance(info.value, SealUnreachable)
    with bao.admin() as admin:
        config = admin.secrets.transit.read_key(bao.key_name)["data"]
    assert set(config["keys"]) == {"2"}  # version 1 is gone from the engine, not just disabled
    assert config["min_available_version"] == 2
    assert config["min_decryption_version"] == 2
    seal.retire_previous()  # idempotent
    seal.rotate()  # and rotation goes on after a retirement
    newer = seal.wrap(KEY, AAD)
    assert newer[1:].startswith(b"vault:v3:")
    assert seal.unwrap(newer, AAD) == KEY
    assert seal.unwrap(new, AAD) == KEY[::-1]


def test_serving_token_cannot_rotate_or_retire(bao: OpenBao) -> None:
    seal = TransitSeal.from_config(bao.seal_config(token_file=bao.make_token(SERVE_POLICY, name="serve")))
    assert seal.unwrap(seal.wrap(KEY, AAD), AAD) == KEY
    for call in (seal.rotate, seal.retire_previous):
        with pytest.raises(SealError, match="permission denied"):
            call()


def test_retire_version_through_the_keyring(seal: TransitSeal, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "faceseal.db")
    try:
        keyring = add_version(store, seal, load_or_create(store, seal))
        backup = store.wrapped_keys()  # what a backup taken now would hold
        remaining = retire_version(store, seal, keyring, 1)
        reloaded = load_or_create(store, seal)
        assert reloaded.versions() == remaining.versions() == [2]
        assert reloaded.data_keys[2].reveal() == keyring.data_keys[2].reveal()
        for item in backup:  # the backup's keyring no longer unwraps: crypto-shredding
            with pytest.raises(SealError):
                seal.unwrap(item.wrapped, wrap_aad(item.purpose, item.version))
    finally:
        store.close()


# -- tokens, errors, messages ----------------------------------------------------------------------


def test_bad_token_is_a_seal_error_without_the_token(bao: OpenBao, tmp_path: Path) -> None:
    token = "s.not-a-real-token-4f1c2a9e"
    seal = TransitSeal.from_config(bao.seal_config(token_file=write_secret(tmp_path / "t", token + "\n")))
    for call in (lambda: seal.wrap(KEY, AAD), lambda: seal.unwrap(b"\x01vault:v1:AAAA", AAD)):
        with pytest.raises(SealError) as info:
            call()
        assert not isinstance(info.value, SealUnreachable)
        assert "permission denied" in str(info.value)
        assert token not in str(info.value)
        assert "4f1c2a9e" not in repr(info.value)
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__


def test_messages_and_repr_carry_no_secrets(bao: OpenBao, seal: TransitSeal) -> None:
    assert seal.describe() == f"transit:{bao.address}/transit/keys/{bao.key_name}"
    assert repr(seal) == f"TransitSeal({seal.describe()})"
    assert bao.seal_token not in repr(seal) + seal.describe() + repr(vars(seal))
    with pytest.raises(SealError) as info:
        seal.unwrap(seal.wrap(KEY, AAD), b"other")
    assert bao.seal_token not in str(info.value)
    assert KEY.hex() not in str(info.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_loose_token_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_secret(tmp_path / "token", "s.abcdef\n", mode)
    config = OpenBaoLess(path)
    with pytest.raises(SealError, match="chmod 600") as info:
        TransitSeal.from_config(config.cfg)
    assert "abcdef" not in str(info.value)
    with pytest.raises(ConfigError, match=r"section \[seal\].*readable by group"):
        seal_from_config(config.cfg, tmp_path / "faceseal.toml")


@pytest.mark.parametrize("content", ["", "\n", "qq1x zz2y\n", "qq1x\nzz2y\n", "qq1x\x00zz2y"])
def test_token_file_content_is_checked_without_echo(tmp_path: Path, content: str) -> None:
    path = write_secret(tmp_path / "token", content)
    with pytest.raises(SealError, match="one token on one line") as info:
        TransitSeal.from_config(OpenBaoLess(path).cfg)
    for part in content.split():
        assert part not in str(info.value)


def test_missing_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SealError, match="cannot open the Transit token file"):
        TransitSeal.from_config(OpenBaoLess(tmp_path / "absent").cfg)


def test_missing_hvac_is_a_seal_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faceseal.server.seal import transit

    monkeypatch.setattr(transit, "_INSTALLED", False)
    with pytest.raises(ConfigError, match=r"pip install 'faceseal\[transit\]'"):
        seal_from_config(OpenBaoLess(write_secret(tmp_path / "t", "s.x\n")).cfg, tmp_path / "faceseal.toml")


def test_construction_does_not_contact_the_engine(tmp_path: Path) -> None:
    # Nothing listens there; construction must still succeed (the daemon starts sealed).
    seal = TransitSeal.from_config(OpenBaoLess(write_secret(tmp_path / "t", "s.x\n")).cfg)
    with pytest.raises(SealUnreachable):
        seal.wrap(KEY, AAD)


def test_engine_down_then_started_later(openbao_factory: Factory) -> None:
    # The token file and port exist before the server does, as for a daemon started first.
    bao = openbao_factory(start=False)
    seal = TransitSeal.from_config(bao.seal_config(timeout_seconds=2.0))
    started = time.monotonic()
    with pytest.raises(SealUnreachable, match="cannot reach the engine"):
        seal.wrap(KEY, AAD)
    assert time.monotonic() - started < 2.0
    bao.start()
    wrapped = seal.wrap(KEY, AAD)
    assert seal.unwrap(wrapped, AAD) == KEY

    bao.stop()
    started = time.monotonic()
    with pytest.raises(SealUnreachable):
        seal.unwrap(wrapped, AAD)
    assert time.monotonic() - started < 2.0

    # Up again: dev mode kept nothing, so this is a new engine with a new key. A new seal
    # works against it; what was wrapped before is gone (expected in dev mode only).
    bao.start()
    fresh = TransitSeal.from_config(bao.seal_config())
    assert fresh.unwrap(fresh.wrap(KEY, AAD), AAD) == KEY
    with pytest.raises(SealError) as info:
        fresh.unwrap(wrapped, AAD)
    assert not isinstance(info.value, SealUnreachable)


def test_engine_that_never_answers_times_out(tmp_path: Path) -> None:
    # A listener that accepts and then says nothing: the read timeout must fire.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        cfg = OpenBaoLess(write_secret(tmp_path / "t", "s.x\n"), port=port, timeout=0.3).cfg
        seal = TransitSeal.from_config(cfg)
        started = time.monotonic()
        with pytest.raises(SealUnreachable, match=r"no answer within 0\.3 s"):
            seal.wrap(KEY, AAD)
        assert time.monotonic() - started < 2.0


def test_token_file_is_reread_on_each_call(bao: OpenBao, tmp_path: Path) -> None:
    path = write_secret(tmp_path / "t", "s.wrong\n")
    seal = TransitSeal.from_config(bao.seal_config(token_file=path))
    with pytest.raises(SealError, match="permission denied"):
        seal.wrap(KEY, AAD)
    write_secret(path, bao.seal_token)  # e.g. an agent rotating the token; no newline is fine too
    assert seal.unwrap(seal.wrap(KEY, AAD), AAD) == KEY


def test_thread_safe(seal: TransitSeal) -> None:
    keys = [os.urandom(32) for _ in range(32)]
    start = threading.Barrier(8)

    def work(key: bytes) -> bytes:
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(timeout=5)  # the first eight calls race each other
        return seal.unwrap(seal.wrap(key, AAD), AAD)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, keys)) == keys


def test_load_or_create_with_sqlite(seal: TransitSeal, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "faceseal.db")
    try:
        first = load_or_create(store, seal)
        second = load_or_create(store, seal)
        assert second.index_key.reveal() == first.index_key.reveal()
        assert second.versions() == first.versions() == [1]
        assert {v: k.reveal() for v, k in second.data_keys.items()} == {
            v: k.reveal() for v, k in first.data_keys.items()
        }
        for item in store.wrapped_keys():
            assert item.wrapped.startswith(b"\x01vault:v1:")
            assert first.index_key.reveal() not in item.wrapped
    finally:
        store.close()


class OpenBaoLess:
    """A TransitSealConfig for tests that need no server (nothing listens on the port)."""

    def __init__(self, token_file: Path, *, port: int | None = None, timeout: float = 1.0) -> None:
        self.cfg = TransitSealConfig(
            address=f"http://127.0.0.1:{port or free_port()}",
            key_name="faceseal",
            token_file=token_file,
            timeout_seconds=timeout,
        )
