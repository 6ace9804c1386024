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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from faceseal.server.store.base import GuardRow, StoreError, TemplateRow, WrappedKey

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
)

SCHEMA_VERSION = len(_MIGRATIONS)
_Tx = Callable[[sqlite3.Connection], int]


class SQLiteStore:
    """A Store over one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        elif path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store {path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
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

    def _migrate(self) -> None:
        (current,) = self._db.execute("PRAGMA user_version").fetchone()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self._path} has schema version {current}, newer than this daemon's "
                f"{SCHEMA_VERSION}; upgrade the daemon"
            )
        for number in range(current, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _split(_MIGRATIONS[number]):
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {number + 1}")
            self._db.execute("COMMIT")

    def _write(self, fn: _Tx) -> int:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._db)
                    self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"store constraint violated: {exc}") from None
            except sqlite3.Error as exc:
                raise StoreError(f"store write failed: {exc}") from None
            return result

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"store read failed: {exc}") from None

    def wrapped_keys(self) -> list[WrappedKey]:
        rows = self._read("SELECT purpose, version, wrapped FROM wrapped_keys ORDER BY purpose, version")
        return [WrappedKey(str(p), int(v), bytes(w)) for p, v, w in rows]

    def add_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        def tx(db: sqlite3.Connection) -> int:
            db.executemany(
                "INSERT INTO wrapped_keys (purpose, version, wrapped) VALUES (?, ?, ?)",
                [(k.purpose, k.version, k.wrapped) for k in keys],
            )
            return len(keys)

        self._write(tx)

    def replace_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        def tx(db: sqlite3.Connection) -> int:
            db.execute("DELETE FROM wrapped_keys")
            db.executemany(
                "INSERT INTO wrapped_keys (purpose, version, wrapped) VALUES (?, ?, ?)",
                [(k.purpose, k.version, k.wrapped) for k in keys],
            )
            return len(keys)

        self._write(tx)

    def delete_wrapped_key(self, purpose: str, version: int) -> bool:
        def tx(db: sqlite3.Connection) -> int:
            cur = db.execute("DELETE FROM wrapped_keys WHERE purpose = ? AND version = ?", (purpose, version))
            return cur.rowcount

        return self._write(tx) > 0

    def put_template(self, row: TemplateRow, *, replace_subject: bool) -> int:
        def tx(db: sqlite3.Connection) -> int:
            if replace_subject:
                db.execute(
                    "DELETE FROM templates WHERE gallery = ? AND subject_ref = ?",
                    (row.gallery, row.subject_ref),
                )
            db.execute(
                "INSERT INTO templates (template_id, gallery, subject_ref, key_version, subject_blob,"
                " template_blob) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    row.template_id,
                    row.gallery,
                    row.subject_ref,
                    row.key_version,
                    row.subject_blob,
                    row.template_blob,
                ),
            )
            (count,) = db.execute(
                "SELECT count(*) FROM templates WHERE gallery = ? AND subject_ref = ?",
                (row.gallery, row.subject_ref),
            ).fetchone()
            return int(count)

        return self._write(tx)

    def delete_subject(self, gallery: str, subject_ref: bytes) -> int:
        def tx(db: sqlite3.Connection) -> int:
            cur = db.execute("DELETE FROM templates WHERE gallery = ? AND subject_ref = ?", (gallery, subject_ref))
            return cur.rowcount

        return self._write(tx)

    def subject_template_count(self, gallery: str, subject_ref: bytes) -> int:
        rows = self._read(
            "SELECT count(*) FROM templates WHERE gallery = ? AND subject_ref = ?", (gallery, subject_ref)
        )
        return int(rows[0][0])

    def iter_templates(self, gallery: str) -> Iterator[TemplateRow]:
        rows = self._read(
            "SELECT gallery, subject_ref, template_id, key_version, subject_blob, template_blob"
            " FROM templates WHERE gallery = ? ORDER BY seq",
            (gallery,),
        )
        for g, ref, tid, ver, sblob, tblob in rows:
            yield TemplateRow(str(g), bytes(ref), str(tid), int(ver), bytes(sblob), bytes(tblob))

    def replace_template(self, old: TemplateRow, new: TemplateRow) -> bool:
        def tx(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE templates SET key_version = ?, subject_blob = ?, template_blob = ?"
                " WHERE template_id = ? AND gallery = ? AND subject_ref = ? AND template_blob = ?",
                (
                    new.key_version,
                    new.subject_blob,
                    new.template_blob,
                    old.template_id,
                    old.gallery,
                    old.subject_ref,
                    old.template_blob,
                ),
            )
            return cur.rowcount

        return self._write(tx) > 0

    def key_version_counts(self) -> dict[int, int]:
        rows = self._read("SELECT key_version, count(*) FROM templates GROUP BY key_version")
        return {int(v): int(str(c)) for v, c in rows}

    def gallery_counts(self) -> dict[str, tuple[int, int]]:
        rows = self._read("SELECT gallery, count(DISTINCT subject_ref), count(*) FROM templates GROUP BY gallery")
        return {str(g): (int(s), int(t)) for g, s, t in rows}

    def guard_get(self, scope: str, key: bytes) -> GuardRow | None:
        rows = self._read(
            "SELECT count, window_start, locked_until, level FROM guard WHERE scope = ? AND key = ?", (scope, key)
        )
        return (int(rows[0][0]), float(rows[0][1]), float(rows[0][2]), int(rows[0][3])) if rows else None

    def guard_update(self, scope: str, key: bytes, update: Callable[[GuardRow | None], GuardRow]) -> GuardRow:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute(
                        "SELECT count, window_start, locked_until, level FROM guard WHERE scope = ? AND key = ?",
                        (scope, key),
                    ).fetchone()
                    new = update((int(row[0]), float(row[1]), float(row[2]), int(row[3])) if row else None)
                    self._db.execute(
                        "INSERT INTO guard (scope, key, count, window_start, locked_until, level)"
                        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET count = excluded.count,"
                        " window_start = excluded.window_start, locked_until = excluded.locked_until,"
                        " level = excluded.level",
                        (scope, key, *new),
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"store write failed: {exc}") from None
            return new

    def revision(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE name = 'revision'")[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path})"


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
