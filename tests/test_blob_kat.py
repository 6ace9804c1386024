"""The sealed-blob format, pinned by known-answer vectors computed without faceseal's code.

``tests/vectors/blob_v1.json`` was produced by ``tests/vectors/gen_blob_v1.py`` from the format
as DESIGN.md states it (struct + hmac + cryptography's AESGCM). If one of these tests fails, a
blob written by an older daemon no longer opens, or a newer daemon writes blobs an older one
(or an independent auditor) cannot read: change the format byte, never the v1 layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faceseal.server.crypto import blob
from faceseal.server.crypto.barrier import Barrier, SealedTemplate
from faceseal.server.crypto.keyring import Keyring, SecretKey
from faceseal.server.errors import IntegrityError

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "vectors" / "blob_v1.json").read_text(encoding="utf-8")
)["cases"]
CASE_IDS = [c["name"] for c in VECTORS]
HYPOTHESIS = settings(max_examples=300, database=None, deadline=None)


def _h(case: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(case[name])


def _keyring(case: dict[str, Any]) -> Keyring:
    return Keyring(SecretKey(_h(case, "index_key")), {case["key_version"]: SecretKey(_h(case, "data_key"))})


def _encoding(case: dict[str, Any]) -> np.ndarray:
    return np.asarray(case["encoding"], dtype=np.float32)


@pytest.mark.parametrize("case", VECTORS, ids=CASE_IDS)
def test_template_aad_matches_vector(case: dict[str, Any]) -> None:
    aad = blob.template_aad(case["gallery"], case["subject_id"], case["template_id"], case["key_version"])
    assert aad.hex() == case["template_aad"]


@pytest.mark.parametrize("case", VECTORS, ids=CASE_IDS)
def test_subject_aad_matches_vector(case: dict[str, Any]) -> None:
    aad = blob.subject_aad(case["gallery"], _h(case, "subject_ref"), case["template_id"], case["key_version"])
    assert aad.hex() == case["subject_aad"]


@pytest.mark.parametrize("case", VECTORS, ids=CASE_IDS)
def test_subject_ref_matches_vector(case: dict[str, Any]) -> None:
    barrier = Barrier(_keyring(case))
    assert barrier.subject_ref(case["gallery"], case["subject_id"]).hex() == case["subject_ref"]


@pytest.mark.parametrize("case", VECTORS, ids=CASE_IDS)
@pytest.mark.parametrize("kind", ["template", "subject"])
def test_encode_with_aesgcm_reproduces_blob(case: dict[str, Any], kind: str) -> None:
    if kind == "template":
        plaintext = _encoding(case).astype("<f4").tobytes()
        assert plaintext.hex() == case["template_plaintext"]
        aad = blob.template_aad(case["gallery"], case["subject_id"], case["template_id"], case["key_version"])
    else:
        plaintext = case["subject_id"].encode()
        aad = blob.subject_aad(case["gallery"], _h(case, "subject_ref"), case["template_id"], case["key_version"])
    nonce = _h(case, f"{kind}_nonce")
    ciphertext = AESGCM(_h(case, "data_key")).encrypt(nonce, plaintext, aad)
    assert blob.encode(case["key_version"], nonce, ciphertext).hex() == case[f"{kind}_blob"]


@pytest.mark.parametrize("case", VECTORS, ids=CASE_IDS)
@pytest.mark.parametrize("kind", ["template", "subject"])
def test_parse_splits_vector_blob(case: dict[str, Any], kind: str) -> None:
    raw = _h(case, f"{kind}_blob")
    parsed = blob.parse(raw)
    assert parsed.key_version == case["key_version"]
    assert parsed.nonce == _h(case, f"{kind}_nonce")
    assert parsed.ciphertext == raw[1 + 4 + 12 :]


@pytest.mark.parametrize("case", VECTORS, ids=CASE_IDS)
def test_barrier_opens_independently_made_blobs(case: dict[str, Any]) -> None:
    barrier = Barrier(_keyring(case))
    sealed = SealedTemplate(case["key_version"], _h(case, "subject_blob"), _h(case, "template_blob"))
    subject_id, encoding = barrier.open(
        case["gallery"], _h(case, "subject_ref"), case["template_id"], sealed, len(case["encoding"])
    )
    assert subject_id == case["subject_id"]
    assert encoding.dtype == np.float32
    assert encoding.tobytes() == _h(case, "template_plaintext")


@pytest.mark.parametrize("case", VECTORS, ids=CASE_IDS)
def test_barrier_seal_output_opens_with_plain_aesgcm(case: dict[str, Any]) -> None:
    """What the daemon writes today can be read by anyone holding the key and the spec."""
    barrier = Barrier(_keyring(case))
    sealed = barrier.seal(
        case["gallery"],
        case["subject_id"],
        case["template_id"],
        _encoding(case),
        key_version=case["key_version"],
    )
    aead = AESGCM(_h(case, "data_key"))
    for raw, aad_name, plaintext_hex in (
        (sealed.template_blob, "template_aad", case["template_plaintext"]),
        (sealed.subject_blob, "subject_aad", case["subject_id"].encode().hex()),
    ):
        assert raw[0] == 0x01
        assert int.from_bytes(raw[1:5], "big") == case["key_version"]
        opened = aead.decrypt(raw[5:17], raw[17:], _h(case, aad_name))
        assert opened.hex() == plaintext_hex
    assert sealed.key_version == case["key_version"]
    # A fresh nonce per blob: the two blobs of a row never share one, nor does a re-seal.
    again = barrier.seal(
        case["gallery"],
        case["subject_id"],
        case["template_id"],
        _encoding(case),
        key_version=case["key_version"],
    )
    nonces = {sealed.template_blob[5:17], sealed.subject_blob[5:17], again.template_blob[5:17]}
    assert len(nonces) == 3


def test_length_prefix_keeps_field_boundaries() -> None:
    """'ab'+'c' and 'a'+'bc' must give different associated data."""
    assert blob.template_aad("ab", "c", "t", 1) != blob.template_aad("a", "bc", "t", 1)
    assert blob.template_aad("g", "ab", "c", 1) != blob.template_aad("g", "a", "bc", 1)
    assert blob.subject_aad("g", b"ab", "c", 1) != blob.subject_aad("g", b"a", "bc", 1)
    assert blob.template_aad("g", "s", "t", 1) != blob.subject_aad("g", b"s", "t", 1)


# -- malformed blobs ----------------------------------------------------------------------------

GOOD = bytes.fromhex(VECTORS[0]["template_blob"])


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(GOOD[:1], id="format-byte-only"),
        pytest.param(GOOD[:17], id="header-only"),
        pytest.param(GOOD[: 17 + 15], id="one-byte-short-of-a-tag"),
        pytest.param(b"\x02" + GOOD[1:], id="format-2"),
        pytest.param(b"\x00" + GOOD[1:], id="format-0"),
        pytest.param(b"\xff" + GOOD[1:], id="format-ff"),
        pytest.param(GOOD[:1] + b"\0\0\0\0" + GOOD[5:], id="key-version-0"),
    ],
)
def test_parse_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(blob.BlobFormatError):
        blob.parse(raw)


def test_parse_accepts_the_shortest_valid_blob() -> None:
    raw = GOOD[: 17 + 16]
    assert blob.parse(raw).ciphertext == raw[17:]


@pytest.mark.parametrize(
    ("version", "nonce", "ciphertext", "why"),
    [
        (0, bytes(12), bytes(16), "version"),
        (2**32, bytes(12), bytes(16), "version"),
        (1, bytes(11), bytes(16), "nonce"),
        (1, bytes(12), bytes(15), "tag"),
    ],
)
def test_encode_refuses_what_parse_would_reject(version: int, nonce: bytes, ciphertext: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        blob.encode(version, nonce, ciphertext)


@HYPOTHESIS
@given(st.binary(max_size=200))
def test_parse_random_bytes_raises_only_blob_format_error(raw: bytes) -> None:
    try:
        parsed = blob.parse(raw)
    except blob.BlobFormatError:
        return
    assert isinstance(parsed, blob.ParsedBlob)
    assert blob.encode(parsed.key_version, parsed.nonce, parsed.ciphertext) == raw


@HYPOTHESIS
@given(st.integers(1, 2**32 - 1), st.binary(min_size=12, max_size=12), st.binary(min_size=16, max_size=100))
def test_encode_parse_round_trip(version: int, nonce: bytes, ciphertext: bytes) -> None:
    parsed = blob.parse(blob.encode(version, nonce, ciphertext))
    assert (parsed.key_version, parsed.nonce, parsed.ciphertext) == (version, nonce, ciphertext)


_KAT = VECTORS[0]
_KAT_BARRIER = Barrier(_keyring(_KAT))


def _opaque_message() -> str:
    try:
        _KAT_BARRIER.open(_KAT["gallery"], b"", _KAT["template_id"], SealedTemplate(1, b"", b""), 8)
    except IntegrityError as exc:
        return str(exc)
    raise AssertionError("empty blobs opened")


def _blobish() -> st.SearchStrategy[bytes]:
    """Random bytes, and random bytes behind a plausible v1 header (version 1 exists in the keyring)."""
    return st.one_of(
        st.binary(max_size=120),
        st.binary(min_size=28, max_size=120).map(lambda b: b"\x01\x00\x00\x00\x01" + b),
    )


@settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject_blob=_blobish(),
    template_blob=_blobish(),
    key_version=st.integers(0, 3),
    subject_ref=st.binary(max_size=40),
    dimension=st.integers(1, 16),
)
def test_barrier_open_on_random_bytes_raises_only_integrity_error(
    subject_blob: bytes, template_blob: bytes, key_version: int, subject_ref: bytes, dimension: int
) -> None:
    sealed = SealedTemplate(key_version, subject_blob, template_blob)
    with pytest.raises(IntegrityError) as info:
        _KAT_BARRIER.open(_KAT["gallery"], subject_ref, _KAT["template_id"], sealed, dimension)
    # One opaque error for every cause: the message does not say which check failed.
    assert str(info.value) == _opaque_message()
