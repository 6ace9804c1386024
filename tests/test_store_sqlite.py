"""The SQLite backend: the shared conformance suite, plus what only a file on disk can get wrong."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_conformance import Reopen, StoreConformance, row

from faceseal.server.store.base import Store, StoreError
from faceseal.server.store.sqlite import SCHEMA_VERSION, SQLiteStore


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
        assert [r.template_id for r in store.iter_templates("g1")] == ["a1"]
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
