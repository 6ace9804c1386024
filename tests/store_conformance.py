"""The behaviour every Store backend must have, whatever sits underneath.

A backend's test module subclasses ``StoreConformance`` (the class name keeps pytest from
collecting the base itself) and provides two fixtures:

``store``
    a fresh, empty ``faceseal.server.store.base.Store``; the fixture closes it afterwards.
``reopen``
    a callable ``reopen(old) -> Store`` that closes ``old`` and opens the same data again,
    as a daemon restart would; the fixture closes what it opened.

The store holds untrusted bytes, so the rows below are plain byte strings: the suite checks
what the daemon relies on (atomic writes, exact bytes back, counts, a revision that replicas
can follow), not what the bytes mean. Template ids are named in the tests ("a1") and stored as
the 32 hex digits ``tid(name)``, the only form a store accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from faceseal.server.store.base import (
    BATCH_RETENTION_SECONDS,
    BatchRecord,
    ChangesPruned,
    GuardRow,
    Store,
    StoreError,
    TemplateRow,
    WrappedKey,
)

Reopen = Callable[[Store], Store]

# Blobs with NUL, high bytes and invalid UTF-8, so a backend that treats them as text fails.
_BLOB_TAIL = b"\x00\xff\xfe\x80\x01\x00" + bytes(range(256))


def ref(name: str) -> bytes:
    """A 32-byte subject reference (the real ones are HMAC-SHA256 digests)."""
    return (name.encode() + b"\x00\xff" * 16)[:32]


_NAMES: dict[str, str] = {}
BAD_ID = "32 lowercase hex digits"  # what a store says of a template id in another form


def tid(name: str) -> str:
    """The template id (32 lowercase hex digits, as the daemon mints them) a test calls ``name``."""
    template_id = hashlib.sha256(name.encode()).hexdigest()[:32]
    _NAMES[template_id] = name
    return template_id


def names(rows: Iterable[TemplateRow]) -> list[str]:
    """The test names of the rows' template ids, in order."""
    return [_NAMES[r.template_id] for r in rows]


def row(gallery: str, subject: str, template_id: str, version: int = 1, tag: str = "") -> TemplateRow:
    seed = f"{gallery}/{subject}/{template_id}/v{version}{tag}".encode()
    return TemplateRow(
        gallery=gallery,
        subject_ref=ref(subject),
        template_id=tid(template_id),
        key_version=version,
        subject_blob=b"S" + seed + _BLOB_TAIL,
        template_blob=b"T" + seed + _BLOB_TAIL * 2,
    )


def rows_of(store: Store, gallery: str) -> list[TemplateRow]:
    return list(store.iter_templates(gallery))


def nonzero(counts: dict[Any, Any]) -> dict[Any, Any]:
    """A backend may report a count that dropped to zero or leave it out; both mean 'none'."""
    return {k: v for k, v in counts.items() if v not in (0, (0, 0))}


def snapshot(store: Store, galleries: tuple[str, ...] = ("g1", "g2")) -> tuple[object, ...]:
    return (
        store.wrapped_keys(),
        {g: rows_of(store, g) for g in galleries},
        nonzero(store.key_version_counts()),
        nonzero(store.gallery_counts()),
        store.revision(),
    )


class ChangeLogConformance:
    """Mixed into StoreConformance: the change log replicas follow."""

    def test_every_write_is_in_the_change_log_in_commit_order(self, store: Store) -> None:
        start, nothing = store.changes_since(0)
        assert nothing == []
        store.put_template(row("g1", "alice", "t1"), replace_subject=False)
        store.put_template(row("g1", "alice", "t2"), replace_subject=True)
        store.delete_subject("g1", ref("alice"))
        store.add_wrapped_keys([WrappedKey("data", 9, b"w")])
        revision, changes = store.changes_since(start)
        assert revision == store.revision() > start
        assert [(c.kind, c.gallery) for c in changes] == [
            ("put", "g1"),
            ("delete_subject", "g1"),  # the replace: the old rows go first, in the same revision
            ("put", "g1"),
            ("delete_subject", "g1"),
            ("keys", ""),
        ]
        assert changes[1].revision == changes[2].revision
        assert [c.subject_ref for c in changes[1:4:2]] == [ref("alice")] * 2
        # A put names the seq range it inserted; reading it back gives the rows (while they last).
        first, second = changes[0], changes[2]
        assert first.first_seq <= first.last_seq < second.first_seq <= second.last_seq
        assert list(store.templates_between("g1", first.first_seq, first.last_seq)) == []  # replaced since
        # Asking from a later revision returns only what came after it.
        assert [c.kind for c in store.changes_since(changes[2].revision)[1]] == ["delete_subject", "keys"]

    def test_one_put_change_per_gallery_per_transaction(self, store: Store) -> None:
        store.put_template(row("g1", "zed", "z0"), replace_subject=False)
        start = store.revision()
        batch = [
            (row("g1", "alice", "a1"), False),
            (row("g2", "bob", "b1"), False),
            (row("g1", "zed", "z1"), True),
            (row("g1", "alice", "a2"), False),
        ]
        assert store.put_templates(batch) == [1, 1, 1, 2]
        revision, changes = store.changes_since(start)
        assert revision == start + 1
        assert [(c.kind, c.gallery, c.subject_ref) for c in changes] == [
            ("delete_subject", "g1", ref("zed")),
            ("put", "g1", b""),
            ("put", "g2", b""),
        ]
        put_g1, put_g2 = changes[1], changes[2]
        # Applying the deletes, then each range, gives exactly what the store holds.
        assert list(store.templates_between("g1", put_g1.first_seq, put_g1.last_seq)) == [
            batch[0][0],
            batch[2][0],
            batch[3][0],
        ]
        assert list(store.templates_between("g2", put_g2.first_seq, put_g2.last_seq)) == [batch[1][0]]
        assert rows_of(store, "g1") == [batch[0][0], batch[2][0], batch[3][0]]

    def test_changes_older_than_the_horizon_are_pruned_and_a_late_follower_is_told(self, store: Store) -> None:
        store.change_horizon = 3  # type: ignore[attr-defined]  # SQL backends: a class attribute
        store.prune_every = 1  # type: ignore[attr-defined]
        start = store.revision()
        for i in range(6):
            store.put_template(row("g1", f"s{i}", f"t{i}"), replace_subject=False)
        now = store.revision()
        assert now == start + 6
        # The newest three revisions are still there, and a follower within them is served.
        revision, changes = store.changes_since(now - 3)
        assert revision == now
        assert [c.revision for c in changes] == [now - 2, now - 1, now]
        assert store.changes_since(now) == (now, [])
        # One that applied less must reload: the store cannot tell it what it missed.
        for behind in (start, now - 4):
            with pytest.raises(ChangesPruned):
                store.changes_since(behind)
        # The rows themselves are never pruned.
        assert names(rows_of(store, "g1")) == [f"t{i}" for i in range(6)]

    def test_iteration_pages_through_large_galleries_in_order(self, store: Store) -> None:
        store.page_size = 2  # type: ignore[attr-defined]  # SQL backends page their reads
        for i in range(5):
            store.put_template(row("g1", f"s{i}", f"t{i}"), replace_subject=False)
        store.put_template(row("g2", "other", "x"), replace_subject=False)
        assert names(store.iter_templates("g1")) == [f"t{i}" for i in range(5)]
        seqs = [r.seq for r in store.iter_templates("g1")]
        assert seqs == sorted(set(seqs))
        assert seqs[0] > 0
        # A range pages the same way and holds only its own gallery's rows.
        assert names(store.templates_between("g1", seqs[1], seqs[4])) == ["t1", "t2", "t3", "t4"]
        assert names(store.templates_between("g1", seqs[1], seqs[1])) == ["t1"]
        assert names(store.templates_between("g2", seqs[0], seqs[4])) == []

    def test_bulk_put_without_counts(self, store: Store) -> None:
        store.put_template(row("g1", "alice", "a0"), replace_subject=False)
        batch = [
            (row("g1", "alice", "a1"), False),
            (row("g1", "bob", "b1"), False),
            (row("g1", "alice", "a2"), True),  # removes a0 and a1, both before it
            (row("g1", "alice", "a3"), False),
        ]
        assert store.put_templates(batch, counts=False) == [0, 0, 0, 0]
        assert names(rows_of(store, "g1")) == ["b1", "a2", "a3"]
        assert store.subject_template_count("g1", ref("alice")) == 2
        assert store.put_templates([], counts=False) == []


class StoreConformance(ChangeLogConformance):
    """Subclass and provide the ``store`` and ``reopen`` fixtures."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        raise NotImplementedError("a backend's test class must provide the 'store' fixture")

    @pytest.fixture
    def reopen(self) -> Iterator[Reopen]:
        raise NotImplementedError("a backend's test class must provide the 'reopen' fixture")

    # -- an empty store ----------------------------------------------------------------------

    def test_empty_store_has_nothing(self, store: Store) -> None:
        assert store.wrapped_keys() == []
        assert rows_of(store, "g1") == []
        assert nonzero(store.key_version_counts()) == {}
        assert nonzero(store.gallery_counts()) == {}
        assert store.subject_template_count("g1", ref("alice")) == 0
        assert store.delete_subject("g1", ref("alice")) == 0

    # -- wrapped keys --------------------------------------------------------------------------

    def test_wrapped_keys_add_list_delete(self, store: Store) -> None:
        keys = [
            WrappedKey("data", 2, b"wrapped-data-2\x00\xff"),
            WrappedKey("index", 1, b"wrapped-index-1\x00\xff"),
            WrappedKey("data", 10, b"wrapped-data-10"),
            WrappedKey("data", 1, b"wrapped-data-1"),
        ]
        store.add_wrapped_keys(keys)
        listed = store.wrapped_keys()
        # Ordered by purpose, then numerically by version (10 after 2).
        assert [(k.purpose, k.version) for k in listed] == [
            ("data", 1),
            ("data", 2),
            ("data", 10),
            ("index", 1),
        ]
        assert {(k.purpose, k.version): k.wrapped for k in listed} == {(k.purpose, k.version): k.wrapped for k in keys}
        assert store.delete_wrapped_key("data", 2) is True
        assert store.delete_wrapped_key("data", 2) is False
        assert store.delete_wrapped_key("index", 2) is False
        assert [(k.purpose, k.version) for k in store.wrapped_keys()] == [
            ("data", 1),
            ("data", 10),
            ("index", 1),
        ]

    def test_duplicate_wrapped_key_raises_and_changes_nothing(self, store: Store) -> None:
        store.add_wrapped_keys([WrappedKey("index", 1, b"i1"), WrappedKey("data", 1, b"d1")])
        before = snapshot(store)
        # The batch holds one new key and one duplicate: neither may land.
        with pytest.raises(StoreError):
            store.add_wrapped_keys([WrappedKey("data", 2, b"d2"), WrappedKey("data", 1, b"evil")])
        assert snapshot(store) == before
        with pytest.raises(StoreError):
            store.add_wrapped_keys([WrappedKey("data", 3, b"d3"), WrappedKey("data", 3, b"d3-again")])
        assert snapshot(store) == before

    def test_replace_wrapped_keys_swaps_the_whole_keyring(self, store: Store) -> None:
        store.add_wrapped_keys(
            [
                WrappedKey("index", 1, b"i-old"),
                WrappedKey("data", 1, b"d1-old"),
                WrappedKey("data", 2, b"d2-old"),
            ]
        )
        before = store.revision()
        new = [WrappedKey("data", 2, b"d2-new\x00"), WrappedKey("index", 1, b"i-new\xff")]
        store.replace_wrapped_keys(new)
        # Exactly the new set: the retired version 1 is gone, no old wrapping survives.
        assert store.wrapped_keys() == sorted(new, key=lambda k: (k.purpose, k.version))
        assert store.revision() > before

    def test_failed_replace_wrapped_keys_keeps_the_old_keyring(self, store: Store) -> None:
        old = [WrappedKey("data", 1, b"d1"), WrappedKey("index", 1, b"i1")]
        store.add_wrapped_keys(old)
        before = snapshot(store)
        with pytest.raises(StoreError):
            store.replace_wrapped_keys([WrappedKey("data", 1, b"x"), WrappedKey("data", 1, b"y")])
        assert snapshot(store) == before

    # -- templates -----------------------------------------------------------------------------

    def test_rows_come_back_byte_for_byte(self, store: Store) -> None:
        r = row("g1", "alice", "t-1", version=7)
        store.put_template(r, replace_subject=False)
        assert rows_of(store, "g1") == [r]

    def test_put_template_returns_the_subjects_count(self, store: Store) -> None:
        assert store.put_template(row("g1", "alice", "a1"), replace_subject=False) == 1
        assert store.put_template(row("g1", "alice", "a2"), replace_subject=False) == 2
        assert store.put_template(row("g1", "bob", "b1"), replace_subject=False) == 1
        assert store.put_template(row("g1", "alice", "a3"), replace_subject=False) == 3
        # The same subject reference in another gallery is another subject.
        assert store.put_template(row("g2", "alice", "a4"), replace_subject=False) == 1
        assert store.subject_template_count("g1", ref("alice")) == 3
        assert store.subject_template_count("g1", ref("bob")) == 1
        assert store.subject_template_count("g2", ref("alice")) == 1

    def test_replace_subject_removes_the_subjects_other_rows(self, store: Store) -> None:
        store.put_template(row("g1", "alice", "a1"), replace_subject=False)
        store.put_template(row("g1", "bob", "b1"), replace_subject=False)
        store.put_template(row("g1", "alice", "a2"), replace_subject=False)
        store.put_template(row("g2", "alice", "other-gallery"), replace_subject=False)
        new = row("g1", "alice", "a3")
        assert store.put_template(new, replace_subject=True) == 1
        assert rows_of(store, "g1") == [row("g1", "bob", "b1"), new]
        assert rows_of(store, "g2") == [row("g2", "alice", "other-gallery")]

    def test_replace_subject_on_a_new_subject_just_adds(self, store: Store) -> None:
        store.put_template(row("g1", "bob", "b1"), replace_subject=False)
        assert store.put_template(row("g1", "alice", "a1"), replace_subject=True) == 1
        assert names(rows_of(store, "g1")) == ["b1", "a1"]

    def test_failed_replace_subject_keeps_the_old_rows(self, store: Store) -> None:
        """Delete-then-insert is one transaction: if the insert fails the subject is not lost."""
        store.put_template(row("g1", "alice", "a1"), replace_subject=False)
        store.put_template(row("g1", "alice", "a2"), replace_subject=False)
        store.put_template(row("g1", "bob", "b1"), replace_subject=False)
        before = snapshot(store)
        # The insert fails after the delete ran: a template id that is not 32 lowercase hex digits.
        bad = dataclasses.replace(row("g1", "alice", "a3"), template_id="not-an-id")
        for replace_subject in (True, False):
            for batch in ([(bad, replace_subject)], [(row("g1", "alice", "a4"), True), (bad, replace_subject)]):
                with pytest.raises(ValueError, match=BAD_ID):
                    store.put_templates(batch)
                with pytest.raises(ValueError, match=BAD_ID):
                    store.put_templates(batch, counts=False)
                assert snapshot(store) == before
        assert store.subject_template_count("g1", ref("alice")) == 2

    def test_malformed_template_id_raises_and_changes_nothing(self, store: Store) -> None:
        store.put_template(row("g1", "alice", "t-1"), replace_subject=False)
        before = snapshot(store)
        good = row("g1", "bob", "t-2")
        for template_id in ("", "t-1", good.template_id.upper(), good.template_id[:30], good.template_id + "00"):
            with pytest.raises(ValueError, match=BAD_ID):
                store.put_template(dataclasses.replace(good, template_id=template_id), replace_subject=False)
            assert snapshot(store) == before

    def test_delete_subject_counts(self, store: Store) -> None:
        for tid in ("a1", "a2", "a3"):
            store.put_template(row("g1", "alice", tid), replace_subject=False)
        store.put_template(row("g1", "bob", "b1"), replace_subject=False)
        store.put_template(row("g2", "alice", "a-g2"), replace_subject=False)
        assert store.delete_subject("g1", ref("alice")) == 3
        assert store.delete_subject("g1", ref("alice")) == 0
        assert store.subject_template_count("g1", ref("alice")) == 0
        assert rows_of(store, "g1") == [row("g1", "bob", "b1")]
        assert rows_of(store, "g2") == [row("g2", "alice", "a-g2")]

    def test_iter_templates_in_insertion_order_per_gallery(self, store: Store) -> None:
        # Ids, subjects and versions deliberately out of any sort order.
        inserted = [
            row("g1", "zed", "m-7", version=3),
            row("g2", "amy", "z-1"),
            row("g1", "amy", "a-9", version=1),
            row("g1", "zed", "b-2", version=2),
            row("g2", "zed", "a-0"),
            row("g1", "kim", "0-0", version=1),
        ]
        for r in inserted:
            store.put_template(r, replace_subject=False)
        assert rows_of(store, "g1") == [r for r in inserted if r.gallery == "g1"]
        assert rows_of(store, "g2") == [r for r in inserted if r.gallery == "g2"]
        assert rows_of(store, "g3") == []
        # A removal leaves the others in their order, and a later insert goes last.
        store.delete_subject("g1", ref("amy"))
        late = row("g1", "amy", "late")
        store.put_template(late, replace_subject=False)
        assert names(rows_of(store, "g1")) == ["m-7", "b-2", "0-0", "late"]

    # -- rewrap: compare-and-swap --------------------------------------------------------------

    def test_replace_template_swaps_only_the_exact_old_blob(self, store: Store) -> None:
        old = row("g1", "alice", "t-1", version=1)
        other = row("g1", "bob", "t-2", version=1)
        store.put_template(old, replace_subject=False)
        store.put_template(other, replace_subject=False)
        new = row("g1", "alice", "t-1", version=2)
        assert store.replace_template(old, new) is True
        assert rows_of(store, "g1") == [new, other]
        # The row no longer holds `old`: a second rewrapper that read it earlier loses the race.
        newer = row("g1", "alice", "t-1", version=3)
        assert store.replace_template(old, newer) is False
        assert rows_of(store, "g1") == [new, other]

    def test_replace_template_by_a_row_read_back(self, store: Store) -> None:
        """A row read from the store carries its seq; the swap still checks every other column."""
        store.put_template(row("g1", "alice", "t-1"), replace_subject=False)
        store.put_template(row("g1", "bob", "t-2"), replace_subject=False)
        read, bob = rows_of(store, "g1")
        assert 0 < read.seq < bob.seq
        new = row("g1", "alice", "t-1", version=2)
        for wrong in (
            dataclasses.replace(read, seq=bob.seq),  # another row's key
            dataclasses.replace(read, template_blob=b"stale"),
            dataclasses.replace(read, template_id=bob.template_id),
            dataclasses.replace(read, gallery="g2"),
        ):
            assert store.replace_template(wrong, new) is False
        assert rows_of(store, "g1") == [read, bob]
        assert store.replace_template(read, new) is True
        assert rows_of(store, "g1") == [new, bob]
        assert rows_of(store, "g1")[0].seq == read.seq  # swapped in place, not re-inserted

    def test_replace_template_refuses_a_stale_or_foreign_old_row(self, store: Store) -> None:
        current = row("g1", "alice", "t-1")
        store.put_template(current, replace_subject=False)
        before = rows_of(store, "g1")
        target = row("g1", "alice", "t-1", version=2)
        stale = [
            row("g1", "alice", "t-1", tag="-stale"),  # same row, different blob
            row("g1", "alice", "t-missing"),  # no such row
            row("g2", "alice", "t-1"),  # same template id claimed in another gallery
        ]
        for old in stale:
            assert store.replace_template(old, target) is False
            assert rows_of(store, "g1") == before

    # -- counts ----------------------------------------------------------------------------------

    def test_key_version_and_gallery_counts(self, store: Store) -> None:
        store.put_template(row("g1", "alice", "a1", version=1), replace_subject=False)
        store.put_template(row("g1", "alice", "a2", version=1), replace_subject=False)
        store.put_template(row("g1", "bob", "b1", version=2), replace_subject=False)
        store.put_template(row("g2", "alice", "c1", version=1), replace_subject=False)
        assert nonzero(store.key_version_counts()) == {1: 3, 2: 1}
        assert nonzero(store.gallery_counts()) == {"g1": (2, 3), "g2": (1, 1)}

        assert store.replace_template(row("g1", "alice", "a1", version=1), row("g1", "alice", "a1", version=2))
        assert nonzero(store.key_version_counts()) == {1: 2, 2: 2}

        store.delete_subject("g2", ref("alice"))
        store.put_template(row("g1", "bob", "b2", version=2), replace_subject=True)
        assert nonzero(store.key_version_counts()) == {1: 1, 2: 2}
        assert nonzero(store.gallery_counts()) == {"g1": (2, 3)}

    # -- revision ----------------------------------------------------------------------------

    def test_guard_counters_read_one_or_several_at_once(self, store: Store) -> None:
        assert store.guard_get("subject", b"g\0a") is None
        assert store.guard_get_many([("subject", b"g\0a"), ("caller_failures", b"gw")]) == {}
        revision = store.revision()
        store.guard_update("subject", b"g\0a", lambda old: (1 if old is None else old[0] + 1, 10.0, 0.0, 0))
        store.guard_update("subject", b"g\0a", lambda old: (1 if old is None else old[0] + 1, 10.0, 0.0, 0))
        store.guard_update("caller_failures", b"gw", lambda _old: (7, 1.5, 99.25, 2))
        store.guard_update("subject", b"g\0b", lambda _old: (3, 0.0, 0.0, 0))  # same key bytes, other scope below
        assert store.guard_get("subject", b"g\0a") == (2, 10.0, 0.0, 0)
        both = store.guard_get_many([("subject", b"g\0a"), ("caller_failures", b"gw"), ("identify", b"gw")])
        assert both == {("subject", b"g\0a"): (2, 10.0, 0.0, 0), ("caller_failures", b"gw"): (7, 1.5, 99.25, 2)}
        assert store.guard_get_many([("caller_failures", b"g\0b")]) == {}  # scope and key must both match
        assert store.revision() == revision, "guard counters change no gallery: the revision stays"

    def test_a_batch_is_remembered_with_its_rows_or_not_at_all(self, store: Store) -> None:
        now = 1_800_000_000.0
        first = BatchRecord(b"k" * 32, b"d" * 32, b'[["OK","x"]]', now)
        assert store.batch(first.key) is None
        store.put_templates([(row("g1", "alice", "a1"), False)], counts=False, batch=first)
        assert store.batch(first.key) == first
        # The same key again fails the whole transaction: its rows are not stored either.
        again = BatchRecord(first.key, b"e" * 32, b"[]", now + 1)
        with pytest.raises(StoreError):
            store.put_templates([(row("g1", "bob", "b1"), False)], counts=False, batch=again)
        assert [r.template_id for r in rows_of(store, "g1")] == [tid("a1")]
        assert store.batch(first.key) == first

    def test_batches_older_than_the_retention_are_forgotten_at_the_next_enrollment(self, store: Store) -> None:
        now = time.time()
        old = BatchRecord(b"o" * 32, b"d" * 32, b"[]", now - BATCH_RETENTION_SECONDS - 60)
        kept = BatchRecord(b"p" * 32, b"d" * 32, b"[]", now - BATCH_RETENTION_SECONDS + 600)
        store.put_templates([(row("g1", "alice", "a1"), False)], counts=False, batch=old)
        store.put_templates([(row("g1", "alice", "a2"), False)], counts=False, batch=kept)
        assert store.batch(old.key) is None  # the second commit forgot the first one's record
        assert store.batch(kept.key) == kept
        # Any enrollment prunes, keyed or not (else a record could outlive its 7 days forever).
        store.put_templates([(row("g1", "alice", "a3"), False)], counts=False)
        assert store.batch(kept.key) == kept
        store.put_templates([(row("g1", "alice", "a4"), False)], counts=False, batch=old)  # written again
        store.put_template(row("g1", "bob", "b1"), replace_subject=False)
        assert store.batch(old.key) is None

    def test_guard_updates_from_parallel_threads_all_count(self, store: Store) -> None:
        """The guard's counters are read-modify-write: parallel updates of one counter, the very
        first (creating the row) included, must serialise, or each starts from the same count
        and all but one are lost (parallel guesses then spend a budget only once)."""
        threads, each = 6, 3

        def bump(old: GuardRow | None) -> GuardRow:
            time.sleep(0.01)  # widen the window between the read and the write
            return (1 if old is None else old[0] + 1, 0.0, 0.0, 0)

        def work(_: int) -> None:
            for _ in range(each):
                store.guard_update("identify", b"fresh-caller", bump)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
        got = store.guard_get("identify", b"fresh-caller")
        assert got is not None
        assert got[0] == threads * each

    def test_revision_grows_on_every_write_and_not_on_reads(self, store: Store) -> None:
        writes: list[Callable[[], object]] = [
            lambda: store.add_wrapped_keys([WrappedKey("index", 1, b"i"), WrappedKey("data", 1, b"d")]),
            lambda: store.add_wrapped_keys([WrappedKey("data", 2, b"d2")]),
            lambda: store.delete_wrapped_key("data", 2),
            lambda: store.put_template(row("g1", "alice", "a1"), replace_subject=False),
            lambda: store.put_template(row("g1", "alice", "a2"), replace_subject=False),
            lambda: store.put_template(row("g1", "alice", "a3"), replace_subject=True),
            lambda: store.replace_template(row("g1", "alice", "a3"), row("g1", "alice", "a3", version=2)),
            lambda: store.put_template(row("g2", "bob", "b1"), replace_subject=False),
            lambda: store.delete_subject("g1", ref("alice")),
        ]
        reads: list[Callable[[], object]] = [
            store.wrapped_keys,
            lambda: rows_of(store, "g1"),
            lambda: rows_of(store, "g2"),
            lambda: store.subject_template_count("g2", ref("bob")),
            store.key_version_counts,
            store.gallery_counts,
            store.revision,
        ]
        seen = [store.revision()]
        for write in writes:
            write()
            seen.append(store.revision())
            for read in reads:
                read()
            assert store.revision() == seen[-1], "a read moved the revision"
        assert all(a < b for a, b in itertools.pairwise(seen)), seen

    def test_failed_writes_do_not_move_the_revision(self, store: Store) -> None:
        store.add_wrapped_keys([WrappedKey("data", 1, b"d")])
        store.put_template(row("g1", "alice", "a1"), replace_subject=False)
        store.put_template(row("g1", "bob", "b1"), replace_subject=False)
        before = store.revision()
        with pytest.raises(StoreError):
            store.add_wrapped_keys([WrappedKey("data", 1, b"dup")])
        bad = dataclasses.replace(row("g1", "bob", "b2"), template_id="B" * 32)
        with pytest.raises(ValueError, match=BAD_ID):
            store.put_template(bad, replace_subject=False)
        with pytest.raises(ValueError, match=BAD_ID):
            store.put_template(bad, replace_subject=True)
        assert store.revision() == before

    # -- durability across a restart -------------------------------------------------------------

    def test_reopen_after_close_keeps_everything(self, store: Store, reopen: Reopen) -> None:
        store.add_wrapped_keys([WrappedKey("index", 1, b"i\x00"), WrappedKey("data", 1, b"d\xff")])
        store.put_template(row("g1", "alice", "a1"), replace_subject=False)
        store.put_template(row("g2", "bob", "b1", version=2), replace_subject=False)
        store.put_template(row("g1", "carol", "c1"), replace_subject=False)
        store.delete_subject("g1", ref("carol"))
        keys, galleries, versions, counts, revision = snapshot(store)

        again = reopen(store)
        assert again.wrapped_keys() == keys
        assert {g: rows_of(again, g) for g in ("g1", "g2")} == galleries
        assert nonzero(again.key_version_counts()) == versions
        assert nonzero(again.gallery_counts()) == counts
        # Replicas follow the revision: a restart must never make it go back.
        assert again.revision() >= revision
        before_write = again.revision()
        again.put_template(row("g1", "dan", "d1"), replace_subject=False)
        assert again.revision() > before_write
        assert again.put_template(row("g1", "alice", "a2"), replace_subject=False) == 2
