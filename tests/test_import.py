"""``faceseal import``: every input format, per-item refusals, and resuming an interrupted import.

The command runs as the installed console script (a child process) against an in-process daemon,
except where a test has to reach into the client (a stream cut off mid-batch, a signal during a
batch): those call ``cli.main`` in this process. Every count is checked in the SQLite file itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import DIM, Dev, InProcessDaemon, admin_client, load_real_encodings, poll, random_encodings

from faceseal.client import FaceSealClient, FaceSealClientError, InvalidArgumentError, UnavailableError, _import
from faceseal.client._import import read_import_file
from faceseal.client.cli import main

FACESEAL = Path(sys.executable).parent / "faceseal"


# ------------------------------------------------------------------------------------- helpers


def argv(daemon: InProcessDaemon, *args: str | Path) -> list[str]:
    return [
        "--profile",
        "enroller",
        "--dev-dir",
        str(daemon.dev.dir),
        "--target",
        daemon.target,
        "import",
        *[str(a) for a in args],
    ]


def run(daemon: InProcessDaemon, *args: str | Path) -> subprocess.CompletedProcess[str]:
    assert FACESEAL.is_file(), f"{FACESEAL} is missing: is the package installed in this venv?"
    return subprocess.run(
        [str(FACESEAL), *argv(daemon, *args)], capture_output=True, text=True, timeout=120, check=False
    )


def run_json(daemon: InProcessDaemon, *args: str | Path, expect: int = 0) -> dict[str, Any]:
    result = run(daemon, *args, "--json")
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def template_rows(dev: Dev) -> tuple[int, int, int]:
    """(rows, distinct template ids, distinct subjects) in the templates table of the store."""
    with contextlib.closing(sqlite3.connect(f"file:{dev.db_path}?mode=ro", uri=True)) as db:
        rows, templates, subjects = db.execute(
            "SELECT count(*), count(DISTINCT template_id), count(DISTINCT subject_ref) FROM templates"
        ).fetchone()
    return int(rows), int(templates), int(subjects)


def gallery_size(daemon: InProcessDaemon) -> tuple[int, int]:
    (gallery,) = admin_client(daemon.dev, daemon.target).status().galleries
    return gallery.subject_count, gallery.template_count


def write_npz(path: Path, encodings: np.ndarray, ids: Iterable[str], *, key: str = "ids") -> Path:
    np.savez(path, encodings=encodings, **{key: np.asarray(list(ids))})
    return path


def subject_ids(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def state_of(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


# ------------------------------------------------------------------------------------- formats


def test_npz_with_ids(daemon: InProcessDaemon, dev: Dev, tmp_path: Path) -> None:
    enc = random_encodings(25, seed=10)
    ids = subject_ids(25)
    data = write_npz(tmp_path / "people.npz", enc, ids)
    out = run_json(daemon, data, "--batch", "10")
    assert out | {"refused_items": None} == {
        "file": str(data),
        "state_file": str(data) + ".import-state",
        "total": 25,
        "done": 25,
        "imported": 25,
        "refused": 0,
        "codes": {},
        "refused_items": None,
        "resumed_from": 0,
        "complete": True,
        "stopped_by": None,
    }
    assert out["refused_items"] == []
    assert template_rows(dev) == (25, 25, 25)
    assert gallery_size(daemon) == (25, 25)
    gateway = daemon.client("gateway")
    for i in (0, 9, 10, 24):  # items of the first, second and last batch hold the right encodings
        assert gateway.match(ids[i], enc[i]).match
        assert not gateway.match(ids[i], enc[(i + 1) % 25]).match
    state = state_of(tmp_path / "people.npz.import-state")
    assert (state["done"], state["total"], state["batch"], state["imported"]) == (25, 25, 10, 25)


def test_npz_with_labels_of_the_real_data_set(daemon: InProcessDaemon, dev: Dev, tmp_path: Path) -> None:
    encodings, labels = load_real_encodings()
    data = write_npz(tmp_path / "real.npz", encodings, labels.tolist(), key="labels")
    result = run(daemon, data)  # default batch of 500: one stream
    assert result.returncode == 0, result.stderr
    assert result.stdout == "imported 140, refused 0 of 140 items\n"
    assert result.stderr == ""  # not a terminal: no progress bar
    people = len(set(labels.tolist()))
    assert template_rows(dev) == (140, 140, people)
    assert gallery_size(daemon) == (people, 140)
    assert daemon.client("gateway").match(str(labels[7]), encodings[7]).match


def test_npy_with_an_ids_file(daemon: InProcessDaemon, dev: Dev, tmp_path: Path) -> None:
    enc = random_encodings(12, seed=11)
    ids = subject_ids(12, "npy-")
    np.save(tmp_path / "enc.npy", enc)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    out = run_json(daemon, tmp_path / "enc.npy", "--ids", tmp_path / "ids.txt", "--batch", "5")
    assert (out["imported"], out["refused"], out["complete"]) == (12, 0, True)
    assert template_rows(dev) == (12, 12, 12)
    assert daemon.client("gateway").match(ids[11], enc[11]).match


def test_json_lines_with_refused_items(daemon: InProcessDaemon, dev: Dev, tmp_path: Path) -> None:
    enc = random_encodings(8, seed=12)
    lines = [json.dumps({"subject_id": f"j{i}", "encoding": enc[i].tolist()}) for i in range(8)]
    lines[2] = json.dumps({"subject_id": "not valid!", "encoding": enc[2].tolist()})
    lines[4] = json.dumps({"subject_id": "j4", "encoding": enc[4].tolist()[: DIM - 1]})  # wrong dimension
    lines[6] = json.dumps({"subject_id": "j6", "encoding": [float("nan"), *enc[6].tolist()[1:]]})
    lines.insert(5, "")  # a blank line is no item
    data = tmp_path / "people.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = run(daemon, data, "--batch", "3")
    assert result.returncode == 1, result.stderr  # an item was refused
    summary, *listed = result.stdout.splitlines()
    assert summary == "imported 5, refused 3 (INVALID_ARGUMENT: 3) of 8 items"
    assert [line.split(":")[0] for line in listed] == ["  item 2", "  item 4", "  item 6"]
    assert template_rows(dev) == (5, 5, 5)

    out = run_json(daemon, data, "--batch", "3", "--restart", "--gallery", "faces", expect=1)
    assert [(r["index"], r["code"]) for r in out["refused_items"]] == [
        (2, "INVALID_ARGUMENT"),
        (4, "INVALID_ARGUMENT"),
        (6, "INVALID_ARGUMENT"),
    ]
    assert out["codes"] == {"INVALID_ARGUMENT": 3}
    for r in out["refused_items"]:  # the daemon's reasons, never the values
        assert r["message"]
        assert not any(f"{v:.4f}" in r["message"] for v in enc.ravel())
    assert template_rows(dev) == (10, 10, 5)  # --restart sent everything again


def test_an_unknown_gallery_refuses_every_item(daemon: InProcessDaemon, dev: Dev, tmp_path: Path) -> None:
    data = write_npz(tmp_path / "p.npz", random_encodings(3, seed=13), subject_ids(3))
    out = run_json(daemon, data, "--gallery", "nope", expect=1)
    assert out["codes"] == {"NOT_FOUND": 3}
    assert template_rows(dev) == (0, 0, 0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("object_ids", "object arrays are refused"),
        ("no_ids", "expected arrays 'encodings' and 'ids'"),
        ("mismatch", "3 encodings but 2 ids"),
        ("strings", "must be a numeric array"),
    ],
)
def test_malformed_npz_files_import_nothing(
    daemon: InProcessDaemon, dev: Dev, tmp_path: Path, make: str, message: str
) -> None:
    enc = random_encodings(3, seed=14)
    path = tmp_path / f"{make}.npz"
    if make == "object_ids":
        np.savez(path, encodings=enc, ids=np.array(["a", 1, None], dtype=object))
    elif make == "no_ids":
        np.savez(path, encodings=enc, names=np.array(["a", "b", "c"]))
    elif make == "mismatch":
        np.savez(path, encodings=enc, ids=np.array(["a", "b"]))
    else:
        np.savez(path, encodings=np.array([["x"] * DIM] * 3), ids=np.array(["a", "b", "c"]))
    result = run(daemon, path, "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "CLIENT_ERROR"
    assert message in error["message"]
    assert template_rows(dev) == (0, 0, 0)
    assert not (tmp_path / f"{make}.npz.import-state").exists()


def test_readers_refuse_what_they_cannot_line_up(tmp_path: Path) -> None:
    np.save(tmp_path / "e.npy", random_encodings(2, seed=15))
    with pytest.raises(ValueError, match="pass --ids"):
        read_import_file(tmp_path / "e.npy")
    (tmp_path / "ids.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"2 encodings but .* has 3 lines"):
        read_import_file(tmp_path / "e.npy", tmp_path / "ids.txt")
    (tmp_path / "x.jsonl").write_text('{"subject_id": "a", "encoding": [1, 2]}\n{"subject_id": "b"}\n')
    with pytest.raises(ValueError, match="line 2: 'encoding' must be a list of numbers"):
        read_import_file(tmp_path / "x.jsonl")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unsupported import file type"):
        read_import_file(tmp_path / "x.json")
    np.save(tmp_path / "o.npy", np.array([[1.0, None]], dtype=object), allow_pickle=True)
    (tmp_path / "one.txt").write_text("a\n")
    with pytest.raises(ValueError, match="pickled data is refused"):
        read_import_file(tmp_path / "o.npy", tmp_path / "one.txt")


# ------------------------------------------------------------------------------------ resuming


def test_an_interrupted_import_resumes_and_stores_each_item_once(
    daemon: InProcessDaemon, dev: Dev, tmp_path: Path
) -> None:
    enc = random_encodings(47, seed=20)
    ids = subject_ids(47)
    data = write_npz(tmp_path / "p.npz", enc, ids)

    first = run(daemon, data, "--batch", "10", "--stop-after-batches", "2")
    assert first.returncode == 130, first.stderr
    assert first.stdout.startswith("stopped by --stop-after-batches after 20 of 47 items: imported 20, refused 0;")
    assert template_rows(dev) == (20, 20, 20)
    assert state_of(tmp_path / "p.npz.import-state")["done"] == 20

    # The rerun may use another batch size: progress is counted in items.
    second = run_json(daemon, data, "--batch", "7")
    assert (second["resumed_from"], second["imported"], second["done"], second["complete"]) == (20, 47, 47, True)
    assert template_rows(dev) == (47, 47, 47)
    assert gallery_size(daemon) == (47, 47)

    third = run(daemon, data)
    assert third.returncode == 0
    assert third.stdout.startswith("nothing left to import")
    assert template_rows(dev) == (47, 47, 47)


def test_a_changed_file_is_refused_unless_restarted(daemon: InProcessDaemon, dev: Dev, tmp_path: Path) -> None:
    enc = random_encodings(30, seed=21)
    data = write_npz(tmp_path / "p.npz", enc, subject_ids(30))
    state = tmp_path / "custom.state"
    assert run(daemon, data, "--batch", "10", "--state", state, "--stop-after-batches", "1").returncode == 130
    assert template_rows(dev) == (10, 10, 10)

    original = data.read_bytes()
    write_npz(data, enc[::-1].copy(), subject_ids(30, "t"))  # same size, other items
    result = run(daemon, data, "--batch", "10", "--state", state, "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "CLIENT_ERROR"
    assert "sha256 differs" in error["message"]
    assert "--restart" in error["message"]
    assert template_rows(dev) == (10, 10, 10)  # nothing sent
    assert state_of(state)["done"] == 10  # and the state kept

    # The original file with other options than the recorded ones is refused as well.
    data.write_bytes(original)
    mismatch = run(daemon, data, "--state", state, "--replace")
    assert mismatch.returncode == 1
    assert "rerun with the same options" in mismatch.stderr
    assert template_rows(dev) == (10, 10, 10)

    write_npz(data, enc[::-1].copy(), subject_ids(30, "t"))
    out = run_json(daemon, data, "--batch", "10", "--state", state, "--restart")
    assert (out["resumed_from"], out["imported"]) == (0, 30)
    assert template_rows(dev) == (40, 40, 40)


def test_a_batch_cut_off_mid_stream_is_sent_again(
    daemon: InProcessDaemon,
    dev: Dev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    enc = random_encodings(35, seed=22)
    data = write_npz(tmp_path / "p.npz", enc, subject_ids(35))
    real = FaceSealClient.bulk_enroll
    calls: list[int] = []

    def flaky(self: FaceSealClient, items: Iterable[Any], **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) != 3:
            return real(self, items, **kwargs)

        def cut_off() -> Iterator[Any]:  # the connection drops after 4 items of the third batch
            for n, item in enumerate(items):
                if n == 4:
                    raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "connection reset")
                yield item

        return real(self, cut_off(), **kwargs)

    monkeypatch.setattr(FaceSealClient, "bulk_enroll", flaky)
    assert main([*argv(daemon, data, "--batch", "10")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("faceseal: UNAVAILABLE: connection reset (stopped at item 20 of 35;")
    assert template_rows(dev) == (20, 20, 20)  # the daemon stored nothing of the third batch
    assert state_of(tmp_path / "p.npz.import-state")["done"] == 20

    monkeypatch.setattr(FaceSealClient, "bulk_enroll", real)
    assert main([*argv(daemon, data, "--batch", "10")]) == 0
    assert (
        capsys.readouterr().out
        == "imported 35, refused 0 of 35 items\nresumed at item 20 (" + str(data) + ".import-state)\n"
    )
    assert template_rows(dev) == (35, 35, 35)


class Killed(BaseException):
    """kill -9 of the import, as far as its own code can tell: nothing after this point runs."""


def test_an_import_killed_after_a_commit_stores_that_batch_once_on_rerun(
    daemon: InProcessDaemon,
    dev: Dev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    enc = random_encodings(35, seed=23)
    data = write_npz(tmp_path / "p.npz", enc, subject_ids(35))
    real_save = _import.save_state

    def killed_before_recording(path: Path, state: _import.ImportState) -> None:
        if state.sending is None and state.done == 20:  # the second batch was answered ...
            raise Killed  # ... and the client dies before the state file says so
        real_save(path, state)

    monkeypatch.setattr(_import, "save_state", killed_before_recording)
    with pytest.raises(Killed):
        main([*argv(daemon, data, "--batch", "10")])
    assert template_rows(dev) == (20, 20, 20)  # the daemon committed the second batch
    recorded = state_of(tmp_path / "p.npz.import-state")
    assert (recorded["done"], recorded["sending"]) == (10, [10, 20])

    # A rerun whose resend is refused (here: as if max_batch had been lowered) keeps the batch
    # named: the refusal says nothing about whether the first send was committed.
    monkeypatch.setattr(_import, "save_state", real_save)
    real_bulk = FaceSealClient.bulk_enroll

    def refused(self: FaceSealClient, items: Iterable[Any], **kwargs: Any) -> Any:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "a BulkEnroll stream holds at most 5 items")

    monkeypatch.setattr(FaceSealClient, "bulk_enroll", refused)
    assert main([*argv(daemon, data, "--batch", "5")]) == 1
    assert state_of(tmp_path / "p.npz.import-state")["sending"] == [10, 20]
    monkeypatch.setattr(FaceSealClient, "bulk_enroll", real_bulk)

    # The rerun (even with another --batch) resends exactly items 10-19 under the same key:
    # the daemon answers from its record and stores nothing twice.
    capsys.readouterr()
    assert main([*argv(daemon, data, "--batch", "7")]) == 0
    assert capsys.readouterr().out.startswith("imported 35, refused 0 of 35 items")
    assert template_rows(dev) == (35, 35, 35)
    assert gallery_size(daemon) == (35, 35)

    # Importing the same file again from scratch is a new import (a new run id), not a resend.
    assert main([*argv(daemon, data, "--restart")]) == 0
    assert template_rows(dev) == (70, 70, 35)


def test_a_signal_during_a_batch_stops_after_it(
    daemon: InProcessDaemon,
    dev: Dev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGINT while a batch is in flight: the batch finishes and is recorded, then the import stops."""
    data = write_npz(tmp_path / "p.npz", random_encodings(50, seed=23), subject_ids(50))
    real = FaceSealClient.bulk_enroll
    calls: list[int] = []

    def interrupted(self: FaceSealClient, items: Iterable[Any], **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, items, **kwargs)

    monkeypatch.setattr(FaceSealClient, "bulk_enroll", interrupted)
    previous = signal.getsignal(signal.SIGINT)
    assert main([*argv(daemon, data, "--batch", "10")]) == 130
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back
    assert capsys.readouterr().out.startswith("stopped by SIGINT after 20 of 50 items")
    assert template_rows(dev) == (20, 20, 20)
    assert main([*argv(daemon, data, "--batch", "10")]) == 0
    assert template_rows(dev) == (50, 50, 50)


def test_sigterm_to_the_command_between_batches(daemon: InProcessDaemon, dev: Dev, tmp_path: Path) -> None:
    """The real process, stopped by a signal while it runs; the state file shows how far it got."""
    n = 6000
    data = write_npz(tmp_path / "p.npz", random_encodings(n, seed=24), subject_ids(n))
    state = tmp_path / "p.npz.import-state"
    proc = subprocess.Popen(
        [str(FACESEAL), *argv(daemon, data, "--batch", "20")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        poll("two batches recorded", lambda: (state.exists() and state_of(state)["done"] >= 40) or None, every=0.005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    done = state_of(state)["done"]
    assert proc.returncode == 143, err
    assert out.startswith(f"stopped by SIGTERM after {done} of {n} items")
    assert 40 <= done < n
    assert template_rows(dev) == (done, done, done)

    out2 = run_json(daemon, data, "--batch", "500")
    assert (out2["resumed_from"], out2["imported"]) == (done, n)
    assert template_rows(dev) == (n, n, n)


# ------------------------------------------------------------------------------ library surface


def test_bulk_enroll_results(daemon: InProcessDaemon) -> None:
    enc = random_encodings(3, seed=30)
    client = daemon.client("enroller")
    results = client.bulk_enroll([("a", enc[0]), ("b!", enc[1]), ("c", enc[2].tolist())])
    assert [(r.index, r.subject_id, r.code, r.ok) for r in results] == [
        (0, "a", grpc.StatusCode.OK, True),
        (1, "b!", grpc.StatusCode.INVALID_ARGUMENT, False),
        (2, "c", grpc.StatusCode.OK, True),
    ]
    assert results[0].template_id
    assert results[2].template_id
    assert results[1].template_id is None
    assert results[1].message
    assert client.bulk_enroll([]) == []
    with pytest.raises(ValueError, match="must be 1-D"):  # a local error: the stream is cut, nothing stored
        client.bulk_enroll([("d", enc[0]), ("e", enc)])
    with pytest.raises(FaceSealClientError) as refused:
        daemon.client("gateway").bulk_enroll([("f", enc[0])])
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
    (gallery,) = admin_client(daemon.dev, daemon.target).status().galleries
    assert gallery.template_count == 2
