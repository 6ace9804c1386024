"""PostgreSQL backend: one database shared by several daemons behind a load balancer.

Same statements as SQLite (``store/sql.py``), so both pass the same conformance suite. Writes
serialise on the ``meta`` revision row: a writer holds that row lock until it commits, so
revisions commit in order and a follower that has seen revision r has seen every change up to
r. Commits are durable before the call is acknowledged (``synchronous_commit`` is left at the
server's default, ``on``). The URL may carry a password; it is never logged or put in an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from faceseal.server.store.base import StoreError
from faceseal.server.store.sql import Cursor, SqlStore, Tx

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta VALUES ('revision', 0);
    CREATE TABLE wrapped_keys (
        purpose TEXT NOT NULL,
        version INTEGER NOT NULL,
        wrapped BYTEA NOT NULL,
        PRIMARY KEY (purpose, version)
    );
    CREATE TABLE templates (
        seq BIGSERIAL PRIMARY KEY,
        template_id TEXT NOT NULL UNIQUE,
        gallery TEXT NOT NULL,
        subject_ref BYTEA NOT NULL,
        key_version INTEGER NOT NULL,
        subject_blob BYTEA NOT NULL,
        template_blob BYTEA NOT NULL
    );
    CREATE INDEX templates_subject ON templates (gallery, subject_ref);
    CREATE INDEX templates_key_version ON templates (key_version);
    """,
    """
    CREATE TABLE guard (
        scope TEXT NOT NULL,
        key BYTEA NOT NULL,
        count INTEGER NOT NULL,
        window_start DOUBLE PRECISION NOT NULL,
        locked_until DOUBLE PRECISION NOT NULL,
        level INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    );
    """,
    """
    CREATE TABLE changes (
        id BIGSERIAL PRIMARY KEY,
        revision BIGINT NOT NULL,
        kind TEXT NOT NULL,
        gallery TEXT NOT NULL,
        subject_ref BYTEA NOT NULL,
        template_id TEXT NOT NULL
    );
    CREATE INDEX changes_revision ON changes (revision);
    """,
    # 4: as SQLite's migration 4 (smaller rows, change log of seq ranges, pruned).
    """
    ALTER TABLE templates DROP CONSTRAINT templates_template_id_key;
    ALTER TABLE templates ALTER COLUMN template_id TYPE BYTEA USING decode(template_id, 'hex');
    DROP TABLE changes;
    CREATE TABLE changes (
        id BIGSERIAL PRIMARY KEY,
        revision BIGINT NOT NULL,
        kind TEXT NOT NULL,
        gallery TEXT NOT NULL,
        subject_ref BYTEA NOT NULL,
        first_seq BIGINT NOT NULL,
        last_seq BIGINT NOT NULL
    );
    CREATE INDEX changes_revision ON changes (revision);
    INSERT INTO meta SELECT 'pruned', value FROM meta WHERE name = 'revision';
    """,
    # 5: as SQLite's migration 5 (committed BulkEnroll streams by idempotency key).
    """
    CREATE TABLE batches (
        key BYTEA PRIMARY KEY,
        digest BYTEA NOT NULL,
        outcome BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX batches_created ON batches (created);
    """,
)

SCHEMA_VERSION = len(_MIGRATIONS)
_MIGRATION_LOCK = 0x66616365  # pg_advisory_xact_lock key: replicas starting together migrate once


class _PgTx:
    """Adapts a psycopg connection to the ``?`` placeholders the shared statements use."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = (), /) -> Cursor:
        return self._conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object:
        # psycopg pipelines the statements: one round trip per batch, not per row.
        with self._conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), params)
        return None


class PostgresStore(SqlStore):
    """A Store over a PostgreSQL database, through a connection pool."""

    # Rows another transaction is pruning are skipped: two replicas deleting the same old
    # batches in different orders could otherwise deadlock.
    _batch_prune = "DELETE FROM batches WHERE key IN (SELECT key FROM batches WHERE created < ? FOR UPDATE SKIP LOCKED)"
    # One statement that creates the counter if it is missing, locks its row and reads it:
    # SELECT FOR UPDATE on a missing row locks nothing, so two transactions creating the same
    # counter both started from zero and the second upsert overwrote the first's count. The
    # no-op update makes ON CONFLICT lock the existing row and RETURNING read it.
    _guard_select = (
        "INSERT INTO guard (scope, key, count, window_start, locked_until, level) VALUES (?, ?, 0, 0, 0, 0)"
        " ON CONFLICT (scope, key) DO UPDATE SET level = guard.level"
        " RETURNING count, window_start, locked_until, level"
    )

    def __init__(self, url: str, *, pool_size: int = 8, timeout: float = 10.0) -> None:
        self._where = _redact(url)
        try:
            self._pool = ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=timeout,
                open=True,
                kwargs={"connect_timeout": int(timeout)},
            )
            self._pool.wait(timeout=timeout)
        except Exception as exc:  # psycopg_pool raises its own PoolTimeout; none carries the password
            raise StoreError(f"cannot connect to the PostgreSQL store {self._where}: {type(exc).__name__}") from None
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _migrate(self) -> None:
        with self._transaction() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = tx.execute("SELECT version FROM schema_version").fetchone()
            current = 0 if row is None else int(row[0])
            if row is None:
                tx.execute("INSERT INTO schema_version VALUES (0)")
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self._where} has schema version {current}, newer than this daemon's "
                    f"{SCHEMA_VERSION}; upgrade the daemon"
                )
            for number in range(current, SCHEMA_VERSION):
                for statement in (s.strip() for s in _MIGRATIONS[number].split(";")):
                    if statement:
                        tx.execute(statement)
            tx.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @contextmanager
    def _transaction(self) -> Iterator[Tx]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _PgTx(conn)
        except psycopg.errors.IntegrityError as exc:
            raise StoreError(f"store constraint violated: {exc.diag.message_primary}") from None
        except psycopg.Error as exc:
            raise StoreError(f"store write failed: {type(exc).__name__}") from None

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            with self._pool.connection() as conn:
                # Binary results: a bytea arrives as its bytes, not as hex text to decode.
                return list(conn.execute(sql.replace("?", "%s"), params, binary=True).fetchall())
        except psycopg.Error as exc:
            raise StoreError(f"store read failed: {type(exc).__name__}") from None

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self._where})"


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
