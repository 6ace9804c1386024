"""An acknowledged Enroll survives kill -9: a client streams enrollments, the daemon is killed
mid-stream, and after a restart every acknowledged subject matches its own encoding."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from functools import partial

import grpc
import pytest
from helpers import SubprocessDaemon, poll, random_encodings

from faceseal.client import FaceSealClient, FaceSealClientError

pytestmark = pytest.mark.slow

ROUNDS = (15, 40, 25)  # acknowledgements to wait for before each kill
MAX_PER_ROUND = 2000  # far more than a round gets through before its kill
ENCODINGS = random_encodings(len(ROUNDS) * MAX_PER_ROUND, seed=500)


def _row_count(subprocess_daemon: SubprocessDaemon) -> int:
    # Read-only: the daemon itself, not this check, must recover the WAL at its next start.
    uri = f"file:{subprocess_daemon.dev.db_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM templates").fetchone()[0])


class Writer(threading.Thread):
    """Enrolls distinct subjects one after the other until a call fails; records what was acked."""

    def __init__(self, client: FaceSealClient, round_no: int) -> None:
        super().__init__(name=f"enroll-round{round_no}")
        self.client, self.round_no = client, round_no
        self.acknowledged: dict[str, int] = {}  # subject id -> index of its encoding
        self.ended_with: grpc.StatusCode | None = None

    def acknowledged_at_least(self, count: int) -> bool | None:
        return len(self.acknowledged) >= count or None

    def run(self) -> None:
        for k in range(MAX_PER_ROUND):
            index = self.round_no * MAX_PER_ROUND + k
            subject = f"round{self.round_no}-subject{k}"
            try:
                self.client.enroll(subject, ENCODINGS[index])
            except FaceSealClientError as err:
                self.ended_with = err.code
                return
            self.acknowledged[subject] = index


def test_acknowledged_enrollments_survive_kill_9(subprocess_daemon: SubprocessDaemon) -> None:
    dev = subprocess_daemon.dev
    acknowledged: dict[str, int] = {}

    for round_no, wanted in enumerate(ROUNDS):
        subprocess_daemon.start()
        with dev.client(subprocess_daemon.target, "enroller", timeout=5) as enroller:
            writer = Writer(enroller, round_no)
            writer.start()
            try:
                poll(f"{wanted} acknowledged enrollments", partial(writer.acknowledged_at_least, wanted))
            finally:
                subprocess_daemon.kill9()
                writer.join(30)
        assert not writer.is_alive(), "the client did not notice the daemon died"
        assert writer.ended_with == grpc.StatusCode.UNAVAILABLE, "the kill did not land mid-stream"
        acknowledged.update(writer.acknowledged)

        # At most the one call in flight at each kill may have committed without its answer.
        rows = _row_count(subprocess_daemon)
        assert len(acknowledged) <= rows <= len(acknowledged) + round_no + 1

    subprocess_daemon.start()
    with dev.client(subprocess_daemon.target, "gateway") as gateway:
        for subject, index in acknowledged.items():
            assert gateway.match(subject, ENCODINGS[index]).match is True, subject
        # Matching is real, not "everything matches": someone else's encoding is refused.
        for subject, index in list(acknowledged.items())[:: max(1, len(acknowledged) // 10)]:
            other = ENCODINGS[(index + 1) % len(ENCODINGS)]
            assert gateway.match(subject, other).match is False
    assert subprocess_daemon.stop() == 0
