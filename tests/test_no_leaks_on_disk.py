"""After a full session (enroll, match, identify, delete, stop), nothing the daemon wrote holds the
KEK, an enrolled encoding or a subject id in clear: not the database, its -wal and -shm files,
nor the daemon's log."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from helpers import SubprocessDaemon, load_real_encodings

pytestmark = pytest.mark.slow

SUBJECTS = [
    "subject-zebra-1234",
    "subject-okapi-5678",
    "subject-quokka-9012",
    "subject-narwhal-3456",
    "subject-axolotl-7890",
    "subject-pangolin-2468",
]


def _needles(kek: bytes, encodings: np.ndarray) -> dict[str, bytes]:
    """Byte strings that must appear in no file, by a name safe to print."""
    needles = {
        "KEK": kek,
        "KEK (hex)": kek.hex().encode(),
        "KEK (HEX)": kek.hex().upper().encode(),
        "KEK (base64)": base64.b64encode(kek).rstrip(b"="),
        "KEK (base64url)": base64.urlsafe_b64encode(kek).rstrip(b"="),
    }
    for n, subject in enumerate(SUBJECTS):
        needles[f"subject id #{n}"] = subject.encode()
        needles[f"subject id #{n} (utf-16)"] = subject.encode("utf-16-le")
    for n, encoding in enumerate(encodings):
        raw = encoding.astype("<f4").tobytes()
        needles[f"encoding #{n} (float32)"] = raw
        needles[f"encoding #{n} (float64)"] = encoding.astype("<f8").tobytes()
        # Any 4 consecutive values, so a partial copy is found too.
        for offset in range(0, len(raw) - 16 + 1, 4):
            needles[f"encoding #{n} (float32 slice at {offset})"] = raw[offset : offset + 16]
        # Printed values, as a careless log line would carry them.
        for k in range(4):
            text = repr(float(encoding[k]))
            if len(text.lstrip("-")) >= 9:
                needles[f"encoding #{n} (printed value {k})"] = text.encode()
    return needles


def _leaks(files: list[Path], needles: dict[str, bytes]) -> list[str]:
    found = []
    for path in files:
        data = path.read_bytes()
        found += [f"{path.name}: {name}" for name, needle in needles.items() if needle in data]
    return found


def test_nothing_in_clear_on_disk_or_in_logs(subprocess_daemon: SubprocessDaemon) -> None:
    dev = subprocess_daemon.dev
    encodings, _ = load_real_encodings()
    chosen = encodings[[0, 11, 27, 48, 90, 131]]
    needles = _needles(dev.kek(), chosen)

    subprocess_daemon.start()
    target = subprocess_daemon.target
    with dev.client(target, "enroller") as enroller, dev.client(target, "gateway") as gateway:
        for subject, encoding in zip(SUBJECTS, chosen, strict=True):
            enroller.enroll(subject, encoding)
        enroller.enroll(SUBJECTS[0], chosen[1])  # a second template
        for subject, encoding in zip(SUBJECTS, chosen, strict=True):
            assert gateway.match(subject, encoding).match is True
            assert gateway.match(subject, chosen[3] if subject != SUBJECTS[3] else chosen[2]).match is False
        assert SUBJECTS[2] in [c.subject_id for c in gateway.identify(chosen[2])]
        assert enroller.delete(SUBJECTS[4]) == 1
        assert enroller.enroll(SUBJECTS[5], chosen[0], replace=True).template_count == 1

        # While running, the -wal file holds every recent write: look at it now.
        written = sorted(p for p in dev.data_dir.rglob("*") if p.is_file())
        assert dev.db_path in written
        assert dev.db_path.with_name("faceseal.db-wal") in written
        assert _leaks(written, needles) == []

    assert subprocess_daemon.stop() == 0
    written = sorted(p for p in dev.data_dir.rglob("*") if p.is_file())
    assert dev.db_path in written
    log = subprocess_daemon.log_path
    assert '"msg":"stopped"' in log.read_text()  # the log was captured: it is not empty
    assert _leaks([*written, log], needles) == []

    # The checks can fail: the same search finds each kind of needle where it is present.
    planted = dev.dir.parent / "planted"
    planted.write_bytes(b"x" + dev.kek() + chosen[2].astype("<f4").tobytes()[40:60] + SUBJECTS[1].encode())
    assert {leak.split(": ", 1)[1].split(" (")[0] for leak in _leaks([planted], needles)} == {
        "KEK",
        "encoding #2",
        "subject id #1",
    }
