"""After a full session (enroll, match, identify, delete, stop), nothing the daemon wrote holds a
key, a seal credential, an enrolled encoding or a subject id in clear: not the database, its
-wal and -shm files, the audit log, nor the daemon's log. Once per seal: the dev key file's KEK,
the PKCS#11 PIN and the Vault tokens are needles, and so are the data keys and the index key
(unwrapped by the test through the seal after the daemon stopped). The HSM's and the engine's
KEKs cannot be needles: the test checks that the token and the engine refuse to reveal them."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from helpers import SubprocessDaemon, load_real_encodings
from seals import (
    EACH_SEAL,
    SealSetup,
    assert_kek_stays_in_token,
    assert_transit_key_stays_in_engine,
    unwrapped_keyring,
)

pytestmark = [pytest.mark.slow, EACH_SEAL]

SUBJECTS = [
    "subject-zebra-1234",
    "subject-okapi-5678",
    "subject-quokka-9012",
    "subject-narwhal-3456",
    "subject-axolotl-7890",
    "subject-pangolin-2468",
]


def _secret_needles(name: str, secret: bytes) -> dict[str, bytes]:
    """A secret and the encodings a careless line would write it in."""
    return {
        name: secret,
        f"{name} (hex)": secret.hex().encode(),
        f"{name} (HEX)": secret.hex().upper().encode(),
        f"{name} (base64)": base64.b64encode(secret).rstrip(b"="),
        f"{name} (base64url)": base64.urlsafe_b64encode(secret).rstrip(b"="),
    }


def _needles(secrets: dict[str, bytes], encodings: np.ndarray) -> dict[str, bytes]:
    """Byte strings that must appear in no file, by a name safe to print."""
    needles: dict[str, bytes] = {}
    for name, secret in secrets.items():
        needles.update(_secret_needles(name, secret))
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


def _leaks(contents: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    found = []
    for where, data in contents.items():
        found += [f"{where}: {name}" for name, needle in needles.items() if needle in data]
    return found


def _read(files: list[Path], label: str = "") -> dict[str, bytes]:
    return {f"{label}{path.name}": path.read_bytes() for path in files}


def test_nothing_in_clear_on_disk_or_in_logs(subprocess_daemon: SubprocessDaemon, seal_setup: SealSetup) -> None:
    dev = subprocess_daemon.dev
    encodings, _ = load_real_encodings()
    chosen = encodings[[0, 11, 27, 48, 90, 131]]
    secrets = dict(seal_setup.secrets)
    if seal_setup.kind == "file":
        secrets["KEK"] = dev.kek()
    else:
        assert not (dev.dir / "seal.key").exists()  # this daemon has no key file to read

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

        # The child got what its seal needs (SOFTHSM2_CONF) and no secret through its environment.
        # Root may read it; anyone else is kept out by the daemon being not dumpable.
        try:
            environ = Path(f"/proc/{subprocess_daemon.pid}/environ").read_bytes()
        except PermissionError:
            environ = None
        if environ is not None:
            variables = dict(v.partition(b"=")[::2] for v in environ.split(b"\0") if v)
            for name, value in seal_setup.env.items():
                assert variables.get(name.encode()) == value.encode(), name
            assert _leaks({"environment": environ}, _needles(secrets, chosen[:0])) == []

        # While running, the -wal file holds every recent write: take it now, search it below
        # (once the data keys are known).
        written = sorted(p for p in dev.data_dir.rglob("*") if p.is_file())
        assert dev.db_path in written
        assert dev.db_path.with_name("faceseal.db-wal") in written
        running = _read(written, "while running: ")

    assert subprocess_daemon.stop() == 0
    written = sorted(p for p in dev.data_dir.rglob("*") if p.is_file())
    assert dev.db_path in written
    log = subprocess_daemon.log_path
    assert '"msg":"stopped"' in log.read_text()  # the log was captured: it is not empty
    stopped = _read([*written, log])

    keyring = unwrapped_keyring(dev)
    assert {"index key v1", "data key v1"} <= set(keyring)
    needles = _needles({**secrets, **keyring}, chosen)
    # Distances the daemon computed (decision-only callers never see them): printed to 6 places.
    for i, a in enumerate(chosen):
        for j, b in enumerate(chosen):
            if i < j:
                d = float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)))
                needles[f"distance {i}-{j}"] = f"{d:.6f}".encode()
    assert _leaks({**running, **stopped}, needles) == []

    # The KEK of an HSM or an engine cannot be searched for: it never leaves the seal.
    if seal_setup.token is not None:
        assert_kek_stays_in_token(seal_setup.token, seal_setup.key_label)
    if seal_setup.bao is not None:
        assert_transit_key_stays_in_engine(seal_setup.bao, seal_setup.key_name)

    # The checks can fail: the same search finds each kind of needle where it is present.
    secret_name, secret = next(iter(secrets.items()))
    planted = {
        "planted": b"x"
        + secret
        + keyring["data key v1"].hex().encode()
        + chosen[2].astype("<f4").tobytes()[40:60]
        + SUBJECTS[1].encode()
    }
    assert {leak.split(": ", 1)[1].split(" (")[0] for leak in _leaks(planted, needles)} == {
        secret_name,
        "data key v1",
        "encoding #2",
        "subject id #1",
    }
