"""Abuse resistance, part 2: kill -9 in a loop during enrollment, then check that nothing was lost.

A client thread streams Enroll calls at ``faceseald serve`` (a real child process) and records
every acknowledged one; the daemon is SIGKILLed at a pseudo-random moment (a fixed seed, at most
half a second after the round's first acknowledgement), restarted, and killed again, KILLS times.
Every fifth call re-enrolls an already acknowledged subject with ``replace`` (a delete and an
insert in one transaction), so a kill also lands inside replacements.

Afterwards:

* zero acknowledged writes lost: every acknowledged subject matches its own encoding, and
  someone else's encoding is still refused;
* a replacement is atomic: no subject ever has zero or two templates, whenever the kill came;
* at most one unacknowledged write per kill reached the store (the call in flight);
* SQLite's ``PRAGMA integrity_check`` says ``ok`` after every kill and at the end;
* the audit chain verifies (``faceseald audit verify --config ...`` exits 0), and every
  acknowledged Enroll has its audit record, because the record is written before the commit.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import subprocess
import threading
import time
from functools import partial

import grpc
import pytest
from helpers import FACESEALD, Dev, SubprocessDaemon, lift_rate_limit, poll, random_encodings

from faceseal.client import FaceSealClient, FaceSealClientError
from faceseal.server.audit.log import derive_audit_key, segments, subject_hmac
from faceseal.server.config import load_config
from faceseal.server.crypto import vault
from faceseal.server.daemon import open_store
from faceseal.server.seal import seal_from_config

pytestmark = pytest.mark.slow

KILLS = 24
MAX_DELAY = 0.5  # seconds after a round's first acknowledgement; the kill lands in [0, MAX_DELAY]
MAX_PER_ROUND = 2000  # far more than a round gets through before its kill
REPLACE_EVERY = 5
GALLERY = "faces"  # the dev config's default gallery
ENCODINGS = random_encodings(KILLS * MAX_PER_ROUND, seed=700)


def _read_only(dev: Dev) -> contextlib.closing[sqlite3.Connection]:
    # Read-only: the daemon itself, not this check, must recover the WAL at its next start.
    return contextlib.closing(sqlite3.connect(f"file:{dev.db_path}?mode=ro", uri=True))


def integrity(dev: Dev) -> str:
    with _read_only(dev) as db:
        return "; ".join(str(row[0]) for row in db.execute("PRAGMA integrity_check").fetchall())


def templates_per_subject(dev: Dev) -> list[int]:
    with _read_only(dev) as db:
        rows = db.execute("SELECT count(*) FROM templates GROUP BY gallery, subject_ref").fetchall()
        return [int(n) for (n,) in rows]


class Writer(threading.Thread):
    """Enrolls until a call fails. New subjects get distinct encodings; every REPLACE_EVERY-th call
    re-enrolls an earlier acknowledged subject (with its own encoding) and ``replace``."""

    def __init__(self, client: FaceSealClient, round_no: int, earlier: dict[str, int], rng: random.Random) -> None:
        super().__init__(name=f"enroll-round{round_no}", daemon=True)
        self.client, self.round_no, self.rng = client, round_no, rng
        self.earlier = sorted(earlier.items())
        self.acknowledged: dict[str, int] = {}  # new subject id -> index of its encoding
        self.replaced = 0
        self.ended_with: grpc.StatusCode | None = None

    def acknowledged_at_least(self, count: int) -> bool | None:
        return len(self.acknowledged) + self.replaced >= count or None

    def run(self) -> None:
        for k in range(MAX_PER_ROUND):
            replace = bool(self.earlier) and k % REPLACE_EVERY == REPLACE_EVERY - 1
            if replace:
                subject, index = self.rng.choice(self.earlier)
            else:
                subject, index = f"r{self.round_no}-s{k}", self.round_no * MAX_PER_ROUND + k
            try:
                result = self.client.enroll(subject, ENCODINGS[index], replace=replace)
            except FaceSealClientError as err:
                self.ended_with = err.code
                return
            if replace:
                assert result.template_count == 1, "a replacement left more than one template"
                self.replaced += 1
            else:
                self.acknowledged[subject] = index


def audit_key(dev: Dev) -> bytes:
    """The audit HMAC key, unwrapped the way ``faceseald audit verify --config`` does it."""
    config = load_config(dev.config_path)
    store = open_store(config)
    try:
        return derive_audit_key(vault.load(store, seal_from_config(config.seal, config.path)).index_key.reveal())
    finally:
        store.close()


def audited_enrollments(dev: Dev) -> set[str]:
    """The subject HMACs of every successful Enroll the audit log recorded."""
    subjects = set()
    for segment in segments(load_config(dev.config_path).audit.dir):
        for line in segment.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if str(record.get("method", "")).endswith("/Enroll") and record.get("outcome") == "OK":
                subjects.add(record["subject"])
    return subjects


def test_acknowledged_enrollments_survive_kill_9_in_a_loop(subprocess_daemon: SubprocessDaemon) -> None:
    dev = subprocess_daemon.dev
    lift_rate_limit(dev)  # the final check matches every subject as fast as it can
    rng = random.Random(20261127)  # the same kill moments on every run
    acknowledged: dict[str, int] = {}
    replaced = 0
    starts: list[float] = []
    began = time.monotonic()

    for round_no in range(KILLS):
        t0 = time.monotonic()
        subprocess_daemon.start()
        starts.append(time.monotonic() - t0)
        with dev.client(subprocess_daemon.target, "enroller", timeout=5) as enroller:
            writer = Writer(enroller, round_no, acknowledged, rng)
            writer.start()
            try:
                poll("the round's first acknowledgement", partial(writer.acknowledged_at_least, 1))
                time.sleep(rng.uniform(0, MAX_DELAY))
            finally:
                subprocess_daemon.kill9()
                writer.join(30)
        assert not writer.is_alive(), "the client did not notice the daemon died"
        assert writer.ended_with == grpc.StatusCode.UNAVAILABLE, f"round {round_no}: {writer.ended_with}"
        acknowledged.update(writer.acknowledged)
        replaced += writer.replaced

        assert integrity(dev) == "ok", f"after kill {round_no + 1}"
        counts = templates_per_subject(dev)
        assert set(counts) <= {1}, f"after kill {round_no + 1}: a subject with {max(counts)} templates"
        # Every acknowledged subject is there; at most the call in flight at each kill is extra.
        assert len(acknowledged) <= len(counts) <= len(acknowledged) + round_no + 1

    loop_seconds = time.monotonic() - began
    subprocess_daemon.start()
    with dev.client(subprocess_daemon.target, "gateway") as gateway:
        for subject, index in acknowledged.items():
            assert gateway.match(subject, ENCODINGS[index]).match is True, subject
        # Matching is real, not "everything matches": someone else's encoding is refused.
        for subject, index in list(acknowledged.items())[:: max(1, len(acknowledged) // 20)]:
            other = ENCODINGS[(index + 1) % len(ENCODINGS)]
            assert gateway.match(subject, other).match is False
    assert subprocess_daemon.stop() == 0
    assert integrity(dev) == "ok"

    verify = subprocess.run(
        [str(FACESEALD), "audit", "verify", "--config", str(dev.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, f"audit verify exited {verify.returncode}:\n{verify.stdout}{verify.stderr}"
    key = audit_key(dev)
    audited = audited_enrollments(dev)
    missing = [s for s in acknowledged if subject_hmac(key, GALLERY, s) not in audited]
    assert not missing, f"{len(missing)} acknowledged enrollments have no audit record"

    print(
        f"\n{KILLS} kills in {loop_seconds:.1f} s; {len(acknowledged)} acknowledged enrollments and "
        f"{replaced} replacements survived; daemon start {min(starts):.2f}-{max(starts):.2f} s "
        f"(mean {sum(starts) / len(starts):.2f} s); audit: {verify.stdout.strip()}"
    )
