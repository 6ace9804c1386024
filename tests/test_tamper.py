"""Someone with write access to the database edits or moves sealed blobs while the daemon is down.
After a restart the victim subject answers DATA_LOSS, never a match; everyone else still works."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import InProcessDaemon, db_execute, nearby, random_encodings
from seals import EACH_SEAL

from faceseal.client import DataLossError, FaceSealClient, NotFoundError

# Once per seal: file, PKCS#11 (SoftHSM2), Transit (OpenBao).
pytestmark = EACH_SEAL

ALICE, BOB, CAROL, DAVE1, DAVE2 = random_encodings(5, seed=300)


def _row(db: Path, template_id: str) -> dict[str, bytes]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT subject_ref, subject_blob, template_blob FROM templates WHERE template_id = ?",
            (bytes.fromhex(template_id),),  # stored as its 16 raw bytes
        ).fetchone()
    assert row is not None, "no such template row"
    return {"subject_ref": bytes(row[0]), "subject_blob": bytes(row[1]), "template_blob": bytes(row[2])}


def _set(db: Path, template_id: str, **columns: object) -> None:
    assignments = ", ".join(f"{name} = ?" for name in columns)  # column names from this file only
    sql = f"UPDATE templates SET {assignments} WHERE template_id = ?"  # noqa: S608
    changed = db_execute(db, sql, [*columns.values(), bytes.fromhex(template_id)])
    assert changed == 1


def _flip(db: Path, template_id: str, column: str, position: int) -> None:
    data = bytearray(_row(db, template_id)[column])
    data[position] ^= 0x01
    _set(db, template_id, **{column: bytes(data)})


def _enroll_all(harness: InProcessDaemon) -> dict[str, str]:
    """Enroll the cast; return the template id of each of their templates."""
    enroller = harness.client("enroller")
    return {
        "alice": enroller.enroll("alice", ALICE).template_id,
        "bob": enroller.enroll("bob", BOB).template_id,
        "carol": enroller.enroll("carol", CAROL).template_id,
        "dave1": enroller.enroll("dave", DAVE1).template_id,
        "dave2": enroller.enroll("dave", DAVE2).template_id,
    }


def _assert_bystanders_work(gateway: FaceSealClient) -> None:
    assert gateway.match("bob", BOB).match is True
    assert gateway.match("carol", nearby(CAROL, 0.3, seed=301)).match is True
    assert gateway.match("bob", CAROL).match is False
    assert [c.subject_id for c in gateway.identify(BOB, top_k=5)] == ["bob"]


# Where to flip one bit: (column, byte offset). A blob is format | key version | nonce | ct+tag.
FLIPS = {
    "template-format-byte": ("template_blob", 0),
    "template-key-version": ("template_blob", 4),
    "template-nonce": ("template_blob", 10),
    "template-ciphertext": ("template_blob", 100),
    "template-tag": ("template_blob", -1),
    "subject-ciphertext": ("subject_blob", 20),
    "subject-tag": ("subject_blob", -1),
}


@pytest.mark.parametrize("where", list(FLIPS))
def test_flipped_byte_answers_data_loss(harness: InProcessDaemon, where: str) -> None:
    harness.start()
    ids = _enroll_all(harness)
    harness.stop()

    column, position = FLIPS[where]
    db = harness.dev.db_path
    _flip(db, ids["alice"], column, position)
    _flip(db, ids["dave1"], "template_blob", 60)  # one of Dave's two templates

    harness.start()
    assert harness.daemon is not None
    assert harness.daemon.core.integrity_failures == 2  # the alarm went off, once per bad row
    gateway = harness.client("gateway")
    with pytest.raises(DataLossError):
        gateway.match("alice", ALICE)
    with pytest.raises(DataLossError):
        gateway.match("alice", nearby(ALICE, 0.2, seed=302))
    # Dave's intact template does not rescue him: the subject as a whole is suspect.
    for probe in (DAVE1, DAVE2):
        with pytest.raises(DataLossError):
            gateway.match("dave", probe)
    assert "alice" not in [c.subject_id for c in gateway.identify(ALICE, top_k=10)]
    _assert_bystanders_work(gateway)

    # Re-enrolling with replace (or deleting) is how an operator clears the subject.
    enroller = harness.client("enroller")
    assert enroller.enroll("alice", ALICE, replace=True).template_count == 1
    assert gateway.match("alice", ALICE).match is True
    assert enroller.delete("dave") == 2
    with pytest.raises(NotFoundError):
        gateway.match("dave", DAVE1)


def _copy_both_blobs(db: Path, ids: dict[str, str]) -> None:
    src = _row(db, ids["alice"])
    _set(db, ids["bob"], subject_blob=src["subject_blob"], template_blob=src["template_blob"])


def _copy_template_blob(db: Path, ids: dict[str, str]) -> None:
    _set(db, ids["bob"], template_blob=_row(db, ids["alice"])["template_blob"])


def _relabel_row(db: Path, ids: dict[str, str]) -> None:
    """Alice's whole row filed under Bob's subject reference (Bob's own row removed)."""
    bob_ref = _row(db, ids["bob"])["subject_ref"]
    assert db_execute(db, "DELETE FROM templates WHERE template_id = ?", [bytes.fromhex(ids["bob"])]) == 1
    _set(db, ids["alice"], subject_ref=bob_ref)


def _add_row_for_victim(db: Path, ids: dict[str, str]) -> None:
    """A new row under Bob's reference carrying Alice's blobs (Bob keeps his real template)."""
    bob_ref = _row(db, ids["bob"])["subject_ref"]
    src = _row(db, ids["alice"])
    db_execute(
        db,
        "INSERT INTO templates (template_id, gallery, subject_ref, key_version, subject_blob, template_blob)"
        " VALUES (?, 'faces', ?, 1, ?, ?)",
        [bytes.fromhex("f" * 32), bob_ref, src["subject_blob"], src["template_blob"]],
    )


ATTACKS: dict[str, Callable[[Path, dict[str, str]], None]] = {
    "copy-subject-and-template-blobs": _copy_both_blobs,
    "copy-template-blob-only": _copy_template_blob,
    "relabel-row": _relabel_row,
    "insert-row-for-victim": _add_row_for_victim,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacker_template_moved_into_victim_row_is_data_loss(harness: InProcessDaemon, attack: str) -> None:
    harness.start()
    ids = _enroll_all(harness)
    gateway = harness.client("gateway")
    assert gateway.match("bob", ALICE).match is False  # before: Alice's face does not open Bob's door
    harness.stop()

    ATTACKS[attack](harness.dev.db_path, ids)

    harness.start()
    gateway = harness.client("gateway")
    for probe in (ALICE, nearby(ALICE, 0.2, seed=303), BOB):
        with pytest.raises(DataLossError):
            gateway.match("bob", probe)
    # Identify never names Bob for Alice's face.
    assert "bob" not in [c.subject_id for c in gateway.identify(ALICE, top_k=10)]
    assert gateway.match("carol", CAROL).match is True
    assert gateway.match("dave", DAVE2).match is True
