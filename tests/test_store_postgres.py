"""The PostgreSQL backend passes the same conformance suite as SQLite, against a real server."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from postgres import pg_cluster, pg_url  # noqa: F401  (fixtures)
from store_conformance import Reopen, StoreConformance, names, ref, row

from faceseal.server.store.base import ChangesPruned, Store, StoreError
from faceseal.server.store.postgres import _MIGRATIONS, SCHEMA_VERSION, PostgresStore


class TestPostgresConformance(StoreConformance):
    @pytest.fixture
    def store(self, pg_url: str) -> Iterator[Store]:  # noqa: F811
        s = PostgresStore(pg_url)
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, pg_url: str) -> Iterator[Reopen]:  # noqa: F811
        opened: list[Store] = []

        def again(old: Store) -> Store:
            old.close()
            new = PostgresStore(pg_url)
            opened.append(new)
            return new

        yield again
        for s in opened:
            s.close()


def test_two_connections_migrate_once_and_share_data(pg_url: str) -> None:  # noqa: F811
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        a.put_template(row("g", "s", "t1"), replace_subject=False)
        assert names(b.iter_templates("g")) == ["t1"]
        revision, changes = b.changes_since(0)
        assert revision == a.revision()
        assert [(c.kind, c.gallery) for c in changes] == [("put", "g")]
        assert names(b.templates_between("g", changes[0].first_seq, changes[0].last_seq)) == ["t1"]
    finally:
        a.close()
        b.close()


def test_unreachable_server_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(StoreError) as err:
        PostgresStore("postgresql://u:hunter2-secret@127.0.0.1:1/db", timeout=1)
    assert "hunter2" not in str(err.value)
    assert "127.0.0.1" in str(err.value)


def test_a_schema_3_database_migrates_and_keeps_its_rows(pg_url: str) -> None:  # noqa: F811
    """Hex template ids in a TEXT column and one change row per template, as schema 3 had them."""
    old_rows = [
        ("aa" * 16, "faces", ref("alice"), 1, b"S-alice-1", b"T-alice-1"),
        ("0b" * 16, "faces", ref("bob"), 2, b"S-bob", b"T-bob\x00\xff"),
        ("1d" * 16, "faces", ref("alice"), 1, b"S-alice-2", b"T-alice-2"),
    ]
    with psycopg.connect(pg_url) as db, db.transaction():
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (3)")
        for script in _MIGRATIONS[:3]:
            for statement in (s.strip() for s in script.split(";")):
                if statement:
                    db.execute(statement)
        with db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO templates (template_id, gallery, subject_ref, key_version, subject_blob, template_blob)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                old_rows,
            )
            cursor.executemany(
                "INSERT INTO changes (revision, kind, gallery, subject_ref, template_id)"
                " VALUES (%s, 'put', %s, %s, %s)",
                [(n + 1, gallery, subject, tid) for n, (tid, gallery, subject, *_) in enumerate(old_rows)],
            )
        db.execute("UPDATE meta SET value = 3 WHERE name = 'revision'")
    store = PostgresStore(pg_url)
    try:
        rows = list(store.iter_templates("faces"))
        assert [(r.template_id, r.gallery, r.subject_ref, r.key_version, r.subject_blob, r.template_blob)
                for r in rows] == old_rows  # fmt: skip
        assert [r.seq for r in rows] == [1, 2, 3]
        assert store.subject_template_count("faces", ref("alice")) == 2
        assert store.revision() == 3
        with pytest.raises(ChangesPruned):
            store.changes_since(2)
        assert store.put_template(row("faces", "alice", "new"), replace_subject=False) == 3
        revision, (change,) = store.changes_since(3)
        assert (revision, change.kind) == (4, "put")
        assert names(store.templates_between("faces", change.first_seq, change.last_seq)) == ["new"]
        with psycopg.connect(pg_url) as db:
            assert db.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
            indexes = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'templates'")}
        assert indexes == {"templates_pkey", "templates_subject", "templates_key_version"}
    finally:
        store.close()
