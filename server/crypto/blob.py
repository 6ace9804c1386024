"""The sealed-template blob format and its associated data. Pure: no keys, no I/O.

A blob is ``format (1 byte) | key version (uint32 BE) | nonce (12 bytes) | ciphertext + GCM tag``.
The format byte lets a later format coexist with this one; the key version says which data key
sealed it, so rotation never has to guess.

The associated data binds a blob to the row it lives in: a blob copied to another subject,
template id, gallery or key version no longer authenticates. Every field is length-prefixed so
that no two different rows can produce the same bytes ("ab"+"c" vs "a"+"bc").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

FORMAT_V1 = 0x01
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = 1 + 4 + NONCE_BYTES
MIN_BLOB_BYTES = HEADER_BYTES + TAG_BYTES

TEMPLATE_CONTEXT = b"faceseal/template/v1"
SUBJECT_CONTEXT = b"faceseal/subject/v1"


class BlobFormatError(ValueError):
    """The bytes are not a blob of a known format. Callers turn this into an opaque IntegrityError."""


@dataclass(frozen=True, slots=True)
class ParsedBlob:
    """A blob split into its parts; the ciphertext is still sealed."""

    key_version: int
    nonce: bytes
    ciphertext: bytes


def encode(key_version: int, nonce: bytes, ciphertext: bytes) -> bytes:
    """Assemble a v1 blob."""
    if not 0 < key_version < 2**32:
        raise ValueError("key version out of range")
    if len(nonce) != NONCE_BYTES:
        raise ValueError("nonce must be 12 bytes")
    if len(ciphertext) < TAG_BYTES:
        raise ValueError("ciphertext shorter than a GCM tag")
    return struct.pack(">BI", FORMAT_V1, key_version) + nonce + ciphertext


def parse(blob: bytes) -> ParsedBlob:
    """Split a blob; raise BlobFormatError on anything that is not a well-formed v1 blob."""
    if len(blob) < MIN_BLOB_BYTES:
        raise BlobFormatError("blob too short")
    fmt, key_version = struct.unpack_from(">BI", blob)
    if fmt != FORMAT_V1:
        raise BlobFormatError("unknown blob format")
    if key_version == 0:
        raise BlobFormatError("key version 0 is never issued")
    return ParsedBlob(key_version, bytes(blob[5:HEADER_BYTES]), bytes(blob[HEADER_BYTES:]))


def field(part: bytes) -> bytes:
    """One length-prefixed field of associated data."""
    return len(part).to_bytes(4, "big") + part


def _fields(*parts: bytes) -> bytes:
    return b"".join(map(field, parts))


def aad_prefixes(gallery: str) -> tuple[bytes, bytes]:
    """(subject, template) associated data up to the gallery: the part every row of a gallery
    shares, so opening a million rows builds it once. The rest follows the functions below."""
    name = field(gallery.encode())
    return field(SUBJECT_CONTEXT) + name, field(TEMPLATE_CONTEXT) + name


def template_aad(gallery: str, subject_id: str, template_id: str, key_version: int) -> bytes:
    """Associated data of a template blob, as DESIGN.md lists it."""
    return _fields(
        TEMPLATE_CONTEXT,
        gallery.encode(),
        subject_id.encode(),
        template_id.encode(),
        struct.pack(">I", key_version),
    )


def subject_aad(gallery: str, subject_ref: bytes, template_id: str, key_version: int) -> bytes:
    """Associated data of the sealed subject id stored beside a template.

    The subject id itself is never stored in clear; rows are found by ``subject_ref`` (an HMAC)
    and the id needed for Identify answers is sealed here, bound to the same row.
    """
    return _fields(
        SUBJECT_CONTEXT,
        gallery.encode(),
        subject_ref,
        template_id.encode(),
        struct.pack(">I", key_version),
    )
