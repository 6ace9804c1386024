"""The queries every SQL backend shares; a backend supplies connections, transactions, dialect.

Written once so SQLite and PostgreSQL cannot drift apart: both pass the same conformance suite
because they run the same statements. Statements use ``?`` placeholders; a backend whose driver
wants another style rewrites them in ``_sql``.

Every committed change bumps the revision and appends rows to ``changes`` under that revision:
replicas and worker processes follow that log to keep their in-memory galleries and keyring
in step (``changes_since``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from faceseal.server.store.base import Change, GuardRow, TemplateRow, WrappedKey


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One open transaction: ``execute`` statements with ``?`` placeholders."""

    def execute(self, sql: str, params: Any = (), /) -> Cursor: ...


def _row(r: Sequence[Any]) -> TemplateRow:
    return TemplateRow(str(r[0]), bytes(r[1]), str(r[2]), int(r[3]), bytes(r[4]), bytes(r[5]))


class SqlStore(ABC):
    """Store methods over an abstract transaction."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Tx]:
        """A serialisable write transaction; commits on exit, rolls back on an exception."""

    @abstractmethod
    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one read-only statement."""

    # The revision of the newest write made through this object. Its owner reads it right after a
    # write, under its own write lock, to skip its own changes when following the log.
    last_revision = 0

    def _write(self, fn: Callable[[Tx, int], int]) -> int:
        """Run ``fn(tx, revision)`` in a transaction that also bumps the revision."""
        with self._transaction() as tx:
            tx.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
            (revision,) = tx.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            result = fn(tx, int(revision))
        self.last_revision = int(revision)
        return result

    @staticmethod
    def _change(tx: Tx, revision: int, kind: str, gallery: str = "", ref: bytes = b"", template_id: str = "") -> None:
        tx.execute(
            "INSERT INTO changes (revision, kind, gallery, subject_ref, template_id) VALUES (?, ?, ?, ?, ?)",
            (revision, kind, gallery, ref, template_id),
        )

    # -- keyring -----------------------------------------------------------------------------

    def wrapped_keys(self) -> list[WrappedKey]:
        rows = self._read("SELECT purpose, version, wrapped FROM wrapped_keys ORDER BY purpose, version")
        return [WrappedKey(str(p), int(v), bytes(w)) for p, v, w in rows]

    def _insert_keys(self, tx: Tx, keys: Sequence[WrappedKey]) -> None:
        for k in keys:
            tx.execute(
                "INSERT INTO wrapped_keys (purpose, version, wrapped) VALUES (?, ?, ?)",
                (k.purpose, k.version, k.wrapped),
            )

    def add_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        def tx(db: Tx, revision: int) -> int:
            self._insert_keys(db, keys)
            self._change(db, revision, "keys")
            return len(keys)

        self._write(tx)

    def replace_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        def tx(db: Tx, revision: int) -> int:
            db.execute("DELETE FROM wrapped_keys")
            self._insert_keys(db, keys)
            self._change(db, revision, "keys")
            return len(keys)

        self._write(tx)

    def delete_wrapped_key(self, purpose: str, version: int) -> bool:
        def tx(db: Tx, revision: int) -> int:
            self._change(db, revision, "keys")
            return db.execute("DELETE FROM wrapped_keys WHERE purpose = ? AND version = ?", (purpose, version)).rowcount

        return self._write(tx) > 0

    # -- templates ---------------------------------------------------------------------------

    def put_template(self, row: TemplateRow, *, replace_subject: bool) -> int:
        return self.put_templates([(row, replace_subject)])[0]

    def put_templates(self, rows: Sequence[tuple[TemplateRow, bool]]) -> list[int]:
        counts: list[int] = []

        def tx(db: Tx, revision: int) -> int:
            for row, replace_subject in rows:
                if replace_subject:
                    db.execute(
                        "DELETE FROM templates WHERE gallery = ? AND subject_ref = ?", (row.gallery, row.subject_ref)
                    )
                    self._change(db, revision, "delete_subject", row.gallery, row.subject_ref)
                db.execute(
                    "INSERT INTO templates"
                    " (gallery, subject_ref, template_id, key_version, subject_blob, template_blob)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        row.gallery,
                        row.subject_ref,
                        row.template_id,
                        row.key_version,
                        row.subject_blob,
                        row.template_blob,
                    ),
                )
                self._change(db, revision, "put", row.gallery, row.subject_ref, row.template_id)
                (count,) = db.execute(
                    "SELECT count(*) FROM templates WHERE gallery = ? AND subject_ref = ?",
                    (row.gallery, row.subject_ref),
                ).fetchone()
                counts.append(int(count))
            return len(rows)

        self._write(tx)
        return counts

    def delete_subject(self, gallery: str, subject_ref: bytes) -> int:
        def tx(db: Tx, revision: int) -> int:
            self._change(db, revision, "delete_subject", gallery, subject_ref)
            return db.execute(
                "DELETE FROM templates WHERE gallery = ? AND subject_ref = ?", (gallery, subject_ref)
            ).rowcount

        return self._write(tx)

    def subject_template_count(self, gallery: str, subject_ref: bytes) -> int:
        rows = self._read(
            "SELECT count(*) FROM templates WHERE gallery = ? AND subject_ref = ?", (gallery, subject_ref)
        )
        return int(rows[0][0])

    # Rows per read while iterating a gallery: a million-row gallery streams in pages (keyset
    # pagination on seq) instead of materialising every blob at once.
    page_size = 5000

    def iter_templates(self, gallery: str) -> Iterator[TemplateRow]:
        last = -1
        while True:
            # ``gallery || ''`` keeps the planner off the (gallery, subject_ref) index: with it,
            # SQLite reads every row of the gallery and sorts them for each page (quadratic: a
            # million rows took minutes to unseal); without it, each page is a range scan of the
            # primary key from ``last`` on, already in seq order.
            rows = self._read(
                "SELECT seq, gallery, subject_ref, template_id, key_version, subject_blob, template_blob"
                " FROM templates WHERE gallery || '' = ? AND seq > ? ORDER BY seq LIMIT ?",
                (gallery, last, self.page_size),
            )
            for r in rows:
                yield _row(r[1:])
            if len(rows) < self.page_size:
                return
            last = int(rows[-1][0])

    def template(self, template_id: str) -> TemplateRow | None:
        rows = self._read(
            "SELECT gallery, subject_ref, template_id, key_version, subject_blob, template_blob"
            " FROM templates WHERE template_id = ?",
            (template_id,),
        )
        return _row(rows[0]) if rows else None

    def replace_template(self, old: TemplateRow, new: TemplateRow) -> bool:
        def tx(db: Tx, revision: int) -> int:
            self._change(db, revision, "rewrap", old.gallery, old.subject_ref, old.template_id)
            return db.execute(
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
            ).rowcount

        return self._write(tx) > 0

    def key_version_counts(self) -> dict[int, int]:
        rows = self._read("SELECT key_version, count(*) FROM templates GROUP BY key_version")
        return {int(v): int(c) for v, c in rows}

    def gallery_counts(self) -> dict[str, tuple[int, int]]:
        rows = self._read("SELECT gallery, count(DISTINCT subject_ref), count(*) FROM templates GROUP BY gallery")
        return {str(g): (int(s), int(t)) for g, s, t in rows}

    # -- guard -------------------------------------------------------------------------------

    def guard_get(self, scope: str, key: bytes) -> GuardRow | None:
        rows = self._read(
            "SELECT count, window_start, locked_until, level FROM guard WHERE scope = ? AND key = ?", (scope, key)
        )
        return (int(rows[0][0]), float(rows[0][1]), float(rows[0][2]), int(rows[0][3])) if rows else None

    def guard_update(self, scope: str, key: bytes, update: Callable[[GuardRow | None], GuardRow]) -> GuardRow:
        with self._transaction() as tx:
            row = tx.execute(self._guard_select, (scope, key)).fetchone()
            new = update((int(row[0]), float(row[1]), float(row[2]), int(row[3])) if row else None)
            tx.execute(
                "INSERT INTO guard (scope, key, count, window_start, locked_until, level) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (scope, key) DO UPDATE SET count = excluded.count, window_start = excluded.window_start,"
                " locked_until = excluded.locked_until, level = excluded.level",
                (scope, key, *new),
            )
            return new

    # SQLite's write transaction locks the whole file; PostgreSQL adds FOR UPDATE to lock the row.
    _guard_select = "SELECT count, window_start, locked_until, level FROM guard WHERE scope = ? AND key = ?"

    # -- following ---------------------------------------------------------------------------

    def revision(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE name = 'revision'")[0][0])

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        """(current revision, changes after ``revision`` in order). Reading both in one statement
        pair is safe: changes are only appended, so anything committed after the revision read
        shows up on the next call."""
        current = self.revision()
        rows = self._read(
            "SELECT revision, kind, gallery, subject_ref, template_id FROM changes"
            " WHERE revision > ? AND revision <= ? ORDER BY revision, id",
            (revision, current),
        )
        return current, [Change(int(r), str(k), str(g), bytes(ref), str(t)) for r, k, g, ref, t in rows]
