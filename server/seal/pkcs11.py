"""The PKCS#11 seal: the KEK is a non-extractable AES-256 key object inside a token (an HSM).

The daemon never holds the KEK. It asks the token to encrypt a 32-byte data key with
``CKM_AES_GCM`` under the key object, passing a fresh random 96-bit IV and the caller's ``aad`` as
GCM associated data, and stores::

    format byte 0x11 | KEK version (4 bytes, big-endian) | 12-byte IV | ciphertext + 16-byte tag

Unwrapping asks the token to decrypt with the KEK version the wrapped key names; a wrong ``aad``,
another KEK or a flipped bit fails the GCM tag check inside the token. The format byte differs
from the file and Transit seals', so a key wrapped by another kind of seal is reported as such.

KEK versions are secret-key objects that share the configured key label and carry their version
number in ``CKA_ID`` (4 bytes, big-endian; :func:`create_kek` makes version 1). ``wrap`` uses the
highest version. ``rotate`` generates the next version in the token; ``retire_previous``
destroys every lower one, which is what makes crypto-shredding reach old backups. Every version
must be an AES-256 key with ``CKA_SENSITIVE`` true and ``CKA_EXTRACTABLE`` false, allowed to
encrypt and decrypt; the seal refuses any other key under its label (a KEK an operator could
export would defeat the point). An operator creating the key with another tool must set these
attributes and ``CKA_ID`` = ``00000001``.

Session handling:

* The module is loaded at construction (a missing or broken module is a configuration error),
  but the token is only contacted on first use, so the daemon can start sealed while the HSM is
  down and retry.
* One read-only session, guarded by a lock (rotation and retirement open a short read/write
  session beside it). When an operation fails because the session, the login or the device went
  away, the seal reopens the session once and retries; a second failure is ``SealUnreachable``.
* PKCS#11 login is per application, not per session: when another session of this process is
  already logged in to the token, the seal shares that login (and the PIN is not re-checked).
  Closing a seal that logged in logs the whole process out; other seals then log in again.
* A PIN the token refuses is not tried again by this seal object: the daemon's unseal loop
  retries forever, and most HSMs lock the user PIN after a few wrong attempts. Fix the PIN file
  and restart the daemon to build a new seal.

Error messages name the module, the token, the key label and the PKCS#11 error class, never the
PIN. Some HSMs (FIPS mode) refuse a caller-chosen GCM IV; this seal needs a token that accepts
one (SoftHSM2 does).
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11e
from pkcs11.types import DecryptMixin, EncryptMixin, Object, Session, Token

from faceseal.server.config import Pkcs11SealConfig
from faceseal.server.seal.base import SealError, SealUnreachable

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib  # noqa: N812 (the class is lowercase upstream)

_FORMAT = b"\x11"
_VERSION = struct.Struct(">I")
_IV = 12
_TAG = 16
_HEADER = 1 + _VERSION.size + _IV
_KEY_BITS = 256
_MAX_PIN_FILE = 4096

_T = TypeVar("_T")

# The session, its login or the device went away: reopening the session may help.
_SESSION_LOST: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.UserNotLoggedIn,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
)
# The token cannot serve us right now: retrying later may work.
_BUSY: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.SessionCount,
    p11e.HostMemory,
    p11e.FunctionFailed,
    p11e.GeneralError,
)
_PIN_REFUSED: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.PinIncorrect,
    p11e.PinInvalid,
    p11e.PinLenRange,
    p11e.PinLocked,
    p11e.PinExpired,
    p11e.UserPinNotInitialized,
)
_KEK_ATTRIBUTES = [
    Attribute.ID,
    Attribute.KEY_TYPE,
    Attribute.VALUE_LEN,
    Attribute.SENSITIVE,
    Attribute.EXTRACTABLE,
]


def _lost(exc: p11e.PKCS11Error) -> bool:
    # CKR_CRYPTOKI_NOT_INITIALIZED (the module was finalised under us) has no subclass of its own.
    return isinstance(exc, _SESSION_LOST) or type(exc) is p11e.PKCS11Error


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def read_pin(path: Path) -> str:
    """The PIN in ``path`` (one trailing newline stripped); refused when group or others can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SealError(f"cannot open the PIN file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SealError(f"the PIN file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise SealError(
                f"the PIN file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        data = os.read(fd, _MAX_PIN_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_PIN_FILE:
        raise SealError(f"the PIN file {path} is too large to hold a PIN")
    try:
        pin = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SealError(f"the PIN file {path} is not UTF-8 text") from None
    if pin.endswith("\r\n"):
        pin = pin[:-2]
    elif pin.endswith("\n"):
        pin = pin[:-1]
    if not pin:
        raise SealError(f"the PIN file {path} is empty")
    return pin


def _module_key(module: Path | str) -> str:
    # python-pkcs11 keeps one initialised instance per path string, and a second C_Initialize of
    # the same library fails: name the module the same way however the config spelled it.
    return os.path.realpath(module)


def load_module(module: Path | str) -> Pkcs11Lib:
    """Load (or reuse) the PKCS#11 module; every user in the process must load it through here."""
    try:
        return pkcs11.lib(_module_key(module))
    except p11e.PKCS11Error as exc:
        # The loader's message names the file and the dlopen error, nothing secret.
        raise SealError(f"cannot load the PKCS#11 module {module}: {exc}") from None


def _open_session(token: Token, pin: str, *, rw: bool) -> Session:
    """Open a session logged in as the user, sharing the process's login if it already has one."""
    try:
        return token.open(rw=rw, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        return token.open(rw=rw)


def _close_quietly(session: Session) -> None:
    with contextlib.suppress(p11e.PKCS11Error):  # the session or the device is already gone
        session.close()


def _find_objects(session: Session, key_label: str) -> list[Object]:
    return list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_label}))


def _version_of(obj: Object, where: str) -> int:
    """The KEK version of one key object under the seal's label, after checking it qualifies."""
    attrs = obj.get_attributes(_KEK_ATTRIBUTES)
    key_id = attrs.get(Attribute.ID)
    if not isinstance(key_id, bytes) or len(key_id) != _VERSION.size or _VERSION.unpack(key_id)[0] == 0:
        raise SealError(
            f"{where}: a key with this label has no version in CKA_ID (4 bytes, big-endian, from 1); "
            "create keys with faceseal.server.seal.pkcs11.create_kek"
        )
    version: int = _VERSION.unpack(key_id)[0]
    if attrs.get(Attribute.KEY_TYPE) != KeyType.AES or attrs.get(Attribute.VALUE_LEN) != _KEY_BITS // 8:
        raise SealError(f"{where}: KEK version {version} is not an AES-256 key")
    if attrs.get(Attribute.SENSITIVE) is not True or attrs.get(Attribute.EXTRACTABLE) is not False:
        raise SealError(
            f"{where}: KEK version {version} is extractable or not sensitive; the seal only uses a key "
            "that cannot leave the token"
        )
    return version


def _versions(session: Session, key_label: str, where: str) -> dict[int, Object]:
    found: dict[int, Object] = {}
    for obj in _find_objects(session, key_label):
        version = _version_of(obj, where)
        if version in found:
            raise SealError(f"{where}: two keys carry KEK version {version}")
        found[version] = obj
    return found


def _generate(session: Session, key_label: str, version: int) -> None:
    session.generate_key(
        KeyType.AES,
        _KEY_BITS,
        id=_VERSION.pack(version),
        label=key_label,
        store=True,
        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        },
    )


@dataclass(frozen=True, slots=True)
class _Kek:
    encrypt: EncryptMixin
    decrypt: DecryptMixin


@dataclass(slots=True)
class _Handle:
    """The open session and the KEK versions found through it."""

    session: Session
    keks: dict[int, _Kek] = field(default_factory=dict)


class Pkcs11Seal:
    """AES-256-GCM key wrapping by non-extractable key objects in a PKCS#11 token."""

    def __init__(self, module: Path, token_label: str, key_label: str, pin: str, pin_file: Path) -> None:
        self._module = module
        self._token_label = token_label
        self._key_label = key_label
        self._pin = pin
        self._pin_file = pin_file
        self._lock = threading.Lock()
        self._handle: _Handle | None = None
        self._pin_refused: str | None = None
        load_module(module)

    @classmethod
    def from_config(cls, cfg: Pkcs11SealConfig) -> Pkcs11Seal:
        """Read the PIN file and load the module; the token is contacted on first use."""
        return cls(cfg.module, cfg.token_label, cfg.key_label, read_pin(cfg.pin_file), cfg.pin_file)

    # -- the Seal protocol ---------------------------------------------------------------------

    def describe(self) -> str:
        return f"pkcs11:{self._module} token={self._token_label!r} key={self._key_label!r}"

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        def encrypt(handle: _Handle) -> bytes:
            iv = os.urandom(_IV)  # drawn per attempt: a retry never repeats an IV
            version = max(handle.keks)
            out = handle.keks[version].encrypt.encrypt(
                key, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, _TAG * 8)
            )
            if not isinstance(out, bytes) or len(out) != len(key) + _TAG:
                raise SealError(f"{self._where()}: the token returned a malformed AES-GCM ciphertext")
            return _FORMAT + _VERSION.pack(version) + iv + out

        try:
            return self._call(encrypt)
        except p11e.PKCS11Error as exc:
            raise SealError(f"{self._where()}: the token refused to wrap a key ({_name(exc)})") from None

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < _HEADER + _TAG or wrapped[:1] != _FORMAT:
            raise SealError("a wrapped key is malformed (or was wrapped by another kind of seal)")
        (version,) = _VERSION.unpack_from(wrapped, 1)
        iv, ciphertext = wrapped[1 + _VERSION.size : _HEADER], wrapped[_HEADER:]

        def decrypt(handle: _Handle) -> bytes:
            kek = handle.keks.get(version)
            if kek is None:  # perhaps another daemon on this token rotated: look again, once
                self._rescan(handle)
                kek = handle.keks.get(version)
            if kek is None:
                raise SealError(
                    f"{self._where()}: a wrapped key names KEK version {version}, which the token "
                    "does not hold (retired, or another key label)"
                )
            out = kek.decrypt.decrypt(
                ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, _TAG * 8)
            )
            if not isinstance(out, bytes):
                raise SealError(f"{self._where()}: the token returned a malformed plaintext")
            return out

        try:
            return self._call(decrypt)
        except p11e.PKCS11Error:
            # SoftHSM2 reports a failed GCM tag as CKR_GENERAL_ERROR, others as
            # CKR_ENCRYPTED_DATA_INVALID or CKR_FUNCTION_FAILED: all mean "does not open".
            raise SealError(
                f"{self._where()}: the HSM key does not open this keyring "
                "(wrong key or token, or the keyring was altered)"
            ) from None

    def rotate(self) -> None:
        """Generate the next KEK version in the token; ``wrap`` uses it from now on."""

        def generate(handle: _Handle) -> None:
            with self._rw_session(handle) as rw:
                current = _versions(rw, self._key_label, self._where())
                _generate(rw, self._key_label, max(current, default=0) + 1)
            self._rescan(handle)

        try:
            self._call(generate)
        except p11e.PKCS11Error as exc:
            raise SealError(f"{self._where()}: the token refused to create a KEK version ({_name(exc)})") from None

    def retire_previous(self) -> None:
        """Destroy every KEK version but the newest. Idempotent: after a crash, call it again."""

        def destroy(handle: _Handle) -> None:
            with self._rw_session(handle) as rw:
                current = _versions(rw, self._key_label, self._where())
                if not current:
                    raise SealError(f"{self._where()}: no KEK in the token")
                newest = max(current)
                for version, obj in current.items():
                    if version != newest:
                        obj.destroy()
            self._rescan(handle)

        try:
            self._call(destroy)
        except p11e.PKCS11Error as exc:
            raise SealError(f"{self._where()}: the token refused to destroy old KEK versions ({_name(exc)})") from None

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the session (logging out if this seal logged in). The next call reopens it."""
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        return (
            f"Pkcs11Seal(module={str(self._module)!r}, token_label={self._token_label!r}, "
            f"key_label={self._key_label!r}, pin_file={str(self._pin_file)!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a seal holds a PIN and is not serialisable")

    # -- internals -----------------------------------------------------------------------------

    def _where(self) -> str:
        return f"PKCS#11 token {self._token_label!r} key {self._key_label!r}"

    def _call(self, operation: Callable[[_Handle], _T]) -> _T:
        """Run ``operation`` on the session, reopening it once if it was lost.

        Session trouble becomes SealError/SealUnreachable; other PKCS11Errors propagate for the
        caller to describe.
        """
        with self._lock:
            for attempt in (1, 2):
                handle = self._handle or self._open()
                try:
                    return operation(handle)
                except p11e.PKCS11Error as exc:
                    if not _lost(exc):
                        raise
                    self._drop()
                    if attempt == 2:
                        raise SealUnreachable(
                            f"{self._where()}: the token stopped answering ({_name(exc)}); will retry"
                        ) from None
        raise AssertionError("unreachable")

    def _open(self) -> _Handle:
        """Open a session and find the KEK versions. Called with the lock held."""
        if self._pin_refused is not None:
            raise SealError(self._pin_refused)
        try:
            token = load_module(self._module).get_token(token_label=self._token_label)
        except p11e.MultipleTokensReturned:
            raise SealError(
                f"more than one PKCS#11 token is labelled {self._token_label!r} in {self._module}"
            ) from None
        except p11e.NoSuchToken:
            raise SealUnreachable(
                f"no PKCS#11 token labelled {self._token_label!r} in {self._module} (not plugged in, "
                "not initialised, or the label is wrong); will retry"
            ) from None
        except p11e.PKCS11Error as exc:
            raise SealUnreachable(
                f"the PKCS#11 module {self._module} cannot list its tokens ({_name(exc)}); will retry"
            ) from None
        try:
            if token.flags & TokenFlag.USER_PIN_LOCKED:
                self._refuse_pin("the token has locked its user PIN; a security officer must reset it")
            session = _open_session(token, self._pin, rw=False)
        except _PIN_REFUSED as exc:
            self._refuse_pin(f"the token refused the PIN from {self._pin_file} ({_name(exc)})")
        except p11e.PKCS11Error as exc:
            raise SealUnreachable(f"{self._where()}: cannot open a session ({_name(exc)}); will retry") from None
        handle = _Handle(session)
        try:
            self._rescan(handle)
        except p11e.PKCS11Error as exc:
            _close_quietly(session)
            if _lost(exc) or isinstance(exc, _BUSY):
                raise SealUnreachable(f"{self._where()}: cannot read the keys ({_name(exc)}); will retry") from None
            raise SealError(f"{self._where()}: cannot read the keys ({_name(exc)})") from None
        except BaseException:
            _close_quietly(session)
            raise
        self._handle = handle
        return handle

    def _rescan(self, handle: _Handle) -> None:
        """Find the KEK versions under the label again (after a rotation, here or elsewhere)."""
        keks: dict[int, _Kek] = {}
        for version, obj in _versions(handle.session, self._key_label, self._where()).items():
            if not isinstance(obj, EncryptMixin) or not isinstance(obj, DecryptMixin):
                raise SealError(f"{self._where()}: KEK version {version} may not encrypt and decrypt")
            keks[version] = _Kek(obj, obj)
        if not keks:
            raise SealError(f"{self._where()}: no secret key with this label in the token")
        handle.keks = keks

    @contextlib.contextmanager
    def _rw_session(self, handle: _Handle) -> Iterator[Session]:
        session = _open_session(handle.session.token, self._pin, rw=True)
        try:
            yield session
        finally:
            _close_quietly(session)

    def _refuse_pin(self, why: str) -> NoReturn:
        self._pin_refused = (
            f"{self._where()}: {why}; not trying the PIN again (it could lock the token): "
            "fix the PIN file and restart the daemon"
        )
        raise SealError(self._pin_refused)

    def _drop(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _close_quietly(handle.session)


def create_kek(module: Path | str, token_label: str, key_label: str, pin: str) -> None:
    """Generate KEK version 1 in the token: AES-256, sensitive, never extractable, encrypt/decrypt only.

    Refuses when a secret key with ``key_label`` already exists: a second key would become a
    KEK version of its own, and replacing one would orphan every keyring it wraps (rotate with
    the admin service instead). Raises SealError; messages never contain the PIN.
    """
    where = f"PKCS#11 token {token_label!r} key {key_label!r}"
    lib = load_module(module)
    try:
        token = lib.get_token(token_label=token_label)
    except p11e.PKCS11Error as exc:
        raise SealError(f"cannot find the PKCS#11 token {token_label!r} in {module} ({_name(exc)})") from None
    try:
        session = _open_session(token, pin, rw=True)
    except p11e.PKCS11Error as exc:
        raise SealError(f"{where}: cannot log in to the token ({_name(exc)})") from None
    try:
        if _find_objects(session, key_label):
            raise SealError(f"{where}: a secret key with this label already exists; not creating another")
        _generate(session, key_label, 1)
    except p11e.PKCS11Error as exc:
        raise SealError(f"{where}: the token refused to create the key ({_name(exc)})") from None
    finally:
        _close_quietly(session)
