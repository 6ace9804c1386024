"""The queries every SQL backend shares; a backend supplies connections, transactions, dialect.

Written once so SQLite and PostgreSQL cannot drift apart: both pass the same conformance suite
because they run the same statements. Statements use ``?`` placeholders; a backend whose driver
wants another style rewrites them in ``_sql``.

Every committed change bumps the revision and appends rows to ``changes`` under that revision:
replicas and worker processes follow that log to keep their in-memory galleries and keyring
in step (``changes_since``). A put appends one change per gallery per transaction naming the
range of ``seq`` it inserted, not one per row: a million-row import costs a handful of log rows,
and a follower reads the range back with ``templates_between``. The log is pruned to a horizon
(``change_horizon``); a follower further behind is told so and reloads.

Template ids travel as 32 hex digits and are stored as their 16 bytes (half the bytes, and no
index on them: nothing looks a row up by its id; rows are found by ``seq`` or ``subject_ref``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from faceseal.server.store.base import (
    BATCH_RETENTION_SECONDS,
    BatchRecord,
    Change,
    ChangesPruned,
    GuardRow,
    TemplateRow,
    WrappedKey,
)


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One open transaction: ``execute`` statements with ``?`` placeholders."""

    def execute(self, sql: str, params: Any = (), /) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object: ...


def _tid(template_id: str) -> bytes:
    """The 16 bytes a template id names. Only the canonical form (32 lowercase hex digits, as
    the daemon mints them) is accepted: the id is part of each blob's associated data, so a
    second spelling of the same bytes would read back as a different id and fail to open."""
    try:
        raw = bytes.fromhex(template_id)
    except ValueError:
        raw = b""
    if len(raw) != 16 or raw.hex() != template_id:
        raise ValueError("a template id is 32 lowercase hex digits")
    return raw


# Every template read: a range of one gallery in seq order, a page at a time; ``_rows`` unpacks
# the columns. The driver already hands back str/bytes/int, so a row is built without copies
# or conversions but the id's hex. ``gallery || ''`` keeps the planner off the (gallery,
# subject_ref) index: with it, SQLite reads every row of the gallery and sorts them for each
# page (quadratic: a million rows took minutes to unseal); without it, each page is a range
# scan of the primary key from the last seq on, already in order.
_RANGE = (
    "SELECT seq, gallery, subject_ref, template_id, key_version, subject_blob, template_blob FROM templates"
    " WHERE gallery || '' = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)

_INSERT = (
    "INSERT INTO templates (gallery, subject_ref, template_id, key_version, subject_blob, template_blob)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)

_LAST_SEQ = 2**63 - 1


def _rows(rows: Iterable[Sequence[Any]]) -> Iterator[TemplateRow]:
    return (TemplateRow(g, ref, tid.hex(), v, sb, tb, seq) for seq, g, ref, tid, v, sb, tb in rows)


def _params(row: TemplateRow) -> tuple[Any, ...]:
    return (row.gallery, row.subject_ref, _tid(row.template_id), row.key_version, row.subject_blob, row.template_blob)


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

    # The change log keeps the changes of the newest ``change_horizon`` revisions. Every
    # ``prune_every``-th revision, the write that reaches it also deletes older changes and
    # records the newest pruned revision (meta 'pruned'). A revision is one write (an Enroll, a
    # BulkEnroll stream, a Delete, a key change), so a follower polling every second falls off
    # the log only after 100,000 writes it did not see; it then reloads every gallery, which
    # costs what an unseal costs. The log stays a few MB, however many rows are imported.
    change_horizon = 100_000
    prune_every = 1_000

    def _write(self, fn: Callable[[Tx, int], int]) -> int:
        """Run ``fn(tx, revision)`` in a transaction that also bumps the revision (and prunes)."""
        with self._transaction() as tx:
            tx.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
            (value,) = tx.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            revision = int(value)
            result = fn(tx, revision)
            if revision % self.prune_every == 0 and revision > self.change_horizon:
                oldest = revision - self.change_horizon
                tx.execute("DELETE FROM changes WHERE revision <= ?", (oldest,))
                tx.execute("UPDATE meta SET value = ? WHERE name = 'pruned' AND value < ?", (oldest, oldest))
        self.last_revision = revision
        return result

    @staticmethod
    def _change(
        tx: Tx, revision: int, kind: str, gallery: str = "", ref: bytes = b"", first_seq: int = 0, last_seq: int = 0
    ) -> None:
        tx.execute(
            "INSERT INTO changes (revision, kind, gallery, subject_ref, first_seq, last_seq) VALUES (?, ?, ?, ?, ?, ?)",
            (revision, kind, gallery, ref, first_seq, last_seq),
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
    #
    # Subjects are found through the index on (gallery, subject_ref). subject_ref alone would be
    # as selective (an HMAC over gallery and subject) and some 10 bytes a row smaller, but then
    # ``gallery_counts`` (subjects and templates per gallery; unseal sizes its matrices with it)
    # scans and sorts the whole table: 0.9 s per 200,000 rows instead of an index walk.

    def put_template(self, row: TemplateRow, *, replace_subject: bool) -> int:
        return self.put_templates([(row, replace_subject)])[0]

    def put_templates(
        self, rows: Sequence[tuple[TemplateRow, bool]], *, counts: bool = True, batch: BatchRecord | None = None
    ) -> list[int]:
        result: list[int] = []

        def tx(db: Tx, revision: int) -> int:
            # Writes serialise on the revision row and seq only grows, so every row above the
            # current top is this transaction's: the put change names that range.
            (top,) = db.execute("SELECT coalesce(max(seq), 0) FROM templates").fetchone()
            pending: list[tuple[Any, ...]] = []  # rows not inserted yet, in order
            galleries: dict[str, None] = {}
            for row, replace_subject in rows:
                galleries[row.gallery] = None
                if replace_subject:
                    if pending:  # the earlier rows go in first: this delete may remove them
                        db.executemany(_INSERT, pending)
                        pending = []
                    db.execute(
                        "DELETE FROM templates WHERE gallery = ? AND subject_ref = ?", (row.gallery, row.subject_ref)
                    )
                    self._change(db, revision, "delete_subject", row.gallery, row.subject_ref)
                if counts:
                    db.execute(_INSERT, _params(row))
                    (count,) = db.execute(
                        "SELECT count(*) FROM templates WHERE subject_ref = ? AND gallery = ?",
                        (row.subject_ref, row.gallery),
                    ).fetchone()
                    result.append(int(count))
                else:
                    pending.append(_params(row))
            if pending:
                db.executemany(_INSERT, pending)
            if rows:
                (last,) = db.execute("SELECT max(seq) FROM templates").fetchone()
                for gallery in galleries:  # after the deletes: a follower applies them first
                    self._change(db, revision, "put", gallery, first_seq=int(top) + 1, last_seq=int(last))
            # Every enrollment forgets the batches past their retention, not only keyed ones.
            db.execute(self._batch_prune, (time.time() - BATCH_RETENTION_SECONDS,))
            if batch is not None:
                db.execute(
                    "INSERT INTO batches (key, digest, outcome, created) VALUES (?, ?, ?, ?)",
                    (batch.key, batch.digest, batch.outcome, batch.created),
                )
            return len(rows)

        self._write(tx)
        return result if counts else [0] * len(rows)

    def batch(self, key: bytes) -> BatchRecord | None:
        rows = self._read("SELECT digest, outcome, created FROM batches WHERE key = ?", (key,))
        if not rows:
            return None
        digest, outcome, created = rows[0]
        return BatchRecord(key, bytes(digest), bytes(outcome), float(created))

    def delete_subject(self, gallery: str, subject_ref: bytes) -> int:
        def tx(db: Tx, revision: int) -> int:
            self._change(db, revision, "delete_subject", gallery, subject_ref)
            return db.execute(
                "DELETE FROM templates WHERE subject_ref = ? AND gallery = ?", (subject_ref, gallery)
            ).rowcount

        return self._write(tx)

    def subject_template_count(self, gallery: str, subject_ref: bytes) -> int:
        rows = self._read(
            "SELECT count(*) FROM templates WHERE subject_ref = ? AND gallery = ?", (subject_ref, gallery)
        )
        return int(rows[0][0])

    # Rows per read while iterating a gallery: a million-row gallery streams in pages (keyset
    # pagination on seq) instead of materialising every blob at once. Big pages keep the
    # per-statement cost (a lock, a seek, a round trip to PostgreSQL) out of the unseal time;
    # 20,000 rows of a 512-d gallery are about 45 MB in flight.
    page_size = 20_000

    def iter_templates(self, gallery: str) -> Iterator[TemplateRow]:
        return self.templates_between(gallery, 0, _LAST_SEQ)

    def templates_between(self, gallery: str, first_seq: int, last_seq: int) -> Iterator[TemplateRow]:
        after = first_seq - 1
        while True:
            page = self._read(_RANGE, (gallery, after, last_seq, self.page_size))
            yield from _rows(page)
            if len(page) < self.page_size:
                return
            after = int(page[-1][0])

    def replace_template(self, old: TemplateRow, new: TemplateRow) -> bool:
        match = (old.subject_ref, old.gallery, _tid(old.template_id), old.template_blob)
        blobs = (new.key_version, new.subject_blob, new.template_blob)

        def tx(db: Tx, revision: int) -> int:
            self._change(db, revision, "rewrap", old.gallery, old.subject_ref, old.seq, old.seq)
            if old.seq:  # read back from the store: its key finds it without an index lookup
                return db.execute(
                    "UPDATE templates SET key_version = ?, subject_blob = ?, template_blob = ?"
                    " WHERE seq = ? AND subject_ref = ? AND gallery = ? AND template_id = ? AND template_blob = ?",
                    (*blobs, old.seq, *match),
                ).rowcount
            return db.execute(
                "UPDATE templates SET key_version = ?, subject_blob = ?, template_blob = ?"
                " WHERE subject_ref = ? AND gallery = ? AND template_id = ? AND template_blob = ?",
                (*blobs, *match),
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

    def guard_get_many(self, keys: Sequence[tuple[str, bytes]]) -> dict[tuple[str, bytes], GuardRow]:
        if not keys:
            return {}
        where = " OR ".join(["(scope = ? AND key = ?)"] * len(keys))
        rows = self._read(
            f"SELECT scope, key, count, window_start, locked_until, level FROM guard WHERE {where}",  # noqa: S608
            [v for pair in keys for v in pair],
        )
        return {(str(s), bytes(k)): (int(c), float(w), float(u), int(lv)) for s, k, c, w, u, lv in rows}

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

    # SQLite's write transaction locks the whole file; PostgreSQL's statement also locks the row
    # (and creates it: an all-zero counter reads the same as none).
    _guard_select = "SELECT count, window_start, locked_until, level FROM guard WHERE scope = ? AND key = ?"
    # Forgets the batch records past their retention (PostgreSQL skips rows being pruned).
    _batch_prune = "DELETE FROM batches WHERE created < ?"

    # -- following ---------------------------------------------------------------------------

    def revision(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE name = 'revision'")[0][0])

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        """(current revision, changes after ``revision`` in order). Reading the revision, then the
        changes, is safe: changes are only appended, so anything committed after the revision
        read shows up on the next call. The pruning mark is read last: it only grows, so if it
        is still at or below ``revision`` now, nothing this call returned had been pruned."""
        current = self.revision()
        rows = self._read(
            "SELECT revision, kind, gallery, subject_ref, first_seq, last_seq FROM changes"
            " WHERE revision > ? AND revision <= ? ORDER BY revision, id",
            (revision, current),
        )
        pruned = int(self._read("SELECT value FROM meta WHERE name = 'pruned'")[0][0])
        if revision < pruned:
            raise ChangesPruned(revision, pruned)
        return current, [Change(int(r), str(k), str(g), bytes(ref), int(f), int(t)) for r, k, g, ref, f, t in rows]
