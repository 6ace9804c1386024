"""The PKCS#11 seal against a real SoftHSM2 token (tests/softhsm.py)."""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e

from faceseal.server.config import Pkcs11SealConfig
from faceseal.server.crypto.vault import add_version, load_or_create, retire_version, wrap_aad
from faceseal.server.errors import ConfigError
from faceseal.server.seal import seal_from_config
from faceseal.server.seal.base import SealError, SealUnreachable
from faceseal.server.seal.pkcs11 import Pkcs11Seal, create_kek, load_module, read_pin
from faceseal.server.store.sqlite import SQLiteStore

try:
    from tests.softhsm import SoftHsmToken, softhsm_token
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): only tests/ is on sys.path
    from softhsm import SoftHsmToken, softhsm_token  # type: ignore[no-redef] # noqa: F401

KEY = bytes(range(32))
AAD = wrap_aad("data", 1)


def config(token: SoftHsmToken, key_label: str, **overrides: object) -> Pkcs11SealConfig:
    values: dict[str, object] = {
        "module": token.module,
        "token_label": token.token_label,
        "key_label": key_label,
        "pin_file": token.pin_file,
    }
    values.update(overrides)
    return Pkcs11SealConfig(**values)  # type: ignore[arg-type]


def make_seal(token: SoftHsmToken, key_label: str) -> Pkcs11Seal:
    return Pkcs11Seal.from_config(config(token, key_label))


def pin_file(directory: Path, content: str, mode: int = 0o600) -> Path:
    path = directory / "other.pin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(content)
    os.chmod(path, mode)
    return path


@contextlib.contextmanager
def user_session(token: SoftHsmToken, *, rw: bool = False) -> Iterator[pkcs11.types.Session]:
    """A session of our own on the token, logged in as the user (sharing a login already made)."""
    tok = load_module(token.module).get_token(token_label=token.token_label)
    try:
        session = tok.open(rw=rw, user_pin=token.pin)
    except p11e.UserAlreadyLoggedIn:
        session = tok.open(rw=rw)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def kek(softhsm_token: SoftHsmToken) -> str:
    """A fresh KEK label in the session's token."""
    return softhsm_token.new_kek()


# -- wrapping ----------------------------------------------------------------------------------


def test_round_trip(softhsm_token: SoftHsmToken, kek: str) -> None:
    seal = make_seal(softhsm_token, kek)
    wrapped = seal.wrap(KEY, AAD)
    assert wrapped[:1] == b"\x11"
    assert wrapped[1:5] == (1).to_bytes(4, "big")  # KEK version 1
    assert len(wrapped) == 1 + 4 + 12 + len(KEY) + 16
    assert KEY not in wrapped
    assert seal.unwrap(wrapped, AAD) == KEY
    again = seal.wrap(KEY, AAD)
    assert again != wrapped  # a fresh IV each time
    assert seal.unwrap(again, AAD) == KEY


def test_wrong_aad_fails(softhsm_token: SoftHsmToken, kek: str) -> None:
    seal = make_seal(softhsm_token, kek)
    wrapped = seal.wrap(KEY, AAD)
    with pytest.raises(SealError, match="does not open") as info:
        seal.unwrap(wrapped, wrap_aad("data", 2))
    assert not isinstance(info.value, SealUnreachable)
    with pytest.raises(SealError):
        seal.unwrap(wrapped, wrap_aad("index", 1))
    assert seal.unwrap(wrapped, AAD) == KEY  # the session survives a failed tag check


@pytest.mark.parametrize("index", [0, 4, 10, 20, -1])
def test_tampered_wrapped_key_fails(softhsm_token: SoftHsmToken, kek: str, index: int) -> None:
    seal = make_seal(softhsm_token, kek)
    wrapped = bytearray(seal.wrap(KEY, AAD))
    wrapped[index] ^= 0x01
    with pytest.raises(SealError):
        seal.unwrap(bytes(wrapped), AAD)


def test_malformed_wrapped_key(softhsm_token: SoftHsmToken, kek: str) -> None:
    seal = make_seal(softhsm_token, kek)
    for bad in (b"", b"\x11", b"\x01" + bytes(60), seal.wrap(KEY, AAD)[:32]):
        with pytest.raises(SealError, match="malformed"):
            seal.unwrap(bad, AAD)


def test_another_kek_does_not_unwrap(softhsm_token: SoftHsmToken) -> None:
    first = make_seal(softhsm_token, softhsm_token.new_kek("first"))
    second = make_seal(softhsm_token, softhsm_token.new_kek("second"))
    wrapped = first.wrap(KEY, AAD)
    with pytest.raises(SealError, match="does not open"):
        second.unwrap(wrapped, AAD)
    assert first.unwrap(wrapped, AAD) == KEY
    assert second.unwrap(second.wrap(KEY, AAD), AAD) == KEY


def test_file_seal_output_is_not_mistaken(softhsm_token: SoftHsmToken, kek: str, tmp_path: Path) -> None:
    from faceseal.server.seal.file import FileSeal

    key_file = tmp_path / "seal.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    with pytest.raises(SealError, match="another kind of seal"):
        make_seal(softhsm_token, kek).unwrap(FileSeal(key_file).wrap(KEY, AAD), AAD)


# -- the KEK stays in the token ----------------------------------------------------------------


def test_create_kek_makes_a_key_that_cannot_leave_the_token(softhsm_token: SoftHsmToken, kek: str) -> None:
    with user_session(softhsm_token) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=kek)
        assert key.key_type == KeyType.AES
        assert key[Attribute.VALUE_LEN] == 32
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.PRIVATE] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.ID] == (1).to_bytes(4, "big")
        for capability in (Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN, Attribute.DERIVE):
            assert key[capability] is False
        # The value itself is not readable: nothing we write can contain it.
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
        assert Attribute.VALUE not in _readable(key)


def _readable(key: pkcs11.types.Object) -> set[Attribute]:
    readable = set()
    for attribute in (Attribute.VALUE, Attribute.LABEL, Attribute.ID):
        with contextlib.suppress(p11e.AttributeSensitive, p11e.AttributeTypeInvalid):
            key[attribute]
            readable.add(attribute)
    return readable


def test_kek_export_is_refused(softhsm_token: SoftHsmToken, kek: str) -> None:
    with user_session(softhsm_token, rw=True) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=kek)
        # An export key of our own, session-only: the token must still refuse to wrap the KEK out.
        exporter = session.generate_key(
            KeyType.AES, 256, label="exporter", capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
        )
        for mechanism in (Mechanism.AES_KEY_WRAP_PAD, Mechanism.AES_KEY_WRAP):
            with pytest.raises((p11e.KeyUnextractable, p11e.KeyNotWrappable)):
                exporter.wrap_key(key, mechanism=mechanism)
        # ...and the flags that keep it in cannot be turned off.
        with pytest.raises(p11e.AttributeReadOnly):
            key[Attribute.EXTRACTABLE] = True
        with pytest.raises(p11e.AttributeReadOnly):
            key[Attribute.SENSITIVE] = False
        # A copy cannot be made extractable either.
        with pytest.raises(p11e.PKCS11Error):
            key.copy({Attribute.EXTRACTABLE: True, Attribute.TOKEN: False})
        assert key[Attribute.EXTRACTABLE] is False


def test_create_kek_refuses_an_existing_label(softhsm_token: SoftHsmToken, kek: str) -> None:
    t = softhsm_token
    with pytest.raises(SealError, match="already exists") as info:
        create_kek(t.module, t.token_label, kek, t.pin)
    assert t.pin not in str(info.value)
    with user_session(t) as session:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: kek}))
    assert len(keys) == 1


def test_an_extractable_key_is_refused(softhsm_token: SoftHsmToken) -> None:
    label = softhsm_token.new_label("extractable")
    with user_session(softhsm_token, rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            id=(1).to_bytes(4, "big"),
            label=label,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True},
        )
    with pytest.raises(SealError, match="extractable") as info:
        make_seal(softhsm_token, label).wrap(KEY, AAD)
    assert not isinstance(info.value, SealUnreachable)


def test_a_key_without_a_version_id_is_refused(softhsm_token: SoftHsmToken) -> None:
    label = softhsm_token.new_label("noid")
    with user_session(softhsm_token, rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True},
        )
    with pytest.raises(SealError, match="CKA_ID"):
        make_seal(softhsm_token, label).wrap(KEY, AAD)


# -- PIN, configuration, reachability ----------------------------------------------------------


def test_wrong_pin(softhsm_token: SoftHsmToken, kek: str, tmp_path: Path) -> None:
    wrong = "wrong-pin-" + os.urandom(6).hex()
    seal = Pkcs11Seal.from_config(config(softhsm_token, kek, pin_file=pin_file(tmp_path, wrong + "\n")))
    for _ in range(2):  # the second attempt does not try the PIN on the token again
        with pytest.raises(SealError) as info:
            seal.wrap(KEY, AAD)
        message = str(info.value)
        assert not isinstance(info.value, SealUnreachable)
        assert "refused the PIN" in message
        assert "not trying the PIN again" in message
        assert wrong not in message
        assert softhsm_token.pin not in message
        assert wrong not in repr(seal)
    # The right PIN still works: the wrong one was tried once only.
    assert make_seal(softhsm_token, kek).unwrap(make_seal(softhsm_token, kek).wrap(KEY, AAD), AAD) == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_group_or_world_readable_pin_file_is_refused(
    softhsm_token: SoftHsmToken, kek: str, tmp_path: Path, mode: int
) -> None:
    path = pin_file(tmp_path, softhsm_token.pin + "\n", mode)
    with pytest.raises(SealError, match="readable by group or others") as info:
        Pkcs11Seal.from_config(config(softhsm_token, kek, pin_file=path))
    assert softhsm_token.pin not in str(info.value)
    with pytest.raises(ConfigError, match="chmod 600") as config_info:
        seal_from_config(config(softhsm_token, kek, pin_file=path), Path("/etc/faceseal/faceseal.toml"))
    assert str(path) in str(config_info.value)
    assert softhsm_token.pin not in str(config_info.value)


def test_missing_pin_file_and_module_are_config_errors(softhsm_token: SoftHsmToken, kek: str, tmp_path: Path) -> None:
    source = Path("/etc/faceseal/faceseal.toml")
    with pytest.raises(ConfigError, match="PIN file"):
        seal_from_config(config(softhsm_token, kek, pin_file=tmp_path / "absent.pin"), source)
    with pytest.raises(ConfigError, match="PKCS#11 module"):
        seal_from_config(config(softhsm_token, kek, module=tmp_path / "libabsent.so"), source)


def test_read_pin_strips_one_newline(tmp_path: Path) -> None:
    assert read_pin(pin_file(tmp_path, "1234\n")) == "1234"
    assert read_pin(pin_file(tmp_path, "1234\r\n")) == "1234"
    assert read_pin(pin_file(tmp_path, "1234")) == "1234"
    assert read_pin(pin_file(tmp_path, "12 34\n\n")) == "12 34\n"
    with pytest.raises(SealError, match="empty"):
        read_pin(pin_file(tmp_path, "\n"))


def test_seal_from_config_and_describe(softhsm_token: SoftHsmToken, kek: str) -> None:
    seal = seal_from_config(config(softhsm_token, kek), Path("/etc/faceseal/faceseal.toml"))
    assert isinstance(seal, Pkcs11Seal)
    description = seal.describe()
    assert description.startswith("pkcs11:")
    assert kek in description
    assert softhsm_token.token_label in description
    for text in (description, repr(seal), str(seal)):
        assert softhsm_token.pin not in text
    with pytest.raises(TypeError):
        pickle.dumps(seal)


def test_token_not_reachable_at_construction(softhsm_token: SoftHsmToken, kek: str) -> None:
    # The daemon starts sealed: construction does not need the token, the first use does.
    seal = Pkcs11Seal.from_config(config(softhsm_token, kek, token_label="not-plugged-in"))
    with pytest.raises(SealUnreachable, match="not-plugged-in") as info:
        seal.wrap(KEY, AAD)
    assert softhsm_token.pin not in str(info.value)


def test_missing_key_label(softhsm_token: SoftHsmToken) -> None:
    seal = make_seal(softhsm_token, softhsm_token.new_label("absent"))
    with pytest.raises(SealError, match="no secret key with this label"):
        seal.wrap(KEY, AAD)


# -- sessions ----------------------------------------------------------------------------------


def test_reopens_the_session_after_the_module_was_reset(softhsm_token: SoftHsmToken, kek: str) -> None:
    seal = make_seal(softhsm_token, kek)
    wrapped = seal.wrap(KEY, AAD)
    load_module(softhsm_token.module).reinitialize()  # every session of the process is gone
    assert seal.unwrap(wrapped, AAD) == KEY
    assert seal.unwrap(seal.wrap(KEY, AAD), AAD) == KEY


def test_one_seal_closing_does_not_break_another(softhsm_token: SoftHsmToken, kek: str) -> None:
    # PKCS#11 logins are per process: the first seal logs in, the second shares that login, and
    # the first one's logout (on close) must not leave the second stuck.
    first, second = make_seal(softhsm_token, kek), make_seal(softhsm_token, kek)
    wrapped = first.wrap(KEY, AAD)
    assert second.unwrap(wrapped, AAD) == KEY
    first.close()
    assert second.unwrap(wrapped, AAD) == KEY
    assert first.unwrap(second.wrap(KEY, AAD), AAD) == KEY
    second.close()
    first.close()


def test_thread_safe(softhsm_token: SoftHsmToken, kek: str) -> None:
    seal = make_seal(softhsm_token, kek)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(25):
                key = bytes([n, i]) * 16
                aad = wrap_aad("data", n * 100 + i)
                assert seal.unwrap(seal.wrap(key, aad), aad) == key
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


# -- KEK rotation and the keyring --------------------------------------------------------------


def test_rotate_and_retire(softhsm_token: SoftHsmToken, kek: str) -> None:
    seal = make_seal(softhsm_token, kek)
    old = seal.wrap(KEY, AAD)
    seal.rotate()
    new = seal.wrap(KEY, AAD)
    assert new[1:5] == (2).to_bytes(4, "big")
    assert seal.unwrap(old, AAD) == KEY
    assert seal.unwrap(new, AAD) == KEY
    # Another seal on the same label sees the new version too.
    assert make_seal(softhsm_token, kek).unwrap(new, AAD) == KEY
    seal.retire_previous()
    with pytest.raises(SealError, match="version 1"):
        seal.unwrap(old, AAD)
    with pytest.raises(SealError, match="version 1"):
        make_seal(softhsm_token, kek).unwrap(old, AAD)
    assert seal.unwrap(new, AAD) == KEY
    seal.retire_previous()  # idempotent
    assert seal.unwrap(new, AAD) == KEY
    with user_session(softhsm_token) as session:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: kek}))
        assert [k[Attribute.ID] for k in keys] == [(2).to_bytes(4, "big")]
        assert keys[0][Attribute.EXTRACTABLE] is False
        with pytest.raises(p11e.AttributeSensitive):
            keys[0][Attribute.VALUE]


def test_vault_keyring_round_trip(softhsm_token: SoftHsmToken, kek: str, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "faceseal.db")
    try:
        first = load_or_create(store, make_seal(softhsm_token, kek))
        again = load_or_create(store, make_seal(softhsm_token, kek))
        assert again.data_keys[1].reveal() == first.data_keys[1].reveal()
        assert again.index_key.reveal() == first.index_key.reveal()
        for item in store.wrapped_keys():
            assert first.data_keys[1].reveal() not in item.wrapped
            assert first.index_key.reveal() not in item.wrapped
    finally:
        store.close()


def test_vault_retire_version_shreds_old_backups(softhsm_token: SoftHsmToken, kek: str, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "faceseal.db")
    try:
        seal = make_seal(softhsm_token, kek)
        keyring = add_version(store, seal, load_or_create(store, seal))
        backup = {(k.purpose, k.version): k.wrapped for k in store.wrapped_keys()}
        remaining = retire_version(store, seal, keyring, 1)
        reopened = load_or_create(store, make_seal(softhsm_token, kek))
        assert reopened.versions() == [2]
        assert reopened.data_keys[2].reveal() == remaining.data_keys[2].reveal()
        # The backup's keyring was wrapped under KEK version 1, which the token destroyed.
        with pytest.raises(SealError, match="version 1"):
            seal.unwrap(backup[("data", 1)], wrap_aad("data", 1))
    finally:
        store.close()
