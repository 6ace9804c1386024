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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from faceseal.server.crypto import blob
from faceseal.server.crypto.keyring import Keyring
from faceseal.server.errors import IntegrityError

_SUBJECT_REF_CONTEXT = b"faceseal/subject-ref/v1"
_FLOAT = np.dtype("<f4")
_OPAQUE = "a stored template failed its integrity check"
_NONCE_END = blob.HEADER_BYTES
_NONCE_START = _NONCE_END - blob.NONCE_BYTES


class SealedRow(Protocol):
    """What ``open_many`` reads of a stored row (the store's TemplateRow has these)."""

    @property
    def subject_ref(self) -> bytes: ...

    @property
    def template_id(self) -> str: ...

    @property
    def key_version(self) -> int: ...

    @property
    def subject_blob(self) -> bytes: ...

    @property
    def template_blob(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class SealedTemplate:
    """What the store keeps for one template: two blobs bound to the same row."""

    key_version: int
    subject_blob: bytes
    template_blob: bytes

    def __repr__(self) -> str:
        return f"SealedTemplate(v{self.key_version}, <{len(self.template_blob)} sealed bytes>)"


class KeyedHash:
    """An HMAC in progress (see ``Barrier.keyed_hash``); it never shows its key or its input."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, inner: hashlib._Hash, outer: hashlib._Hash) -> None:
        self._inner, self._outer = inner, outer

    def update(self, data: bytes) -> None:
        self._inner.update(data)

    def digest(self) -> bytes:
        outer = self._outer.copy()
        outer.update(self._inner.digest())
        return outer.digest()

    def __repr__(self) -> str:
        return "KeyedHash(<hidden>)"


class Barrier:
    """Seal and open template blobs with the data keys of one keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        # One cipher object per key version: building AESGCM per blob dominated unseal time.
        self._ciphers = {v: AESGCM(k.reveal()) for v, k in keyring.data_keys.items()}
        # The blob header each version's blobs start with (format byte, version).
        self._headers = {v: bytes([blob.FORMAT_V1]) + v.to_bytes(4, "big") for v in self._ciphers}
        # HMAC-SHA256 with the index key, its two padded key blocks hashed once: hmac.new per
        # subject reference re-derives them and cost more than both decryptions of a row.
        block = keyring.index_key.reveal()
        if len(block) > 64:
            block = hashlib.sha256(block).digest()
        block = block.ljust(64, b"\0")
        self._hmac_inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._hmac_outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def subject_ref(self, gallery: str, subject_id: str) -> bytes:
        """A stable, keyed name for a subject, so the store can index rows without the id in clear."""
        return self._ref(_SUBJECT_REF_CONTEXT + b"\0" + gallery.encode() + b"\0" + subject_id.encode())

    def keyed_hash(self, context: bytes) -> KeyedHash:
        """An HMAC-SHA256 under the index key, fed incrementally, for values the store may keep
        but must not be able to read or link without the key (idempotency keys, batch digests).
        Feed length-prefixed fields (``blob.field``) so that no two inputs run together."""
        inner = self._hmac_inner.copy()
        inner.update(blob.field(context))
        return KeyedHash(inner, self._hmac_outer)

    def _ref(self, msg: bytes) -> bytes:
        inner = self._hmac_inner.copy()
        inner.update(msg)
        outer = self._hmac_outer.copy()
        outer.update(inner.digest())
        return outer.digest()

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
        out = np.empty((1, dimension), dtype=_FLOAT)
        subject_id = self._open_into(
            blob.aad_prefixes(gallery),
            _SUBJECT_REF_CONTEXT + b"\0" + gallery.encode() + b"\0",
            subject_ref,
            template_id,
            sealed.key_version,
            sealed.subject_blob,
            sealed.template_blob,
            out.data.cast("B"),
        )
        if subject_id is None:
            raise IntegrityError(_OPAQUE)
        return subject_id, _native(out)[0]

    def open_many(
        self, gallery: str, rows: Sequence[SealedRow], dimension: int
    ) -> tuple[list[str | None], npt.NDArray[np.float32]]:
        """Open many rows of one gallery: (subject id per row, a rows x dimension matrix).

        A row that fails any check (the same checks as ``open``) has None for its subject id and
        an undefined matrix row; telling why would tell an attacker which edit got through.
        Templates are decrypted straight into the matrix, and what every row shares (associated
        data up to the gallery, the reference's prefix) is built once.
        """
        out = np.empty((len(rows), dimension), dtype=_FLOAT)
        if not rows:
            return [], _native(out)
        view = out.data.cast("B")
        width = dimension * _FLOAT.itemsize
        prefixes = blob.aad_prefixes(gallery)
        ref_prefix = _SUBJECT_REF_CONTEXT + b"\0" + gallery.encode() + b"\0"
        ids = [
            self._open_into(
                prefixes,
                ref_prefix,
                row.subject_ref,
                row.template_id,
                row.key_version,
                row.subject_blob,
                row.template_blob,
                view[i * width : (i + 1) * width],
            )
            for i, row in enumerate(rows)
        ]
        return ids, _native(out)

    def _open_into(
        self,
        prefixes: tuple[bytes, bytes],
        ref_prefix: bytes,
        subject_ref: bytes,
        template_id: str,
        version: int,
        subject_blob: bytes,
        template_blob: bytes,
        dest: memoryview,
    ) -> str | None:
        """Open one row, the template into ``dest``; its subject id, or None if any check fails.

        Checks: both blobs are v1 blobs of the row's key version (a version this keyring holds),
        the template is exactly ``dest`` long, both authenticate against associated data bound
        to the row, the subject id is UTF-8, and it hashes to the row's subject reference.
        """
        cipher = self._ciphers.get(version)
        if cipher is None:
            return None
        header = self._headers[version]
        if (
            len(subject_blob) < blob.MIN_BLOB_BYTES
            or subject_blob[:_NONCE_START] != header
            or template_blob[:_NONCE_START] != header
            or len(template_blob) - blob.MIN_BLOB_BYTES != len(dest)
        ):
            return None
        tail = blob.field(template_id.encode()) + blob.field(version.to_bytes(4, "big"))
        try:
            raw_id = cipher.decrypt(
                subject_blob[_NONCE_START:_NONCE_END],
                subject_blob[_NONCE_END:],
                prefixes[0] + blob.field(subject_ref) + tail,
            )
            cipher.decrypt_into(
                template_blob[_NONCE_START:_NONCE_END],
                memoryview(template_blob)[_NONCE_END:],
                prefixes[1] + blob.field(raw_id) + tail,
                dest,
            )
        except InvalidTag:
            dest[:] = bytes(len(dest))  # whatever was decrypted did not authenticate
            return None
        try:
            subject_id = raw_id.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            return None
        # The template AAD above used the UTF-8 bytes as decrypted: the same as ``subject_id``'s.
        if not hmac.compare_digest(self._ref(ref_prefix + raw_id), subject_ref):
            return None
        return subject_id


def _native(out: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Little-endian floats as the host's float32 (a no-op on every platform we ship)."""
    if sys.byteorder == "little":
        return out.view(np.float32)
    return out.astype(np.float32)
