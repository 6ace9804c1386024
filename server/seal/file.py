"""The dev file seal: a 32-byte KEK in a file beside the daemon.

Dev only, and named so: the KEK sits on the same machine as the data it protects, so a disk
thief who takes both gets everything. The config refuses it outside ``mode = "dev"``. The file
is read once at construction, refused when group or world can read it, and its bytes are never
formatted into a message.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from faceseal.server.seal.base import SealError

_FORMAT = b"\x01"
_NONCE = 12


class FileSeal:
    """AES-256-GCM key wrapping under a key read from a 0600 file."""

    def __init__(self, path: Path) -> None:
        self._path = path
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
        self._aead = AESGCM(data)
        del data

    def describe(self) -> str:
        return f"file:{self._path}"

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _FORMAT + nonce + self._aead.encrypt(nonce, key, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < 1 + _NONCE + 16 or wrapped[:1] != _FORMAT:
            raise SealError("a wrapped key is malformed")
        try:
            return self._aead.decrypt(wrapped[1 : 1 + _NONCE], wrapped[1 + _NONCE :], aad)
        except InvalidTag:
            raise SealError(
                "the seal key does not open this keyring (wrong key file, or the keyring was altered)"
            ) from None

    def __repr__(self) -> str:
        return f"FileSeal({self._path})"
