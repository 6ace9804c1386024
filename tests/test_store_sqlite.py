"""The SQLite backend: the shared conformance suite, plus what only a file on disk can get wrong."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_conformance import Reopen, StoreConformance, names, ref, row, tid

from faceseal.server.store import sql
from faceseal.server.store import sqlite as sqlite_store
from faceseal.server.store.base import ChangesPruned, Store, StoreError
from faceseal.server.store.sqlite import _MIGRATIONS, PAGE_SIZE, SCHEMA_VERSION, SQLiteStore, _split


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "faceseal.db"


class TestSQLiteConformance(StoreConformance):
    @pytest.fixture
    def store(self, db_path: Path) -> Iterator[Store]:
        s = SQLiteStore(db_path)
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, db_path: Path) -> Iterator[Reopen]:
        opened: list[SQLiteStore] = []

        def _reopen(old: Store) -> Store:
            old.close()
            new = SQLiteStore(db_path)
            opened.append(new)
            return new

        yield _reopen
        for s in opened:
            s.close()


def _open_files_under(folder: Path) -> list[str]:
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd to list open files")
    found = []
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 000, so a file created without an explicit mode would come out world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_database_and_companions_are_owner_only(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        store.put_template(row("g1", "alice", "a1"), replace_subject=False)
        companions = [Path(f"{db_path}{suffix}") for suffix in ("-wal", "-shm")]
        assert any(p.exists() for p in companions), "WAL mode should keep a -wal file while open"
        for p in [db_path, *companions]:
            if p.exists():
                assert _mode(p) == 0o600, p
    finally:
        store.close()


@pytest.mark.usefixtures("permissive_umask")
def test_existing_readable_database_is_tightened(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    db_path.chmod(0o644)
    SQLiteStore(db_path).close()
    assert _mode(db_path) == 0o600


def test_wal_and_full_sync(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        # synchronous is a per-connection setting: only the store's own connection can tell.
        db = store._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        store.close()
    # WAL is recorded in the file itself.
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    other.close()


def test_fresh_file_reaches_the_current_schema(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    finally:
        db.close()
    # Opening an up-to-date file again runs nothing twice and loses nothing.
    store = SQLiteStore(db_path)
    try:
        store.put_template(row("g1", "alice", "a1"), replace_subject=False)
    finally:
        store.close()
    store = SQLiteStore(db_path)
    try:
        assert [r.template_id for r in store.iter_templates("g1")] == [tid("a1")]
    finally:
        store.close()


def test_newer_schema_is_refused_and_left_alone(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    future = SCHEMA_VERSION + 7
    db = sqlite3.connect(db_path)
    db.execute(f"PRAGMA user_version = {future}")
    db.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError) as info:
        SQLiteStore(db_path)
    assert str(future) in str(info.value)
    assert db_path.read_bytes() == before
    # The refused store let go of the file, even while the exception is still referenced.
    assert _open_files_under(db_path.parent) == []
    # ... so another process can take a write lock at once.
    db = sqlite3.connect(db_path, timeout=0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    finally:
        db.close()


def test_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not an SQLite database, it is a note to self" * 100)
    db_path.chmod(0o600)
    with pytest.raises(StoreError) as info:
        SQLiteStore(db_path)
    assert str(db_path) in str(info.value)


def test_new_file_gets_big_pages_and_an_existing_file_keeps_its_own(db_path: Path) -> None:
    """A 2.1 KB row (512-d) fits a 4 KB page alone; a new file uses pages that hold several."""
    SQLiteStore(db_path).close()
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 16384
    old = db_path.with_name("old.db")
    with contextlib.closing(sqlite3.connect(old)) as db:
        db.execute("PRAGMA page_size = 4096")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE unrelated (x INTEGER) STRICT")
    SQLiteStore(old).close()
    with contextlib.closing(sqlite3.connect(old)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _plan(store: SQLiteStore, statement: str, params: tuple[object, ...]) -> str:
    return " | ".join(str(r[-1]) for r in store._db.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall())


def test_reads_use_the_primary_key_or_the_subject_index(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        page = _plan(store, sql._RANGE, ("g1", 0, 10, 100))
        assert "INTEGER PRIMARY KEY" in page, page
        assert "TEMP B-TREE" not in page, page
        count = _plan(store, "SELECT count(*) FROM templates WHERE subject_ref = ? AND gallery = ?", (b"r", "g1"))
        assert "templates_subject" in count, count
        indexes = {
            r[0]
            for r in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'templates'")
        }
        # No index on template_id: nothing looks a row up by it.
        assert indexes == {"templates_subject", "templates_key_version"}
        # Every enrollment prunes batch records past retention: by the index, not a table scan.
        prune = _plan(store, sql.SqlStore._batch_prune, (0.0,))
        assert "batches_created" in prune, prune
    finally:
        store.close()


# What the daemon wrote under schema 3: hex ids in a TEXT column, one change row per template.
_V3_ROWS = [
    (1, "aa" * 16, "faces", ref("alice"), 1, b"S-alice-1", b"T-alice-1"),
    (2, "0b" * 16, "faces", ref("bob"), 2, b"S-bob", b"T-bob\x00\xff"),
    (4, "c0" * 16, "other", ref("alice"), 1, b"S-alice-o", b"T-alice-o"),
    (5, "1d" * 16, "faces", ref("alice"), 1, b"S-alice-2", b"T-alice-2"),
]


def _schema_3_database(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA page_size = 4096")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN")
        for script in _MIGRATIONS[:3]:
            for statement in _split(script):
                db.execute(statement)
        db.execute("PRAGMA user_version = 3")
        db.executemany(
            "INSERT INTO templates (seq, template_id, gallery, subject_ref, key_version, subject_blob, template_blob)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [*_V3_ROWS, (6, "ee" * 16, "faces", ref("carol"), 1, b"S", b"T")],
        )
        db.execute("DELETE FROM templates WHERE seq = 6")  # the top seq, deleted: never handed out again
        db.executemany(
            "INSERT INTO changes (revision, kind, gallery, subject_ref, template_id) VALUES (?, 'put', ?, ?, ?)",
            [(seq, gallery, subject, tid) for seq, tid, gallery, subject, *_ in _V3_ROWS],
        )
        db.execute("UPDATE meta SET value = 7 WHERE name = 'revision'")
        db.execute("COMMIT")


def test_a_schema_3_database_migrates_and_keeps_its_rows(db_path: Path) -> None:
    _schema_3_database(db_path)
    store = SQLiteStore(db_path)
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        faces = list(store.iter_templates("faces"))
        expected = [r for r in _V3_ROWS if r[2] == "faces"]
        assert [(r.seq, r.template_id, r.gallery, r.subject_ref, r.key_version, r.subject_blob, r.template_blob)
                for r in faces] == expected  # fmt: skip
        assert [r.template_id for r in store.iter_templates("other")] == ["c0" * 16]
        (kind,) = store._db.execute("SELECT typeof(template_id) FROM templates GROUP BY 1").fetchone()
        assert kind == "blob"
        assert store.subject_template_count("faces", ref("alice")) == 2
        assert store.gallery_counts() == {"faces": (2, 3), "other": (1, 1)}
        assert store.revision() == 7
        # The per-row log is gone: a follower from before the upgrade must reload; from now on
        # the new log serves it.
        with pytest.raises(ChangesPruned):
            store.changes_since(6)
        assert store.changes_since(7) == (7, [])
        assert store.put_template(row("faces", "alice", "new"), replace_subject=False) == 3
        revision, (change,) = store.changes_since(7)
        assert (revision, change.kind, change.last_seq) == (8, "put", 7)  # not 6: that seq was used
        assert [r.seq for r in store.iter_templates("faces")] == [1, 2, 5, 7]
        assert names(store.templates_between("faces", change.first_seq, change.last_seq)) == ["new"]
        # A migrated row can be rewrapped: its id matches as bytes.
        rewrapped = dataclasses.replace(faces[1], key_version=3, template_blob=b"T-bob-v3")
        assert store.replace_template(faces[1], rewrapped) is True
        assert list(store.iter_templates("faces"))[1] == rewrapped
    finally:
        store.close()
    # Reopening migrates nothing again and keeps the page size the file was made with.
    store = SQLiteStore(db_path)
    try:
        assert len(list(store.iter_templates("faces"))) == 4
        assert store._db.execute("PRAGMA page_size").fetchone()[0] == 4096
    finally:
        store.close()


def test_reads_from_threads_that_come_and_go_each_use_a_live_connection(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python reuses the idents of ended threads (the unseal thread ends; grpc starts its workers
    # later): a new thread must never read through, or have closed under it, an ended thread's
    # connection. Reuse is the platform's choice, so it is made certain here: every thread but
    # the newcomer gets the same ident. (The race this guards against, a clean-up closing a
    # connection while another thread's read runs on it, is not forced here; this checks that
    # reads under colliding idents keep working and see the data.)
    monkeypatch.setattr(
        sqlite_store, "_thread_ident", lambda: 2 if threading.current_thread().name == "newcomer" else 1
    )
    store = SQLiteStore(db_path)
    try:
        store.put_template(row("g1", "alice", "a1"), replace_subject=False)
        for _ in range(6):  # short-lived readers, one after another
            t = threading.Thread(target=store.revision)
            t.start()
            t.join()
        read_again, done, failures = threading.Event(), threading.Event(), []

        def long_lived() -> None:
            try:
                store.revision()  # its first read: possibly an ident an ended thread had
                read_again.wait(10)
                assert names(store.iter_templates("g1")) == ["a1"]
            except Exception as exc:  # reported below, with the thread's own failure
                failures.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=long_lived)
        worker.start()
        newcomer = threading.Thread(target=store.revision, name="newcomer")  # its first read cleans up
        newcomer.start()
        newcomer.join()
        read_again.set()
        assert done.wait(10)
        worker.join()
        assert failures == []
    finally:
        store.close()


def test_processes_opening_a_new_file_together_all_succeed(tmp_path: Path) -> None:
    # Worker processes of one daemon open the same new store at the same moment: the switch to
    # WAL does not wait for the other opener by itself, and each must still come up.
    opener = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from faceseal.server.store.sqlite import SQLiteStore\n"
        "start = float(sys.argv[2])\n"
        "while time.time() < start: pass\n"
        "store = SQLiteStore(Path(sys.argv[1])); store.revision(); store.close()\n"
    )
    for attempt in range(6):
        path = tmp_path / f"new-{attempt}.db"
        start = time.time() + 1.5  # after both interpreters have imported everything
        procs = [
            subprocess.Popen([sys.executable, "-c", opener, str(path), repr(start)], stderr=subprocess.PIPE)
            for _ in range(3)
        ]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
