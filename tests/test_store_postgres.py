"""The PostgreSQL backend passes the same conformance suite as SQLite, against a real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from postgres import pg_cluster, pg_url  # noqa: F401  (fixtures)
from store_conformance import Reopen, StoreConformance

from faceseal.server.store.base import Store, StoreError
from faceseal.server.store.postgres import PostgresStore


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
        from store_conformance import row

        a.put_template(row("g", "s", "t1"), replace_subject=False)
        assert [r.template_id for r in b.iter_templates("g")] == ["t1"]
        revision, changes = b.changes_since(0)
        assert revision == a.revision()
        assert [(c.kind, c.template_id) for c in changes] == [("put", "t1")]
    finally:
        a.close()
        b.close()


def test_unreachable_server_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(StoreError) as err:
        PostgresStore("postgresql://u:hunter2-secret@127.0.0.1:1/db", timeout=1)
    assert "hunter2" not in str(err.value)
    assert "127.0.0.1" in str(err.value)
