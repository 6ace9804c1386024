"""Key rotation without downtime, and crypto-shredding of old backups.

* Under load: 200 subjects (the 140 real dlib encodings plus 60 synthetic subjects with three
  templates each: 320 templates, so Rewrap reports progress more than once) while four threads
  keep calling Match with genuine probes. RotateKey, Rewrap and RetireKey(1) run meanwhile, and
  not one Match may fail or answer "no match". Afterwards the SQLite file itself shows every row
  re-sealed under the new version, and status knows only that version.
* Shredding: a backup of the store taken before the rotation opens with the seal; after rotate,
  rewrap and retire it no longer does (the file seal rotated its key file), so a daemon pointed at
  it stays sealed and says why, while the live store still serves.

The real encodings are biometric data: nothing here prints them, and failures name subjects only.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from helpers import (
    DIM,
    F32,
    Dev,
    InProcessDaemon,
    SealedSubprocessDaemon,
    admin_client,
    key_versions_in_db,
    lift_rate_limit,
    load_real_encodings,
    log_records,
    nearby,
    poll,
    random_encodings,
    sqlite_backup,
)

from faceseal.client import FaceSealClient, FaceSealClientError, KeyVersion, RewrapProgress, UnavailableError
from faceseal.server.crypto import blob, vault
from faceseal.server.seal.base import SealError
from faceseal.server.seal.file import FileSeal
from faceseal.server.store.sqlite import SQLiteStore

THREADS = 4
SYNTHETIC_SUBJECTS = 60
TEMPLATES_EACH = 3
SUBJECTS = 140 + SYNTHETIC_SUBJECTS
TEMPLATES = 140 + SYNTHETIC_SUBJECTS * TEMPLATES_EACH
GENUINE = 0.3  # euclidean distance of a genuine probe from one of its subject's templates (threshold 0.6)
CALLS_PER_PHASE = 25  # Match calls each thread must complete in every phase of the rotation


def _enroll_population(daemon: InProcessDaemon) -> list[tuple[str, F32]]:
    """Enroll the 200 subjects; return one genuine probe per subject."""
    real, _labels = load_real_encodings()
    enroller = daemon.client("enroller")
    probes: list[tuple[str, F32]] = []
    for i, encoding in enumerate(real):
        subject = f"face-{i:03d}"
        enroller.enroll(subject, encoding)
        probes.append((subject, nearby(encoding, GENUINE, seed=i)))
    synthetic = random_encodings(SYNTHETIC_SUBJECTS * TEMPLATES_EACH, seed=900)
    for s in range(SYNTHETIC_SUBJECTS):
        subject = f"synthetic-{s:02d}"
        for t in range(TEMPLATES_EACH):
            enroller.enroll(subject, synthetic[s * TEMPLATES_EACH + t])
        probes.append((subject, nearby(synthetic[s * TEMPLATES_EACH + s % TEMPLATES_EACH], GENUINE, seed=1000 + s)))
    return probes


def _rows(path: Path) -> list[tuple[str, int, bytes, bytes]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT template_id, key_version, subject_blob, template_blob FROM templates")
        return [(bytes(t).hex(), int(v), bytes(s), bytes(b)) for t, v, s, b in rows.fetchall()]


class _MatchLoad:
    """``THREADS`` threads calling Match with genuine probes until stopped; failures are kept as
    (subject, what happened) and never carry a vector."""

    def __init__(self, clients: list[FaceSealClient], probes: list[tuple[str, F32]]) -> None:
        self._clients = clients
        self._probes = probes
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.calls = [0] * len(clients)
        self.failures: list[tuple[str, str]] = []
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"match-{n}", daemon=True) for n in range(len(clients))
        ]

    def _run(self, n: int) -> None:
        client = self._clients[n]
        for k in itertools.count(n * 53):
            if self._stop.is_set():
                return
            subject, probe = self._probes[k % len(self._probes)]
            try:
                ok = client.match(subject, probe, timeout=10).match
                failure = None if ok else "no match"
            except FaceSealClientError as err:
                failure = err.code.name
            except Exception as err:  # anything else is a failure too, and must not end the thread
                failure = type(err).__name__
            with self._lock:
                self.calls[n] += 1
                if failure is not None:
                    self.failures.append((subject, failure))

    def __enter__(self) -> _MatchLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads), "a Match thread did not stop"

    def total(self) -> int:
        with self._lock:
            return sum(self.calls)

    def wait_for_more(self, phase: str, n: int = CALLS_PER_PHASE) -> None:
        """Return once every thread has completed ``n`` more calls than now: traffic in this phase."""
        with self._lock:
            goal = [c + n for c in self.calls]

        def reached() -> bool | None:
            with self._lock:
                return all(c >= g for c, g in zip(self.calls, goal, strict=True)) or None

        poll(f"{n} Match calls per thread {phase}", reached, deadline=30)


def test_rotation_under_load_loses_no_match(harness: InProcessDaemon) -> None:
    lift_rate_limit(harness.dev)  # four threads call as fast as they can: not a test of the guard
    harness.start()
    probes = _enroll_population(harness)
    admin = admin_client(harness.dev, harness.target)
    assert admin.status().key_versions == (KeyVersion(1, TEMPLATES, True),)
    before = {template_id: template_blob for template_id, _, _, template_blob in _rows(harness.dev.db_path)}
    assert len(before) == TEMPLATES

    clients = [harness.client("gateway") for _ in range(THREADS)]
    with _MatchLoad(clients, probes) as load:
        load.wait_for_more("before the rotation")
        assert admin.rotate_key() == 2
        load.wait_for_more("with two key versions")
        calls_before_rewrap = load.total()
        progress = list(admin.rewrap())
        calls_during_rewrap = load.total() - calls_before_rewrap
        load.wait_for_more("after the rewrap")
        admin.retire_key(1)
        load.wait_for_more("after the retirement")
        calls = load.total()

    assert load.failures == [], f"{len(load.failures)} of {calls} Match calls failed, e.g. {load.failures[:5]}"
    assert calls >= THREADS * CALLS_PER_PHASE * 4
    assert calls_during_rewrap > 0, "no Match call overlapped the rewrap"
    assert progress == [
        RewrapProgress(0, TEMPLATES, 2),
        RewrapProgress(256, TEMPLATES, 2),
        RewrapProgress(TEMPLATES, TEMPLATES, 2),
    ]

    # The file itself: every row is re-sealed (new blob) under version 2, in the column and in both
    # blobs' headers, and the wrapped keyring holds data key 2 only.
    rows = _rows(harness.dev.db_path)
    assert len(rows) == TEMPLATES
    wrong = [
        template_id
        for template_id, version, subject_blob, template_blob in rows
        if (version, blob.parse(subject_blob).key_version, blob.parse(template_blob).key_version) != (2, 2, 2)
    ]
    assert wrong == [], f"{len(wrong)} rows are not under key version 2"
    assert all(before[template_id] != template_blob for template_id, _, _, template_blob in rows)
    assert key_versions_in_db(harness.dev.db_path) == ({2: TEMPLATES}, [2])

    status = admin.status()
    assert status.key_versions == (KeyVersion(2, TEMPLATES, True),)
    (faces,) = status.galleries
    assert (faces.name, faces.dimension, faces.subject_count, faces.template_count) == (
        "faces",
        DIM,
        SUBJECTS,
        TEMPLATES,
    )


def _keyring_versions(store_path: Path, key_file: Path) -> list[int]:
    """Unwrap the keyring of a store file directly, as an attacker holding the key file would."""
    store = SQLiteStore(store_path)
    try:
        return vault.load_or_create(store, FileSeal(key_file)).versions()
    finally:
        store.close()


def _all_match(client: FaceSealClient, probes: list[tuple[str, F32]]) -> list[str]:
    """The subjects whose genuine probe did not match (empty when all did)."""
    return [subject for subject, probe in probes if not client.match(subject, probe).match]


def _refused_with(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except FaceSealClientError as err:
        return err.code
    return None


def test_retiring_the_old_key_shreds_backups_taken_before(harness: InProcessDaemon, tmp_path: Path) -> None:
    dev: Dev = harness.dev
    key_file = dev.dir / "seal.key"
    lift_rate_limit(dev)
    harness.start()
    probes = _enroll_population(harness)

    # Writes have stopped (every enrollment was acknowledged and nothing else writes): back up.
    backup = dev.data_dir / "backup.db"
    sqlite_backup(dev.db_path, backup)
    assert _keyring_versions(backup, key_file) == [1]  # a working backup, as of now

    admin = admin_client(dev, harness.target)
    assert admin.rotate_key() == 2
    assert list(admin.rewrap())[-1] == RewrapProgress(TEMPLATES, TEMPLATES, 2)
    admin.retire_key(1)
    harness.stop()
    assert not (dev.dir / "seal.key.next").exists()

    # The backup no longer unwraps with the seal (same key file path, rotated key inside)...
    with pytest.raises(SealError, match="key-encryption key"):
        _keyring_versions(backup, key_file)

    # ...so a daemon with the same config, pointed at the backup, stays sealed and says why.
    dev.edit_config(lambda c: c["store"].update(url="sqlite:data/backup.db"))
    sealed = SealedSubprocessDaemon(dev, tmp_path / "sealed.log")
    try:
        sealed.start()  # returns once it listens and reports NOT_SERVING
        gateway = dev.client(sealed.target, "gateway")
        sealed_admin = admin_client(dev, sealed.target)
        subject, probe = probes[0]
        assert _refused_with(lambda: gateway.match(subject, probe)) == grpc.StatusCode.UNAVAILABLE
        assert _refused_with(sealed_admin.rotate_key) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(UnavailableError):
            list(sealed_admin.rewrap())
        status = sealed_admin.status()
        assert (status.sealed, status.key_versions, status.galleries) == (True, (), ())

        def reasons() -> list[str] | None:
            found = [
                str(r.get("reason", "")) for r in log_records(sealed.log()) if r.get("msg") == "still sealed; retrying"
            ]
            return found if len(found) >= 2 else None  # it retried, and is still sealed

        why = poll("the sealed daemon to log why, twice", reasons, deadline=20)
        assert all("key-encryption key this seal does not hold" in reason for reason in why), why
        assert gateway.health() == "NOT_SERVING"
    finally:
        sealed.ensure_stopped()

    # The live store, by contrast, opens with the rotated key file and every subject still matches.
    dev.edit_config(lambda c: c["store"].update(url="sqlite:data/faceseal.db"))
    harness.start()
    assert _keyring_versions(dev.db_path, key_file) == [2]
    refused = _all_match(harness.client("gateway"), probes)
    assert refused == [], f"genuine probes refused after the rotation: {refused}"
