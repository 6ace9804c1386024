"""The dev file seal: a 32-byte KEK in a file beside the daemon.

Dev only, and named so: the KEK sits on the same machine as the data it protects, so a disk
thief who takes both gets everything. The config refuses it outside ``mode = "dev"``. The file
is read once at construction, refused when group or world can read it, and its bytes are never
formatted into a message.

KEK rotation (for crypto-shredding) writes the new key to ``<key_file>.next`` first and renames
it over ``<key_file>`` only in ``retire_previous``, after the keyring was re-wrapped; a crash in
between leaves both files, and both are loaded at the next start. Each wrapped key names its KEK
by a key id (the first 8 bytes of SHA-256 of the KEK), so unwrap picks the right one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from faceseal.server.seal.base import SealError

_FORMAT = b"\x02"
_KEY_ID = 8
_NONCE = 12
_HEADER = 1 + _KEY_ID + _NONCE


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"faceseal/file-seal/key-id\0" + key).digest()[:_KEY_ID]


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SealError(f"cannot open the seal key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SealError(f"the seal key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise SealError(
                f"the seal key file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(data) != 32:
        raise SealError(f"the seal key file {path} must hold exactly 32 bytes")
    return data


class FileSeal:
    """AES-256-GCM key wrapping under a key read from a 0600 file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._next = path.with_name(path.name + ".next")
        self._lock = threading.Lock()
        self._keys: dict[bytes, AESGCM] = {}
        current = _read_key(path)
        self._newest = _key_id(current)
        self._keys[self._newest] = AESGCM(current)
        if self._next.exists():  # a rotation was interrupted: both KEKs may be in use
            pending = _read_key(self._next)
            self._newest = _key_id(pending)
            self._keys[self._newest] = AESGCM(pending)
        del current

    def describe(self) -> str:
        return f"file:{self._path}"

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        with self._lock:
            kid, aead = self._newest, self._keys[self._newest]
        return _FORMAT + kid + nonce + aead.encrypt(nonce, key, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < _HEADER + 16 or wrapped[:1] != _FORMAT:
            raise SealError("a wrapped key is malformed")
        with self._lock:
            aead = self._keys.get(wrapped[1 : 1 + _KEY_ID])
        if aead is None:
            raise SealError(
                "a wrapped key names a key-encryption key this seal does not hold (retired, or another key file)"
            )
        try:
            return aead.decrypt(wrapped[1 + _KEY_ID : _HEADER], wrapped[_HEADER:], aad)
        except InvalidTag:
            raise SealError("the seal key does not open this keyring (the keyring was altered)") from None

    def rotate(self) -> None:
        key = secrets.token_bytes(32)
        with self._lock:
            self._next.unlink(missing_ok=True)
            fd = os.open(self._next, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._newest = _key_id(key)
            self._keys[self._newest] = AESGCM(key)

    def retire_previous(self) -> None:
        with self._lock:
            if self._next.exists():
                os.replace(self._next, self._path)
                dir_fd = os.open(self._path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            self._keys = {self._newest: self._keys[self._newest]}

    def __repr__(self) -> str:
        return f"FileSeal({self._path})"
