"""Regenerate ``blob_v1.json`` from the format as DESIGN.md states it, without faceseal's code.

Run once by hand (``.venv/bin/python tests/vectors/gen_blob_v1.py``); the output is committed
and ``tests/test_blob_kat.py`` checks the daemon against it. Everything here is spelled out
with ``struct``, ``hmac`` and ``cryptography``'s AESGCM on purpose: a vector computed with the
code under test would only prove the code agrees with itself.

Format (v1):
  blob = 0x01 | key version (uint32 big-endian) | nonce (12 bytes) | AES-256-GCM ciphertext+tag
  template AAD = lp("faceseal/template/v1") lp(gallery) lp(subject_id) lp(template_id) lp(be32(version))
  subject AAD  = lp("faceseal/subject/v1")  lp(gallery) lp(subject_ref) lp(template_id) lp(be32(version))
  lp(x) = be32(len(x)) | x
  template plaintext = the encoding as little-endian float32
  subject plaintext  = the subject id, UTF-8
  subject_ref = HMAC-SHA256(index key, "faceseal/subject-ref/v1" 0x00 gallery 0x00 subject_id)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def lp(x: bytes) -> bytes:
    return struct.pack(">I", len(x)) + x


def case(
    name: str,
    *,
    data_key: bytes,
    index_key: bytes,
    key_version: int,
    gallery: str,
    subject_id: str,
    template_id: str,
    encoding: list[float],
    template_nonce: bytes,
    subject_nonce: bytes,
) -> dict[str, object]:
    ver = struct.pack(">I", key_version)
    ref = hmac.new(
        index_key,
        b"faceseal/subject-ref/v1\0" + gallery.encode() + b"\0" + subject_id.encode(),
        hashlib.sha256,
    ).digest()
    t_aad = (
        lp(b"faceseal/template/v1")
        + lp(gallery.encode())
        + lp(subject_id.encode())
        + lp(template_id.encode())
        + lp(ver)
    )
    s_aad = lp(b"faceseal/subject/v1") + lp(gallery.encode()) + lp(ref) + lp(template_id.encode()) + lp(ver)
    plaintext = struct.pack(f"<{len(encoding)}f", *encoding)
    aead = AESGCM(data_key)
    t_blob = b"\x01" + ver + template_nonce + aead.encrypt(template_nonce, plaintext, t_aad)
    s_blob = b"\x01" + ver + subject_nonce + aead.encrypt(subject_nonce, subject_id.encode(), s_aad)
    return {
        "name": name,
        "data_key": data_key.hex(),
        "index_key": index_key.hex(),
        "key_version": key_version,
        "gallery": gallery,
        "subject_id": subject_id,
        "template_id": template_id,
        "encoding": encoding,
        "template_plaintext": plaintext.hex(),
        "subject_ref": ref.hex(),
        "template_nonce": template_nonce.hex(),
        "template_aad": t_aad.hex(),
        "template_blob": t_blob.hex(),
        "subject_nonce": subject_nonce.hex(),
        "subject_aad": s_aad.hex(),
        "subject_blob": s_blob.hex(),
    }


def main() -> None:
    cases = [
        case(
            "v1-small",
            data_key=bytes(range(32)),
            index_key=bytes(range(32, 64)),
            key_version=1,
            gallery="faces",
            subject_id="alice@example.org",
            template_id="0123456789abcdef0123456789abcdef",
            encoding=[0.25, -1.5, 3.0, 0.001, -0.0, 65504.0, 1e-20, -7.125],
            template_nonce=bytes.fromhex("000102030405060708090a0b"),
            subject_nonce=bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab"),
        ),
        case(
            # A version whose four bytes differ, so a little-endian or 16-bit field shows up.
            "v-0x01020304",
            data_key=bytes.fromhex("ff" * 16 + "00" * 16),
            index_key=bytes.fromhex("5a" * 32),
            key_version=0x01020304,
            gallery="door-2.lobby_B",
            subject_id="E-0042:badge.7",
            template_id="t",
            encoding=[float(i) / 8 - 1 for i in range(16)],
            template_nonce=bytes.fromhex("ffffffffffffffffffffffff"),
            subject_nonce=bytes.fromhex("000000000000000000000001"),
        ),
    ]
    out = Path(__file__).with_name("blob_v1.json")
    doc = {
        "description": "faceseal template blob format v1 known-answer vectors; see gen_blob_v1.py",
        "cases": cases,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
