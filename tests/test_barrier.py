"""The barrier: a sealed template opens only in the row it was sealed for, under the key it names.

These are the properties the threat model leans on: whoever can write the database can move,
edit or swap blobs, and each of those must turn into an IntegrityError, never into a match.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest

from faceseal.server.crypto.barrier import Barrier, SealedTemplate
from faceseal.server.crypto.keyring import Keyring, SecretKey
from faceseal.server.errors import IntegrityError
from faceseal.server.store.base import TemplateRow, WrappedKey

DIM = 128
GALLERY = "faces"
TEMPLATE_ID = "5b0e6f2c9d4a4b1e8f3a2c1d0e9f8a7b"


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(SecretKey.generate(), {1: SecretKey.generate()})


@pytest.fixture
def barrier(keyring: Keyring) -> Barrier:
    return Barrier(keyring)


@pytest.fixture
def encoding() -> np.ndarray:
    return np.random.default_rng(7).standard_normal(DIM).astype(np.float32)


def _open(barrier: Barrier, gallery: str, subject_id: str, template_id: str, sealed: SealedTemplate):
    return barrier.open(gallery, barrier.subject_ref(gallery, subject_id), template_id, sealed, DIM)


def test_round_trip(barrier: Barrier, encoding: np.ndarray) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    assert sealed.key_version == 1
    subject_id, opened = _open(barrier, GALLERY, "alice", TEMPLATE_ID, sealed)
    assert subject_id == "alice"
    assert opened.dtype == np.float32
    np.testing.assert_array_equal(opened, encoding)


def test_blobs_do_not_contain_the_plaintext(barrier: Barrier, encoding: np.ndarray) -> None:
    sealed = barrier.seal(GALLERY, "alice-the-subject", TEMPLATE_ID, encoding)
    stored = sealed.subject_blob + sealed.template_blob
    assert b"alice-the-subject" not in stored
    assert encoding.tobytes()[:16] not in stored


def test_round_trip_after_rotation_uses_newest_and_still_opens_old(keyring: Keyring, encoding: np.ndarray) -> None:
    old = Barrier(keyring).seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    rotated = Barrier(keyring.with_version(2, SecretKey.generate()))
    new = rotated.seal(GALLERY, "alice", "t2", encoding)
    assert (old.key_version, new.key_version) == (1, 2)
    assert _open(rotated, GALLERY, "alice", TEMPLATE_ID, old)[0] == "alice"
    assert _open(rotated, GALLERY, "alice", "t2", new)[0] == "alice"


# -- moved or edited rows -------------------------------------------------------------------------


def test_blob_moved_to_another_subject_fails(barrier: Barrier, encoding: np.ndarray) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    with pytest.raises(IntegrityError):
        _open(barrier, GALLERY, "mallory", TEMPLATE_ID, sealed)


def test_attacker_template_copied_into_victim_row_fails(barrier: Barrier, encoding: np.ndarray) -> None:
    """The write-access attacker of the threat model: their own face in the victim's row."""
    victim = barrier.seal(GALLERY, "alice", "t-alice", encoding)
    attacker = barrier.seal(GALLERY, "mallory", "t-mallory", -encoding)
    forged = SealedTemplate(victim.key_version, victim.subject_blob, attacker.template_blob)
    with pytest.raises(IntegrityError):
        _open(barrier, GALLERY, "alice", "t-alice", forged)
    # Copying the attacker's whole row under the victim's reference fails too.
    with pytest.raises(IntegrityError):
        barrier.open(GALLERY, barrier.subject_ref(GALLERY, "alice"), "t-mallory", attacker, DIM)


def test_blob_moved_to_another_template_id_fails(barrier: Barrier, encoding: np.ndarray) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    with pytest.raises(IntegrityError):
        _open(barrier, GALLERY, "alice", "another-template-id", sealed)


def test_blob_moved_to_another_gallery_fails(barrier: Barrier, encoding: np.ndarray) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    with pytest.raises(IntegrityError):
        _open(barrier, "faces-2", "alice", TEMPLATE_ID, sealed)


def test_row_claiming_another_key_version_fails(keyring: Keyring, encoding: np.ndarray) -> None:
    barrier = Barrier(keyring.with_version(2, SecretKey.generate()))
    v1 = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding, key_version=1)
    v2 = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding, key_version=2)
    for sealed, claimed in ((v1, 2), (v2, 1)):
        edited = SealedTemplate(claimed, sealed.subject_blob, sealed.template_blob)
        with pytest.raises(IntegrityError):
            _open(barrier, GALLERY, "alice", TEMPLATE_ID, edited)
    # Mixing the blobs of two versions in one row is an edit as well.
    mixed = SealedTemplate(1, v1.subject_blob, v2.template_blob)
    with pytest.raises(IntegrityError):
        _open(barrier, GALLERY, "alice", TEMPLATE_ID, mixed)


def test_wrong_dimension_fails(barrier: Barrier, encoding: np.ndarray) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    with pytest.raises(IntegrityError):
        barrier.open(GALLERY, barrier.subject_ref(GALLERY, "alice"), TEMPLATE_ID, sealed, DIM // 2)


@pytest.mark.parametrize("which", ["subject_blob", "template_blob"])
def test_any_flipped_byte_fails(barrier: Barrier, encoding: np.ndarray, which: str) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    original = getattr(sealed, which)
    opened = 0
    for i in range(len(original)):
        for mask in (0x01, 0x80):
            tampered = bytearray(original)
            tampered[i] ^= mask
            edited = dataclasses.replace(sealed, **{which: bytes(tampered)})
            try:
                _open(barrier, GALLERY, "alice", TEMPLATE_ID, edited)
            except IntegrityError:
                continue
            opened += 1
    assert opened == 0


@pytest.mark.parametrize("which", ["subject_blob", "template_blob"])
@pytest.mark.parametrize("edit", ["truncate-1", "append-1", "drop-tag", "empty"])
def test_truncated_or_extended_blob_fails(barrier: Barrier, encoding: np.ndarray, which: str, edit: str) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    original: bytes = getattr(sealed, which)
    edited_blob = {
        "truncate-1": original[:-1],
        "append-1": original + b"\0",
        "drop-tag": original[:-16],
        "empty": b"",
    }[edit]
    with pytest.raises(IntegrityError):
        _open(barrier, GALLERY, "alice", TEMPLATE_ID, dataclasses.replace(sealed, **{which: edited_blob}))


def test_failures_are_indistinguishable(barrier: Barrier, encoding: np.ndarray) -> None:
    """Every cause raises the same message: a caller cannot probe which check failed."""
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    messages = set()
    attempts = [
        lambda: _open(barrier, GALLERY, "bob", TEMPLATE_ID, sealed),
        lambda: _open(barrier, "other", "alice", TEMPLATE_ID, sealed),
        lambda: _open(barrier, GALLERY, "alice", "t", sealed),
        lambda: _open(barrier, GALLERY, "alice", TEMPLATE_ID, dataclasses.replace(sealed, key_version=9)),
        lambda: _open(barrier, GALLERY, "alice", TEMPLATE_ID, dataclasses.replace(sealed, template_blob=b"x")),
        lambda: barrier.open(GALLERY, barrier.subject_ref(GALLERY, "alice"), TEMPLATE_ID, sealed, 3),
    ]
    for attempt in attempts:
        with pytest.raises(IntegrityError) as info:
            attempt()
        messages.add(str(info.value))
        assert info.value.__cause__ is None
    assert len(messages) == 1


# -- key versions -------------------------------------------------------------------------------


def test_blob_of_version_2_needs_version_2(keyring: Keyring, encoding: np.ndarray) -> None:
    rotated = keyring.with_version(2, SecretKey.generate())
    sealed = Barrier(rotated).seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    assert sealed.key_version == 2
    for without_v2 in (keyring, rotated.without_version(2)):
        with pytest.raises(IntegrityError):
            _open(Barrier(without_v2), GALLERY, "alice", TEMPLATE_ID, sealed)
    # Another key that merely carries the number 2 does not open it either.
    impostor = Barrier(keyring.with_version(2, SecretKey.generate()))
    with pytest.raises(IntegrityError):
        _open(impostor, GALLERY, "alice", TEMPLATE_ID, sealed)


def test_seal_under_a_missing_version_is_refused(barrier: Barrier, encoding: np.ndarray) -> None:
    with pytest.raises(ValueError, match="key version"):
        barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding, key_version=2)


def test_another_keyring_cannot_open(barrier: Barrier, encoding: np.ndarray) -> None:
    sealed = barrier.seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    stranger = Barrier(Keyring(SecretKey.generate(), {1: SecretKey.generate()}))
    with pytest.raises(IntegrityError):
        stranger.open(GALLERY, barrier.subject_ref(GALLERY, "alice"), TEMPLATE_ID, sealed, DIM)


# -- subject references ---------------------------------------------------------------------------


def test_subject_ref_is_stable_and_separates_gallery_subject_and_index_key(keyring: Keyring) -> None:
    b = Barrier(keyring)
    ref = b.subject_ref("faces", "alice")
    assert len(ref) == 32
    assert Barrier(keyring.with_version(2, SecretKey.generate())).subject_ref("faces", "alice") == ref
    others = {
        b.subject_ref("faces-2", "alice"),
        b.subject_ref("faces", "alice2"),
        b.subject_ref("faces", "Alice"),
        Barrier(Keyring(SecretKey.generate(), {1: keyring.data_keys[1]})).subject_ref("faces", "alice"),
    }
    assert ref not in others
    assert len(others) == 4
    assert b"alice" not in ref


# -- nothing secret in a repr or a pickle -----------------------------------------------------------


def _leaks(text: str, secret: bytes) -> bool:
    forms = {secret.hex(), secret.hex().upper(), repr(secret)[2:-1], secret.decode("latin-1")}
    forms |= {secret.hex()[:16], repr(secret)[2:18]}
    return any(form in text for form in forms)


def test_reprs_carry_no_key_or_blob_bytes(encoding: np.ndarray) -> None:
    # A printable key, so formatting it raw would be visible as text too.
    index = SecretKey(b"INDEX-KEY-0123456789abcdefghijkl")
    data = SecretKey(b"DATA-KEY-0123456789abcdefghijklm")
    keyring = Keyring(index, {1: data})
    sealed = Barrier(keyring).seal(GALLERY, "alice", TEMPLATE_ID, encoding)
    row = TemplateRow(GALLERY, b"REF-BYTES-abcdef", TEMPLATE_ID, 1, sealed.subject_blob, sealed.template_blob)
    wrapped = WrappedKey("data", 1, b"WRAPPED-0123456789abcdef0123456789abcdef")
    texts = [repr(x) for x in (index, data, keyring, row, wrapped)]
    texts += [str(x) for x in (index, data, keyring, row, wrapped)]
    texts += [f"{keyring!r} {data} {row}", repr([row]), repr({1: data})]
    for text in texts:
        for secret in (
            index.reveal(),
            data.reveal(),
            sealed.subject_blob,
            sealed.template_blob,
            row.subject_ref,
            wrapped.wrapped,
        ):
            assert not _leaks(text, secret), text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_key_cannot_be_pickled(protocol: int) -> None:
    key = SecretKey.generate()
    with pytest.raises(TypeError):
        pickle.dumps(key, protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps(Keyring(key, {1: SecretKey.generate()}), protocol=protocol)


def test_secret_key_cannot_be_copied_out() -> None:
    key = SecretKey.generate()
    with pytest.raises(TypeError):
        copy.deepcopy(key)
    with pytest.raises(TypeError):
        copy.copy(key)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_secret_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes") as info:
        SecretKey(b"k" * size)
    assert "k" * 8 not in str(info.value)


def test_open_many_opens_what_open_opens_and_refuses_each_edited_row(barrier: Barrier, keyring: Keyring) -> None:
    """The batched path of unseal: every row as ``open`` would, a failed row only as None."""
    rng = np.random.default_rng(4)
    rows: list[TemplateRow] = []
    for i in range(12):
        sid, tid = f"subject-{i}", f"{i:032x}"
        sealed = barrier.seal("g", sid, tid, rng.standard_normal(8).astype(np.float32))
        rows.append(
            TemplateRow(
                "g", barrier.subject_ref("g", sid), tid, sealed.key_version, sealed.subject_blob, sealed.template_blob
            )
        )
    flipped = bytearray(rows[3].template_blob)
    flipped[-1] ^= 1
    edits = {
        3: dataclasses.replace(rows[3], template_blob=bytes(flipped)),
        5: dataclasses.replace(rows[5], subject_ref=rows[6].subject_ref),  # moved to another subject
        7: dataclasses.replace(rows[7], key_version=rows[7].key_version + 1),
        9: dataclasses.replace(rows[9], template_blob=rows[9].template_blob[:-4]),  # wrong length
        11: dataclasses.replace(rows[11], subject_blob=rows[10].subject_blob),  # another row's subject
    }
    edited = [edits.get(i, r) for i, r in enumerate(rows)]
    ids, matrix = barrier.open_many("g", edited, 8)
    assert matrix.shape == (12, 8)
    assert matrix.dtype == np.float32
    for i, row in enumerate(edited):
        sealed = SealedTemplate(row.key_version, row.subject_blob, row.template_blob)
        if i in edits:
            assert ids[i] is None
            with pytest.raises(IntegrityError):
                barrier.open("g", row.subject_ref, row.template_id, sealed, 8)
            continue
        subject_id, vector = barrier.open("g", row.subject_ref, row.template_id, sealed, 8)
        assert ids[i] == subject_id == f"subject-{i}"
        np.testing.assert_array_equal(matrix[i], vector)
    assert barrier.open_many("g", [], 8)[1].shape == (0, 8)
    assert Barrier(keyring).subject_ref("g", "x") == barrier.subject_ref("g", "x")
