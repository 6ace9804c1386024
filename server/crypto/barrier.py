"""The barrier: the only place templates are encrypted or decrypted.

Everything below it (the store) sees sealed bytes and HMAC'd subject references; everything
above it sees plaintext only in memory. Every way a blob can fail to open (truncated, flipped,
moved to another row, sealed under a retired key) raises the same opaque IntegrityError, so the
caller learns nothing about which check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from faceseal.server.crypto import blob
from faceseal.server.crypto.keyring import Keyring
from faceseal.server.errors import IntegrityError

_SUBJECT_REF_CONTEXT = b"faceseal/subject-ref/v1"
_FLOAT = np.dtype("<f4")
_AadFor = Callable[[int], bytes]
_OPAQUE = "a stored template failed its integrity check"


@dataclass(frozen=True, slots=True)
class SealedTemplate:
    """What the store keeps for one template: two blobs bound to the same row."""

    key_version: int
    subject_blob: bytes
    template_blob: bytes

    def __repr__(self) -> str:
        return f"SealedTemplate(v{self.key_version}, <{len(self.template_blob)} sealed bytes>)"


class Barrier:
    """Seal and open template blobs with the data keys of one keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        # One cipher object per key version: building AESGCM per blob dominated unseal time.
        self._ciphers = {v: AESGCM(k.reveal()) for v, k in keyring.data_keys.items()}

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def subject_ref(self, gallery: str, subject_id: str) -> bytes:
        """A stable, keyed name for a subject, so the store can index rows without the id in clear."""
        msg = _SUBJECT_REF_CONTEXT + b"\0" + gallery.encode() + b"\0" + subject_id.encode()
        return hmac.new(self._keyring.index_key.reveal(), msg, hashlib.sha256).digest()

    def seal(
        self,
        gallery: str,
        subject_id: str,
        template_id: str,
        encoding: npt.NDArray[np.float32],
        *,
        key_version: int | None = None,
    ) -> SealedTemplate:
        """Seal one template (and its subject id) under the active data key, or ``key_version``."""
        version = self._keyring.active if key_version is None else key_version
        key = self._keyring.key(version)
        if key is None:
            raise ValueError("no such key version")
        aead = self._ciphers[version]
        ref = self.subject_ref(gallery, subject_id)
        plaintext = np.ascontiguousarray(encoding, dtype=_FLOAT).tobytes()
        t_nonce, s_nonce = os.urandom(blob.NONCE_BYTES), os.urandom(blob.NONCE_BYTES)
        t_aad = blob.template_aad(gallery, subject_id, template_id, version)
        s_aad = blob.subject_aad(gallery, ref, template_id, version)
        return SealedTemplate(
            key_version=version,
            subject_blob=blob.encode(version, s_nonce, aead.encrypt(s_nonce, subject_id.encode(), s_aad)),
            template_blob=blob.encode(version, t_nonce, aead.encrypt(t_nonce, plaintext, t_aad)),
        )

    def open(
        self,
        gallery: str,
        subject_ref: bytes,
        template_id: str,
        sealed: SealedTemplate,
        dimension: int,
    ) -> tuple[str, npt.NDArray[np.float32]]:
        """Open a stored row: its subject id, then the template bound to that id.

        The key version recorded in the row must agree with both blobs; a row that claims one
        version while carrying blobs of another has been edited.
        """
        raw_id = self._open(
            sealed.subject_blob,
            sealed.key_version,
            lambda v: blob.subject_aad(gallery, subject_ref, template_id, v),
        )
        try:
            subject_id = raw_id.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise IntegrityError(_OPAQUE) from None
        plaintext = self._open(
            sealed.template_blob,
            sealed.key_version,
            lambda v: blob.template_aad(gallery, subject_id, template_id, v),
        )
        if len(plaintext) != dimension * _FLOAT.itemsize:
            raise IntegrityError(_OPAQUE)
        if not hmac.compare_digest(self.subject_ref(gallery, subject_id), subject_ref):
            raise IntegrityError(_OPAQUE)
        return subject_id, np.frombuffer(plaintext, dtype=_FLOAT).astype(np.float32)

    def _open(self, data: bytes, row_version: int, aad_for: _AadFor) -> bytes:
        try:
            parsed = blob.parse(data)
        except blob.BlobFormatError:
            raise IntegrityError(_OPAQUE) from None
        key = self._keyring.key(parsed.key_version)
        if parsed.key_version != row_version or key is None:
            raise IntegrityError(_OPAQUE)
        try:
            return self._ciphers[parsed.key_version].decrypt(
                parsed.nonce, parsed.ciphertext, aad_for(parsed.key_version)
            )
        except InvalidTag:
            raise IntegrityError(_OPAQUE) from None
