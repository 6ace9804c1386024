"""The audit log: one chained, HMAC'd record per call; verify names the first broken line;
an unwritable log refuses calls and changes nothing; subject ids appear only as HMACs."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from helpers import Dev, InProcessDaemon, db_snapshot, random_encodings

from faceseal.client import FaceSealClientError
from faceseal.server.audit.log import segments
from faceseal.v1 import admin_pb2, admin_pb2_grpc

FACESEALD = Path(sys.executable).with_name("faceseald")
SUBJECTS = ("subject-zebra-1234", "subject-okapi-5678")


def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(FaceSealClientError) as err:
        call()
    return err.value.code


def mixed_run(daemon: InProcessDaemon) -> int:
    """Enroll, match (genuine and impostor), identify, refusals, delete. Returns the call count."""
    enc = random_encodings(3, seed=11)
    with daemon.client("enroller") as enroller, daemon.client("gateway") as gateway:
        for subject, e in zip(SUBJECTS, enc, strict=False):
            enroller.enroll(subject, e)
        assert gateway.match(SUBJECTS[0], enc[0]).match
        assert not gateway.match(SUBJECTS[0], enc[2]).match
        gateway.identify(enc[1], top_k=3)
        assert rpc_code(lambda: gateway.enroll("mallory", enc[2])) is grpc.StatusCode.PERMISSION_DENIED
        assert rpc_code(lambda: gateway.match("nobody-here", enc[0])) is grpc.StatusCode.NOT_FOUND
        assert rpc_code(lambda: enroller.enroll("x", enc[0][:5])) is grpc.StatusCode.INVALID_ARGUMENT
        assert enroller.delete(SUBJECTS[1]) == 1
    return 9


def audit_lines(dev: Dev) -> list[dict[str, object]]:
    records = []
    for path in segments(dev.data_dir / "audit"):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def verify(dev: Dev, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FACESEALD), "audit", "verify", "--config", str(dev.config_path), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_one_record_per_call_and_the_chain_verifies(daemon: InProcessDaemon, dev: Dev) -> None:
    calls = mixed_run(daemon)
    records = audit_lines(dev)
    assert len(records) == calls
    outcomes = [(r["method"], r["outcome"]) for r in records]
    assert outcomes == [
        ("/faceseal.v1.FaceSealService/Enroll", "OK"),
        ("/faceseal.v1.FaceSealService/Enroll", "OK"),
        ("/faceseal.v1.FaceSealService/Match", "OK"),
        ("/faceseal.v1.FaceSealService/Match", "OK"),
        ("/faceseal.v1.FaceSealService/Identify", "OK"),
        ("/faceseal.v1.FaceSealService/Enroll", "PERMISSION_DENIED"),
        ("/faceseal.v1.FaceSealService/Match", "NOT_FOUND"),
        ("/faceseal.v1.FaceSealService/Enroll", "INVALID_ARGUMENT"),
        ("/faceseal.v1.FaceSealService/Delete", "OK"),
    ]
    assert [r["decision"] for r in records[2:4]] == ["match", "no_match"]
    assert records[0]["caller"] == "spiffe://faceseal.dev/enroller"
    assert [r["seq"] for r in records] == list(range(1, calls + 1))
    daemon.stop()
    result = verify(dev)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{calls} records" in result.stdout


def test_subject_ids_appear_only_as_the_hmac_admin_can_compute(daemon: InProcessDaemon, dev: Dev) -> None:
    mixed_run(daemon)
    assert daemon.daemon is not None
    text = "".join(p.read_text() for p in segments(dev.data_dir / "audit"))
    for subject in SUBJECTS:
        assert subject not in text
    admin = admin_pb2_grpc.FaceSealAdminServiceStub(dev.channel(daemon.target, "admin"))
    expected = admin.GetAuditHash(admin_pb2.GetAuditHashRequest(subject_id=SUBJECTS[0])).subject_hmac
    gateway = admin_pb2_grpc.FaceSealAdminServiceStub(dev.channel(daemon.target, "gateway"))
    with pytest.raises(grpc.RpcError) as refused:
        gateway.GetAuditHash(admin_pb2.GetAuditHashRequest(subject_id=SUBJECTS[0]))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    zebra = [r for r in audit_lines(dev) if r["subject"] == expected]
    assert [(str(r["method"]).split("/")[-1], r["outcome"]) for r in zebra] == [
        ("Enroll", "OK"),
        ("Match", "OK"),
        ("Match", "OK"),
        ("GetAuditHash", "OK"),
        ("GetAuditHash", "PERMISSION_DENIED"),  # the refused attempt is on record too
    ]


@pytest.mark.parametrize("damage", ["edit", "delete", "reorder", "insert"])
def test_verify_names_the_damaged_line(daemon: InProcessDaemon, dev: Dev, damage: str) -> None:
    mixed_run(daemon)
    daemon.stop()
    (segment,) = segments(dev.data_dir / "audit")
    lines = segment.read_text().splitlines(keepends=True)
    target = 4  # 1-based line number that the damage lands on
    if damage == "edit":
        lines[target - 1] = lines[target - 1].replace('"no_match"', '"match"')
    elif damage == "delete":
        del lines[target - 1]
    elif damage == "reorder":
        lines[target - 1], lines[target] = lines[target], lines[target - 1]
    else:  # replay an earlier genuine record
        lines.insert(target - 1, lines[1])
    segment.write_text("".join(lines))
    result = verify(dev)
    assert result.returncode == 1
    assert f"{segment}:{target}:" in result.stdout, result.stdout


def test_chain_continues_across_rotated_segments(dev: Dev, harness: InProcessDaemon) -> None:
    dev.edit_config(lambda c: c.setdefault("audit", {}).update(dir="data/audit", max_bytes=4096))
    harness.start()
    for _ in range(3):
        mixed_run(harness)
        with harness.client("enroller") as enroller:
            enroller.delete(SUBJECTS[0])
    harness.stop()
    parts = segments(dev.data_dir / "audit")
    assert len(parts) >= 3
    assert all(p.stat().st_size <= 4096 for p in parts[:-1])
    assert verify(dev).returncode == 0
    # Verifying without the first segment fails at the start of the second: the chain is one.
    result = verify(dev, *parts[1:])
    assert result.returncode == 1
    assert f"{parts[1]}:1:" in result.stdout


def test_a_segment_that_cannot_be_opened_refuses_calls_until_it_can(dev: Dev, harness: InProcessDaemon) -> None:
    """Rotation onto a segment that cannot be created (here a directory stands in its way, as a
    full or read-only disk would) refuses the call; once the way is clear the log goes on, and
    the chain is whole."""
    dev.edit_config(lambda c: c.setdefault("audit", {}).update(dir="data/audit", max_bytes=4096))
    audit = dev.data_dir / "audit"
    enc = random_encodings(1, seed=7)[0]
    harness.start()
    with harness.client("enroller") as enroller, harness.client("gateway") as gateway:
        enroller.enroll("subject-okapi-5678", enc)
        blocker = audit / f"audit-{len(segments(audit)) + 1:08d}.jsonl"
        blocker.mkdir()

        def refusal() -> grpc.StatusCode | None:
            try:
                gateway.match("subject-okapi-5678", enc)
            except FaceSealClientError as err:
                return err.code
            return None

        # Answered until the first segment is full, then refused: the next one cannot be made.
        codes = [refusal() for _ in range(40)]
        assert codes[0] is None
        assert codes[-1] is grpc.StatusCode.UNAVAILABLE, codes
        assert rpc_code(lambda: gateway.match("subject-okapi-5678", enc)) is grpc.StatusCode.UNAVAILABLE
        blocker.rmdir()
        assert gateway.match("subject-okapi-5678", enc).match
    harness.stop()
    result = verify(dev)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(segments(audit)) == 2


def test_restart_continues_the_chain_and_cuts_a_torn_tail(daemon: InProcessDaemon, dev: Dev) -> None:
    mixed_run(daemon)
    daemon.stop()
    (segment,) = segments(dev.data_dir / "audit")
    with segment.open("ab") as f:
        f.write(b'{"seq": 10, "torn')  # a crash mid-write: this call was never acknowledged
    daemon.start()
    mixed_run(daemon)
    daemon.stop()
    assert verify(dev).returncode == 0
    assert len(audit_lines(dev)) == 18


def test_unwritable_audit_log_refuses_calls_and_changes_nothing(dev: Dev, harness: InProcessDaemon) -> None:
    enc = random_encodings(2, seed=5)
    harness.start()
    with harness.client("enroller") as enroller:
        enroller.enroll("subject-okapi-5678", enc[1])
    harness.stop()
    # The next segment is /dev/full: every write fails with ENOSPC, as on a full disk.
    os.symlink("/dev/full", dev.data_dir / "audit" / "audit-00000002.jsonl")
    harness.start()
    before = db_snapshot(dev.db_path)
    with harness.client("enroller") as enroller, harness.client("gateway") as gateway:
        with pytest.raises(FaceSealClientError) as err:
            enroller.enroll("subject-zebra-1234", enc[0])
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
        assert "audit" in str(err.value)
        # No decision leaves the daemon unless it is on record.
        assert rpc_code(lambda: gateway.match("subject-okapi-5678", enc[1])) is grpc.StatusCode.UNAVAILABLE
        assert rpc_code(lambda: enroller.delete("subject-okapi-5678")) is grpc.StatusCode.UNAVAILABLE
    assert db_snapshot(dev.db_path) == before
    assert harness.daemon is not None
    assert harness.daemon.metrics.audit_failures._value.get() >= 2


def test_a_short_write_whose_cut_fails_is_cut_before_the_next_record(
    dev: Dev, harness: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that takes half a record and then refuses the truncate (EIO) must not leave the
    half line for the next record to be appended to: the chain would break mid-segment."""
    enc = random_encodings(2, seed=6)
    harness.start()
    assert harness.daemon is not None
    audit = harness.daemon.core.audit
    real_write, real_truncate = os.write, os.ftruncate
    short_writes, disk_failing = [1], [True]

    def write(fd: int, data: bytes) -> int:
        if fd == audit._fd and short_writes[0]:
            short_writes[0] -= 1
            return real_write(fd, data[: len(data) // 2])
        return real_write(fd, data)

    def ftruncate(fd: int, length: int) -> None:
        if fd == audit._fd and disk_failing[0]:
            raise OSError(5, "Input/output error")
        real_truncate(fd, length)

    with harness.client("enroller") as enroller, harness.client("gateway") as gateway:
        enroller.enroll("subject-okapi-5678", enc[0])
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        # The short write: refused. The next call finds the cut still failing: refused too.
        assert rpc_code(lambda: enroller.enroll("subject-zebra-1234", enc[1])) is grpc.StatusCode.UNAVAILABLE
        assert rpc_code(lambda: gateway.match("subject-okapi-5678", enc[0])) is grpc.StatusCode.UNAVAILABLE
        # The disk recovers: the half record is cut first, then the call is recorded and answered.
        disk_failing[0] = False
        assert gateway.match("subject-okapi-5678", enc[0]).match
    harness.stop()
    result = verify(dev)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["method"].rsplit("/", 1)[-1] for r in audit_lines(dev)][-1] == "Match"


def test_cli_audit_hash_finds_the_subjects_records(daemon: InProcessDaemon, dev: Dev) -> None:
    mixed_run(daemon)
    faceseal = Path(sys.executable).with_name("faceseal")
    common = ["--dev-dir", str(dev.dir), "--target", daemon.target]
    result = subprocess.run(
        [str(faceseal), "--profile", "admin", *common, "admin", "audit-hash", "--subject", SUBJECTS[0]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    value = result.stdout.strip()
    assert len(value) == 64
    assert [r["outcome"] for r in audit_lines(dev) if r["subject"] == value][:3] == ["OK", "OK", "OK"]
    refused = subprocess.run(
        [str(faceseal), "--profile", "gateway", *common, "admin", "audit-hash", "--subject", SUBJECTS[0]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr


def test_a_change_the_store_then_refuses_is_followed_by_an_unavailable_record(
    dev: Dev, harness: InProcessDaemon
) -> None:
    enc = random_encodings(2, seed=6)
    harness.start()
    assert harness.daemon is not None
    with harness.client("enroller") as enroller:
        enroller.enroll("subject-heron-1", enc[0])
        # Another writer holds the SQLite write lock; the daemon gives up waiting after 0.2 s.
        harness.daemon.store._db.execute("PRAGMA busy_timeout = 200")  # type: ignore[attr-defined]
        with contextlib.closing(sqlite3.connect(dev.db_path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            before = db_snapshot(dev.db_path)
            for call in (lambda: enroller.enroll("subject-ibis-2", enc[1]), lambda: enroller.delete("subject-heron-1")):
                assert rpc_code(call) is grpc.StatusCode.UNAVAILABLE
            assert db_snapshot(dev.db_path) == before
            other.execute("ROLLBACK")
    records = audit_lines(dev)[-4:]  # each refused change: its OK record, then the retraction
    assert [(r["method"].rsplit("/", 1)[-1], r["outcome"]) for r in records] == [  # type: ignore[union-attr]
        ("Enroll", "OK"),
        ("Enroll", "UNAVAILABLE"),
        ("Delete", "OK"),
        ("Delete", "UNAVAILABLE"),
    ]
    assert records[0]["request_id"] == records[1]["request_id"]
    assert records[0]["subject"] == records[1]["subject"] is not None
    harness.stop()
    assert verify(dev).returncode == 0
