"""The storage interface: untrusted bytes in and out (after Vault's physical backend).

A store never sees a template, a key or a subject id in clear: rows carry sealed blobs and a
keyed HMAC (``subject_ref``) that names the subject. Whoever can write the store can still
delete or move rows; the barrier turns a moved or edited row into an IntegrityError, never a
match. Every backend passes the same conformance suite (``tests/store_conformance.py``).

Writes are durable when the method returns: the daemon acknowledges a call only after that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TemplateRow:
    """One sealed template as stored.

    ``template_id`` is 32 lowercase hex digits (the store keeps its 16 bytes). ``seq`` is the
    store's insertion counter: set on rows read back, 0 on rows not stored yet; it is not part
    of the row's value (equality ignores it), only a cheap handle for the store.
    """

    gallery: str
    subject_ref: bytes
    template_id: str
    key_version: int
    subject_blob: bytes
    template_blob: bytes
    seq: int = field(default=0, compare=False)

    def __repr__(self) -> str:
        return f"TemplateRow(gallery={self.gallery!r}, template_id={self.template_id!r}, v{self.key_version})"


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key (or the index key) as the seal wrapped it."""

    purpose: str
    version: int
    wrapped: bytes

    def __repr__(self) -> str:
        return f"WrappedKey({self.purpose!r}, v{self.version})"


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change log replicas follow: what to re-read, never the data itself.

    ``kind``: "put" (rows were added to ``gallery``: read them with ``templates_between(gallery,
    first_seq, last_seq)``; one change per gallery per transaction, however many rows),
    "delete_subject" (every row of subject_ref went), "rewrap" (the row ``first_seq`` was
    re-sealed; plaintext unchanged), "keys" (the wrapped keyring changed).

    Within one revision the deletes come before the put: a follower that applies them in order
    ends with what the store holds (a replace's new row is in the range, its old rows are not).
    """

    revision: int
    kind: str
    gallery: str = ""
    subject_ref: bytes = b""
    first_seq: int = 0
    last_seq: int = 0


# The abuse guard's counter as stored: (count, window_start, locked_until, level).
GuardRow = tuple[int, float, float, int]


# How long a committed BulkEnroll batch is remembered by its idempotency key: a client that lost
# the answer (killed after the commit) and resends within this time gets the first answer back.
BATCH_RETENTION_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """A committed BulkEnroll stream, kept by its idempotency key for replays.

    ``key`` and ``digest`` are keyed hashes (of the caller and its key; of the items), never the
    values themselves; ``outcome`` is the per-item answer (template ids, refusal codes and
    messages: no subject ids, no encodings). ``created`` is a Unix time.
    """

    key: bytes
    digest: bytes
    outcome: bytes
    created: float

    def __repr__(self) -> str:
        return "BatchRecord(<key>)"


class StoreError(Exception):
    """The backend failed (disk full, connection lost). Mapped to UNAVAILABLE: nothing was written."""


class ChangesPruned(Exception):
    """``changes_since`` was asked for changes the store has already pruned from its log.

    The follower missed changes it can no longer replay one by one: it must reload every gallery
    (and the keyring) from the store. Not a StoreError: nothing failed, and retrying the same
    call cannot succeed.
    """

    def __init__(self, applied: int, oldest: int) -> None:
        super().__init__(f"changes after revision {applied} were pruned (the log starts after revision {oldest})")
        self.applied = applied
        self.oldest = oldest


class Store(Protocol):
    """Four families of calls: keyring, templates, counts, lifecycle."""

    last_revision: int  # the revision of the newest write made through this object

    def wrapped_keys(self) -> list[WrappedKey]:
        """Every wrapped key, ordered by purpose then version."""
        ...

    def add_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        """Insert keys atomically; raise StoreError if any (purpose, version) already exists."""
        ...

    def replace_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        """Swap the whole wrapped keyring for ``keys`` in one transaction (KEK rotation, seal migration)."""
        ...

    def delete_wrapped_key(self, purpose: str, version: int) -> bool:
        """Remove one wrapped key; True if it was there."""
        ...

    def put_template(self, row: TemplateRow, *, replace_subject: bool) -> int:
        """Store a row (first removing the subject's other rows if ``replace_subject``), in one
        transaction. Return the subject's template count afterwards."""
        ...

    def put_templates(
        self, rows: Sequence[tuple[TemplateRow, bool]], *, counts: bool = True, batch: BatchRecord | None = None
    ) -> list[int]:
        """``put_template`` for each (row, replace_subject), in order, all in one transaction.

        With ``counts=False`` the subjects' counts are not computed (one query per row saved on
        a bulk import) and the result is all zeros, one per row. ``batch``: remember the stream
        in the same transaction (and forget those older than ``BATCH_RETENTION_SECONDS``); a
        batch whose key is already stored fails the whole transaction with StoreError.
        """
        ...

    def batch(self, key: bytes) -> BatchRecord | None:
        """The batch remembered under ``key``, if any."""
        ...

    def delete_subject(self, gallery: str, subject_ref: bytes) -> int:
        """Remove every row of a subject; return how many were removed."""
        ...

    def subject_template_count(self, gallery: str, subject_ref: bytes) -> int: ...

    def iter_templates(self, gallery: str) -> Iterator[TemplateRow]:
        """Every row of a gallery, in insertion order."""
        ...

    def templates_between(self, gallery: str, first_seq: int, last_seq: int) -> Iterator[TemplateRow]:
        """The rows of a gallery with ``first_seq <= seq <= last_seq``, in insertion order (a
        follower applying a "put" change; rows deleted since are simply not there)."""
        ...

    def replace_template(self, old: TemplateRow, new: TemplateRow) -> bool:
        """Swap a row's blobs (rewrap), only if the row still holds ``old``'s blobs; True if swapped.
        ``old.seq``, when set (a row read back), finds the row by its key."""
        ...

    def key_version_counts(self) -> dict[int, int]:
        """How many rows each data-key version seals."""
        ...

    def gallery_counts(self) -> dict[str, tuple[int, int]]:
        """Per gallery: (subjects, templates)."""
        ...

    def guard_get(self, scope: str, key: bytes) -> GuardRow | None:
        """The guard counter of (scope, key), if any."""
        ...

    def guard_get_many(self, keys: Sequence[tuple[str, bytes]]) -> dict[tuple[str, bytes], GuardRow]:
        """The guard counters of several (scope, key) pairs in one read; absent pairs are left out."""
        ...

    def guard_update(self, scope: str, key: bytes, update: Callable[[GuardRow | None], GuardRow]) -> GuardRow:
        """Read-modify-write one guard counter in one transaction (replicas may race on it).
        Guard writes do not move the revision: they change no gallery."""
        ...

    def revision(self) -> int:
        """A counter that grows with every committed change; replicas follow it."""
        ...

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        """The current revision and every change after ``revision``, in commit order.

        The log is pruned (a backend keeps a bounded horizon of recent revisions): raises
        ChangesPruned if some change after ``revision`` is gone, and the caller must reload.
        """
        ...

    def close(self) -> None: ...
