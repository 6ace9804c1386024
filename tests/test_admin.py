"""The admin service end to end: who may call it, what status reports, and the key lifecycle
(rotate, rewrap, retire) with its refusals; plus ``faceseal admin`` on the command line.

Every daemon here runs in process over real mutual TLS (tests/conftest.py). What the daemon
says is checked against the SQLite file itself where that is the stronger witness.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    F32,
    FACESEALD,
    InProcessDaemon,
    admin_client,
    db_execute,
    db_snapshot,
    key_versions_in_db,
    lift_rate_limit,
    random_encodings,
)

from faceseal.client import (
    AdminClient,
    FailedPreconditionError,
    GalleryStatus,
    KeyVersion,
    NotFoundError,
    PermissionDeniedError,
    RewrapProgress,
    Status,
    UnauthenticatedError,
)
from faceseal.client.cli import main

ALICE, ALICE_2, BOB, CAROL, DAVE = random_encodings(5, seed=700)
FACES_ONLY = {"name": "faces", "dimension": 128, "metric": "euclidean"}


def _admin(daemon: InProcessDaemon) -> AdminClient:
    return admin_client(daemon.dev, daemon.target)


def _assert_all_match(daemon: InProcessDaemon, people: dict[str, F32]) -> None:
    gateway = daemon.client("gateway")
    refused = [subject for subject, encoding in people.items() if not gateway.match(subject, encoding).match]
    assert not refused, f"genuine probes did not match: {refused}"


def _seal_files(daemon: InProcessDaemon) -> tuple[bytes, bool]:
    """The KEK bytes and whether a half-done KEK rotation left ``seal.key.next`` behind."""
    return daemon.dev.kek(), (daemon.dev.dir / "seal.key.next").exists()


# ----------------------------------------------------------------------------------- who may call


@pytest.mark.parametrize("profile", ["gateway", "enroller"])
def test_only_the_admin_certificate_may_call_the_admin_service(daemon: InProcessDaemon, profile: str) -> None:
    daemon.client("enroller").enroll("alice", ALICE)
    other = admin_client(daemon.dev, daemon.target, profile=profile)
    calls = {
        "GetStatus": other.status,
        "RotateKey": other.rotate_key,
        "Rewrap": lambda: list(other.rewrap()),
        "RetireKey": lambda: other.retire_key(1),
    }
    refused = {}
    for method, call in calls.items():
        try:
            call()
        except PermissionDeniedError as err:
            refused[method] = err.message
    assert set(refused) == set(calls), f"not refused: {set(calls) - set(refused)}"
    assert all("'admin' permission" in message for message in refused.values()), refused

    # Nothing happened: still one key version, the keyring and the KEK untouched.
    assert _admin(daemon).status().key_versions == (KeyVersion(1, 1, True),)
    assert key_versions_in_db(daemon.dev.db_path) == ({1: 1}, [1])


def test_a_certificate_unknown_to_the_policy_is_unauthenticated(daemon: InProcessDaemon) -> None:
    daemon.dev.issue_client("stranger")  # from our CA, but no policy entry
    stranger = admin_client(daemon.dev, daemon.target, profile="stranger")
    with pytest.raises(UnauthenticatedError):
        stranger.status()
    with pytest.raises(UnauthenticatedError):
        list(stranger.rewrap())


# ------------------------------------------------------------------------------------------ status


def test_status_reports_galleries_and_key_versions(harness: InProcessDaemon) -> None:
    harness.dev.add_gallery("staff", dimension=4, metric="cosine", threshold=0.3)
    harness.start()
    admin = _admin(harness)

    empty = admin.status()
    assert empty.sealed is False
    assert empty.key_versions == (KeyVersion(1, 0, True),)
    assert sorted(empty.galleries, key=lambda g: g.name) == [
        GalleryStatus("faces", 128, "euclidean", 0, 0),
        GalleryStatus("staff", 4, "cosine", 0, 0),
    ]

    enroller = harness.client("enroller")
    enroller.enroll("alice", ALICE)
    enroller.enroll("alice", ALICE_2)
    enroller.enroll("bob", BOB)
    enroller.enroll("carol", [0.1, 0.2, 0.3, 0.4], gallery="staff")

    status = admin.status()
    assert status == Status(
        sealed=False,
        key_versions=(KeyVersion(1, 4, True),),
        galleries=status.galleries,
    )
    assert status.active_version == 1
    assert {g.name: g for g in status.galleries} == {
        "faces": GalleryStatus("faces", 128, "euclidean", subject_count=2, template_count=3),
        "staff": GalleryStatus("staff", 4, "cosine", subject_count=1, template_count=1),
    }

    # Deleting is reflected as well.
    assert harness.client("enroller").delete("alice") == 2
    faces = {g.name: g for g in admin.status().galleries}["faces"]
    assert (faces.subject_count, faces.template_count) == (1, 1)
    assert admin.status().key_versions == (KeyVersion(1, 2, True),)


# ---------------------------------------------------------------------------------------- rotation


def test_rotate_makes_a_new_active_version_that_new_enrollments_use(daemon: InProcessDaemon) -> None:
    enroller, admin = daemon.client("enroller"), _admin(daemon)
    enroller.enroll("alice", ALICE)

    assert admin.rotate_key() == 2
    assert admin.status().key_versions == (KeyVersion(1, 1, False), KeyVersion(2, 0, True))

    enroller.enroll("bob", BOB)
    enroller.enroll("alice", ALICE_2)  # a second template of an old subject: new version too
    assert admin.status().key_versions == (KeyVersion(1, 1, False), KeyVersion(2, 2, True))
    assert key_versions_in_db(daemon.dev.db_path) == ({1: 1, 2: 2}, [1, 2])

    assert admin.rotate_key() == 3
    enroller.enroll("carol", CAROL)
    assert admin.status().key_versions == (
        KeyVersion(1, 1, False),
        KeyVersion(2, 2, False),
        KeyVersion(3, 1, True),
    )
    # Templates under every version still open and match, before and after a restart.
    people = {"alice": ALICE, "bob": BOB, "carol": CAROL}
    _assert_all_match(daemon, people)
    daemon.restart()
    _assert_all_match(daemon, people)
    assert _admin(daemon).status().active_version == 3


# ------------------------------------------------------------------------------------- retirement


def test_retire_refuses_the_active_version_even_when_it_is_the_only_one(daemon: InProcessDaemon) -> None:
    daemon.client("enroller").enroll("alice", ALICE)
    before, seal_before = db_snapshot(daemon.dev.db_path), _seal_files(daemon)
    with pytest.raises(FailedPreconditionError, match="active"):
        _admin(daemon).retire_key(1)
    assert db_snapshot(daemon.dev.db_path) == before
    assert _seal_files(daemon) == seal_before


def test_retire_refusals_change_nothing(daemon: InProcessDaemon) -> None:
    enroller, admin = daemon.client("enroller"), _admin(daemon)
    enroller.enroll("alice", ALICE)
    enroller.enroll("bob", BOB)
    assert admin.rotate_key() == 2
    enroller.enroll("carol", CAROL)

    status, snapshot, seal = admin.status(), db_snapshot(daemon.dev.db_path), _seal_files(daemon)
    assert seal[1] is False

    with pytest.raises(FailedPreconditionError, match="active"):
        admin.retire_key(2)
    with pytest.raises(FailedPreconditionError, match="2 templates") as in_use:
        admin.retire_key(1)
    assert "Rewrap" in in_use.value.message
    for unknown in (3, 99, 2**32 - 1):
        with pytest.raises(NotFoundError, match="key version"):
            admin.retire_key(unknown)
    with pytest.raises(ValueError, match="positive"):
        admin.retire_key(0)  # refused by the client: no such version can exist

    # Nothing changed: not the keyring (wrapped keys), not a template, not the KEK file.
    assert admin.status() == status
    assert db_snapshot(daemon.dev.db_path) == snapshot
    assert _seal_files(daemon) == seal
    _assert_all_match(daemon, {"alice": ALICE, "bob": BOB, "carol": CAROL})


def test_rewrap_then_retire(daemon: InProcessDaemon) -> None:
    enroller, admin = daemon.client("enroller"), _admin(daemon)
    for subject, encoding in (("alice", ALICE), ("alice", ALICE_2), ("bob", BOB)):
        enroller.enroll(subject, encoding)
    assert admin.rotate_key() == 2
    enroller.enroll("carol", CAROL)
    kek_before = daemon.dev.kek()

    progress = list(admin.rewrap())
    assert progress[0] == RewrapProgress(0, 3, 2)
    assert progress[-1] == RewrapProgress(3, 3, 2)
    assert admin.status().key_versions == (KeyVersion(1, 0, False), KeyVersion(2, 4, True))

    admin.retire_key(1)
    assert admin.status().key_versions == (KeyVersion(2, 4, True),)
    assert key_versions_in_db(daemon.dev.db_path) == ({2: 4}, [2])
    # Retiring also rotated the KEK (so backups holding v1 stop unwrapping); no half-done rotation.
    assert daemon.dev.kek() != kek_before
    assert not (daemon.dev.dir / "seal.key.next").exists()
    with pytest.raises(NotFoundError):
        admin.retire_key(1)  # gone for good

    people = {"alice": ALICE_2, "bob": BOB, "carol": CAROL}
    _assert_all_match(daemon, people)
    daemon.restart()  # the rotated KEK opens the re-wrapped keyring
    _assert_all_match(daemon, people)
    assert _admin(daemon).status().key_versions == (KeyVersion(2, 4, True),)
    assert daemon.client("enroller").enroll("dave", DAVE).template_count == 1
    assert _admin(daemon).status().key_versions == (KeyVersion(2, 5, True),)


def test_rewrap_is_resumable(daemon: InProcessDaemon) -> None:
    enroller, admin = daemon.client("enroller"), _admin(daemon)
    people = dict(zip((f"p{i}" for i in range(40)), random_encodings(40, seed=701), strict=True))
    for subject, encoding in people.items():
        enroller.enroll(subject, encoding)

    # Nothing to do on a fresh store: one report, total 0.
    assert list(admin.rewrap()) == [RewrapProgress(0, 0, 1)]

    assert admin.rotate_key() == 2
    assert list(admin.rewrap())[-1] == RewrapProgress(40, 40, 2)
    assert list(admin.rewrap()) == [RewrapProgress(0, 0, 2)]  # the second run finds nothing left

    # Interrupted: leave after the first report. However far the daemon got, the rerun picks up
    # exactly what is left and every row is whole (each opens after a restart).
    assert admin.rotate_key() == 3
    stream = admin.rewrap()
    assert next(stream) == RewrapProgress(0, 40, 3)
    stream.close()  # cancels the call
    rerun = list(admin.rewrap())
    left = rerun[0].total
    assert 0 <= left <= 40
    assert rerun[-1] == RewrapProgress(left, left, 3)
    assert list(admin.rewrap()) == [RewrapProgress(0, 0, 3)]
    assert key_versions_in_db(daemon.dev.db_path)[0] == {3: 40}
    daemon.restart()
    _assert_all_match(daemon, people)


def test_rewrap_reports_a_template_that_does_not_open_and_retire_waits_for_it(
    harness: InProcessDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.start()
    enroller = harness.client("enroller")
    enroller.enroll("alice", ALICE)
    bob = enroller.enroll("bob", BOB).template_id
    harness.stop()
    # Tamper with bob's template behind the daemon's back: it will not open (an alarm, never a match).
    (blob,) = [r[-1] for r in db_snapshot(harness.dev.db_path)["templates"] if bytes.fromhex(bob) in r]
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    sql = "UPDATE templates SET template_blob = ? WHERE template_id = ?"
    assert db_execute(harness.dev.db_path, sql, (flipped, bytes.fromhex(bob))) == 1
    harness.start()
    admin = _admin(harness)
    assert admin.rotate_key() == 2

    # The run ends with a final report that says one of the two did not open; the CLI exits 1.
    assert main(_cli(harness, "rewrap")) == 1
    assert capsys.readouterr().out == (
        "re-sealed 1 of 2 templates under key version 2; "
        "not re-sealed: 1 that failed to open (see the daemon's integrity alarm)\n"
    )
    assert list(admin.rewrap())[-1] == RewrapProgress(0, 1, 2)

    # Version 1 still seals bob's (broken) row, so it cannot be retired until that row is gone.
    with pytest.raises(FailedPreconditionError, match="1 templates"):
        admin.retire_key(1)
    assert harness.client("enroller").delete("bob") == 1
    admin.retire_key(1)
    assert admin.status().key_versions == (KeyVersion(2, 1, True),)
    _assert_all_match(harness, {"alice": ALICE})


# ---------------------------------------------------------------------------------------- the CLI


def _cli(daemon: InProcessDaemon, *args: str, profile: str = "admin") -> list[str]:
    return [
        "--target",
        daemon.target,
        "--dev-dir",
        str(daemon.dev.dir),
        "--profile",
        profile,
        "admin",
        *args,
    ]


def test_cli_admin_status_json(daemon: InProcessDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    enroller = daemon.client("enroller")
    enroller.enroll("alice", ALICE)
    enroller.enroll("alice", ALICE_2)
    enroller.enroll("bob", BOB)

    assert main(_cli(daemon, "status", "--json")) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {
        "sealed": False,
        "key_versions": [{"version": 1, "template_count": 3, "active": True}],
        "galleries": [FACES_ONLY | {"subject_count": 2, "template_count": 3}],
    }
    assert out.count("\n") == 1  # exactly one JSON object

    # The installed console script says the same (options before the subcommand work too).
    faceseal = Path(FACESEALD).with_name("faceseal")
    run = subprocess.run([str(faceseal), "--json", *_cli(daemon, "status")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == json.loads(out)


def test_cli_admin_lifecycle_human_output(daemon: InProcessDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    enroller = daemon.client("enroller")
    enroller.enroll("alice", ALICE)
    enroller.enroll("bob", BOB)

    assert main(_cli(daemon, "status")) == 0
    assert capsys.readouterr().out == (
        "sealed: no\n"
        "key versions:\n"
        "  v1  2 templates  (active)\n"
        "galleries:\n"
        "  faces  128-d euclidean  2 subjects, 2 templates\n"
    )

    assert main(_cli(daemon, "rotate")) == 0
    assert capsys.readouterr().out.startswith("key version 2 is active")

    assert main(_cli(daemon, "retire", "1", "--json")) == 1
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    assert "Rewrap" in error["message"]
    assert captured.err.startswith("faceseal: FAILED_PRECONDITION: ")

    assert main(_cli(daemon, "rewrap")) == 0
    captured = capsys.readouterr()
    assert captured.out == "re-sealed 2 templates under key version 2\n"
    assert captured.err == ""  # not a terminal: no progress bar

    assert main(_cli(daemon, "rewrap", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == {"done": 0, "total": 0, "target_version": 2}

    assert main(_cli(daemon, "retire", "1")) == 0
    assert capsys.readouterr().out.startswith("retired key version 1")
    assert main(_cli(daemon, "status", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["key_versions"] == [{"version": 2, "template_count": 2, "active": True}]

    # Another caller's certificate is refused, and says so.
    assert main(_cli(daemon, "rotate", profile="gateway")) == 1
    assert capsys.readouterr().err.startswith("faceseal: PERMISSION_DENIED: ")
    # A version must be a positive number: a usage error, before any call.
    with pytest.raises(SystemExit) as usage:
        main(_cli(daemon, "retire", "0"))
    assert usage.value.code == 2
    capsys.readouterr()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_rewrap_draws_a_progress_bar_on_a_terminal(
    harness: InProcessDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lift_rate_limit(harness.dev)  # 300 enrollments in a burst
    daemon = harness.start()
    enroller = daemon.client("enroller")
    for i, encoding in enumerate(random_encodings(300, seed=702)):
        enroller.enroll(f"s{i}", encoding)
    assert _admin(daemon).rotate_key() == 2

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(_cli(daemon, "rewrap")) == 0
    assert capsys.readouterr().out == "re-sealed 300 templates under key version 2\n"

    drawn = terminal.getvalue()
    frames = drawn.rstrip("\n").split("\r")[1:]
    assert drawn.startswith("\r[")
    assert drawn.endswith("\n")  # the bar's line is ended before anything else is written
    assert frames[0] == "[" + "." * 30 + "] 0/300 re-sealed under key version 2"
    assert frames[-1] == "[" + "#" * 30 + "] 300/300 re-sealed under key version 2"
    assert any(f.endswith(" 256/300 re-sealed under key version 2") for f in frames)
