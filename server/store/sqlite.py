"""SQLite backend: the embedded default for one machine.

WAL mode with ``synchronous=FULL``: a commit is on disk before the call is acknowledged, so an
acknowledged Enroll survives kill -9 and power loss alike. The file (and its -wal/-shm
companions, which SQLite creates with the database's mode) is created 0600. One connection
guarded by a lock: writes serialise anyway, and Match never reads here (it reads the in-memory
gallery).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from faceseal.server.store.base import StoreError
from faceseal.server.store.sql import SqlStore, Tx

# Forward-only migrations; PRAGMA user_version records how many have run.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
    INSERT INTO meta VALUES ('revision', 0);
    CREATE TABLE wrapped_keys (
        purpose TEXT NOT NULL,
        version INTEGER NOT NULL,
        wrapped BLOB NOT NULL,
        PRIMARY KEY (purpose, version)
    ) STRICT;
    CREATE TABLE templates (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        template_id TEXT NOT NULL UNIQUE,
        gallery TEXT NOT NULL,
        subject_ref BLOB NOT NULL,
        key_version INTEGER NOT NULL,
        subject_blob BLOB NOT NULL,
        template_blob BLOB NOT NULL
    ) STRICT;
    CREATE INDEX templates_subject ON templates (gallery, subject_ref);
    CREATE INDEX templates_key_version ON templates (key_version);
    """,
    # 2: the abuse guard's counters, keyed by scope and an opaque key (a subject_ref, a caller).
    """
    CREATE TABLE guard (
        scope TEXT NOT NULL,
        key BLOB NOT NULL,
        count INTEGER NOT NULL,
        window_start REAL NOT NULL,
        locked_until REAL NOT NULL,
        level INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) STRICT;
    """,
    # 3: the change log replicas and worker processes follow.
    """
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        revision INTEGER NOT NULL,
        kind TEXT NOT NULL,
        gallery TEXT NOT NULL,
        subject_ref BLOB NOT NULL,
        template_id TEXT NOT NULL
    ) STRICT;
    CREATE INDEX changes_revision ON changes (revision);
    """,
    # 4: smaller rows (issue 6). Template ids as their 16 bytes, with no index (nothing looks a
    # row up by id). The table is copied with its seq values and its AUTOINCREMENT counter (a
    # deleted seq is never handed out again). The change log becomes seq ranges and is pruned;
    # the old per-row log is dropped, so 'pruned' starts at the current revision and a follower
    # from before the upgrade reloads.
    """
    CREATE TABLE templates_v4 (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        gallery TEXT NOT NULL,
        subject_ref BLOB NOT NULL,
        template_id BLOB NOT NULL,
        key_version INTEGER NOT NULL,
        subject_blob BLOB NOT NULL,
        template_blob BLOB NOT NULL
    ) STRICT;
    INSERT INTO templates_v4 (seq, gallery, subject_ref, template_id, key_version, subject_blob, template_blob)
        SELECT seq, gallery, subject_ref, faceseal_unhex(template_id), key_version, subject_blob, template_blob
        FROM templates ORDER BY seq;
    DELETE FROM sqlite_sequence WHERE name = 'templates_v4';
    UPDATE sqlite_sequence SET name = 'templates_v4' WHERE name = 'templates';
    DROP TABLE templates;
    ALTER TABLE templates_v4 RENAME TO templates;
    CREATE INDEX templates_subject ON templates (gallery, subject_ref);
    CREATE INDEX templates_key_version ON templates (key_version);
    DROP TABLE changes;
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        revision INTEGER NOT NULL,
        kind TEXT NOT NULL,
        gallery TEXT NOT NULL,
        subject_ref BLOB NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX changes_revision ON changes (revision);
    INSERT INTO meta SELECT 'pruned', value FROM meta WHERE name = 'revision';
    """,
    # 5: committed BulkEnroll streams by idempotency key (keyed hashes only), so a client that
    # lost an answer can resend the stream without storing it twice.
    """
    CREATE TABLE batches (
        key BLOB PRIMARY KEY,
        digest BLOB NOT NULL,
        outcome BLOB NOT NULL,
        created REAL NOT NULL
    ) STRICT, WITHOUT ROWID;
    -- The prune every enrollment runs finds old batches by this, not by a scan.
    CREATE INDEX batches_created ON batches (created);
    """,
)

# The page size of a new database file (an existing file keeps the one it was created with: in
# WAL mode SQLite cannot change it). Rows are about 0.7 KB (128-d) and 2.2 KB (512-d); with
# 4 KB pages a 2.2 KB row fills a page alone and wastes nearly half the file, with 16 KB pages
# seven fit and the slack is a few percent.
PAGE_SIZE = 16384

SCHEMA_VERSION = len(_MIGRATIONS)

_thread_ident = threading.get_ident  # a module name, so a test can make idents collide


class _Reader:
    """One thread's read-only connection and the lock ``close`` takes before closing it."""

    __slots__ = ("closed", "db", "lock", "thread")

    def __init__(self, thread: threading.Thread, db: sqlite3.Connection) -> None:
        self.thread, self.db = thread, db
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.db.close()


class SQLiteStore(SqlStore):
    """A Store over one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        elif path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        self._lock = threading.Lock()
        self._readers: dict[int, _Reader] = {}
        self._closed = False
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store {path}: {exc}") from None
        try:
            # Before anything creates a table or switches to WAL; a no-op on an existing file.
            self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            self._switch_to_wal()
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA secure_delete=ON")
            self._migrate()
        except BaseException as exc:
            # A refused store must not keep the file open (and a half-run migration rolls back).
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open the SQLite store {path}: {exc}") from None
            raise

    def _switch_to_wal(self) -> None:
        """WAL mode, waiting out another process switching the same new file (worker processes
        starting together): the switch does not go through SQLite's busy handler, so a second
        opener would fail at once with "database is locked"."""
        deadline = time.monotonic() + 30
        while True:
            try:
                (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"the store could not switch to WAL mode (journal mode {mode})")
            return

    def _migrate(self) -> None:
        # Migration 4 turns hex template ids into bytes; SQLite has unhex() only from 3.41 on.
        self._db.create_function("faceseal_unhex", 1, bytes.fromhex, deterministic=True)
        # One migration per write transaction, the version read inside it: worker processes
        # opening a new file together each find the schema where the previous one left it.
        while True:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (current,) = self._db.execute("PRAGMA user_version").fetchone()
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"the store {self._path} has schema version {current}, newer than this daemon's "
                        f"{SCHEMA_VERSION}; upgrade the daemon"
                    )
                if current < SCHEMA_VERSION:
                    for statement in _split(_MIGRATIONS[current]):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {current + 1}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if current >= SCHEMA_VERSION:
                return

    @contextmanager
    def _transaction(self) -> Iterator[Tx]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"store constraint violated: {exc}") from None
            except sqlite3.Error as exc:
                raise StoreError(f"store write failed: {exc}") from None

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            reader = self._reader()
            with reader.lock:  # only ever contended by ``close``
                if reader.closed:
                    raise sqlite3.ProgrammingError("the store is closed")
                return list(reader.db.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from None

    def _reader(self) -> _Reader:
        """This thread's read-only connection (WAL lets readers run beside each other and the writer).

        Reads are most of the store's traffic under load (the guard's counters on every Match);
        through the one connection they queued on its lock, and each wait while a holder had
        released the GIL inside SQLite cost the waiting thread a context switch. A connection is
        only ever used by the thread that opened it, and closed under its lock: closing one while
        another thread's statement runs on it can crash the process.
        """
        reader = self._readers.get(_thread_ident())
        # Python reuses thread idents: an entry left by an ended thread is not this thread's.
        if reader is not None and reader.thread is threading.current_thread():
            return reader
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA query_only = ON")
        reader = _Reader(threading.current_thread(), db)
        with self._lock:
            if self._closed:
                db.close()
                raise sqlite3.ProgrammingError("the store is closed")
            for ident, old in list(self._readers.items()):  # threads that ended
                if not old.thread.is_alive() or ident == _thread_ident():
                    old.close()
                    del self._readers[ident]
            self._readers[_thread_ident()] = reader
        return reader

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for reader in self._readers.values():
                reader.close()  # waits for a read in progress on it
            self._readers.clear()
            self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path})"


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
