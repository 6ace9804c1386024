"""The daemon's domain: the sealed -> unsealed lifecycle and the four operations.

The core owns the pieces below the edge (store, seal, barrier, galleries) and applies the
per-gallery policy: servicers hand it an authenticated Caller and plain values, and it answers
with outcomes or raises errors from ``faceseal.server.errors``. Writes go to the store first and
reach the in-memory gallery only after the store committed; one write lock keeps the two in the
same order.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from faceseal.server import validation
from faceseal.server.audit.log import AuditEntry, AuditLog, derive_audit_key, subject_hmac
from faceseal.server.auth.policy import Caller, Permission
from faceseal.server.config import Config, GalleryConfig
from faceseal.server.crypto import blob, vault
from faceseal.server.crypto.barrier import Barrier, KeyedHash, SealedTemplate
from faceseal.server.errors import (
    FaceSealError,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Sealed,
    Unavailable,
)
from faceseal.server.gallery.memory import Gallery
from faceseal.server.guard.guard import Guard
from faceseal.server.matching.distance import F32
from faceseal.server.metrics import Metrics
from faceseal.server.seal.base import Seal, SealError
from faceseal.server.store.base import BatchRecord, ChangesPruned, Store, StoreError, TemplateRow

log = logging.getLogger("faceseal.core")

DISTANCE_DECIMALS = 3
_OPEN_BATCH = 4096  # rows decrypted per append to the in-memory matrix at unseal
# The most bytes one Identify candidate takes in an answer: a 128-character subject id, a float
# distance and the framing of both (IdentifyBatch refuses what could exceed max_message_bytes).
_CANDIDATE_BYTES = 128 + 2 + 5 + 4
_PROBE_ANSWER_BYTES = 4  # the framing of one probe's list of candidates
# The most bytes one BulkEnroll result takes besides its message: its framing, the index, a
# 32-digit template id and the code.
_RESULT_BYTES = 3 + 4 + 34 + 2 + 3
# Contexts of the keyed hashes that remember a BulkEnroll stream (see ``Core.bulk_enroll``).
_BATCH_KEY_CONTEXT = b"faceseal/batch-key/v1"
_BATCH_DIGEST_CONTEXT = b"faceseal/batch-digest/v1"
# The per-item refusals a BulkEnroll answer carries, by the code a replay gives them back with.
_ITEM_ERRORS: dict[str, type[FaceSealError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "PERMISSION_DENIED": PermissionDenied,
    "NOT_FOUND": NotFound,
}


@dataclass(frozen=True, slots=True)
class EnrollOutcome:
    subject_id: str
    template_id: str
    template_count: int


@dataclass(frozen=True, slots=True)
class MatchOutcome:
    match: bool
    distance: float | None  # None unless the caller's disclosure is "distance"


@dataclass(frozen=True, slots=True)
class Candidate:
    subject_id: str
    distance: float | None


@dataclass(frozen=True, slots=True)
class KeyVersionStatus:
    version: int
    template_count: int
    active: bool


@dataclass(frozen=True, slots=True)
class GalleryStatus:
    name: str
    dimension: int
    metric: str
    subject_count: int
    template_count: int


@dataclass(frozen=True, slots=True)
class Status:
    sealed: bool
    key_versions: list[KeyVersionStatus]
    galleries: list[GalleryStatus]


@dataclass(frozen=True, slots=True)
class RewrapProgress:
    done: int
    total: int
    target_version: int


# (gallery, subject_id, encoding, replace), as a BulkEnroll stream carries them.
EnrollItem = tuple[str, str, Sequence[float], bool]


@dataclass(frozen=True, slots=True)
class _Pending:
    """An enrollment that passed every check and waits for the commit."""

    gallery: Gallery
    subject_id: str
    vector: F32
    replace: bool
    template_id: str


@dataclass(frozen=True, slots=True)
class _Unsealed:
    barrier: Barrier
    galleries: dict[str, Gallery]
    audit_key: bytes = field(repr=False)


class Core:
    """Sealed until ``unseal`` succeeds; every operation raises Sealed before that."""

    def __init__(self, config: Config, store: Store, seal: Seal, metrics: Metrics, audit_dir: Path) -> None:
        self._config = config
        self._metrics = metrics
        self.guard = Guard(config.guard, store, metrics)
        self.audit = AuditLog(audit_dir, config.audit.max_bytes, metrics, self._audit_key)
        self._store = store
        self._seal = seal
        self._state: _Unsealed | None = None
        self._write_lock = threading.Lock()
        self._listeners: list[Callable[[bool], None]] = []
        self.integrity_failures = 0
        self._applied = 0  # the store revision the in-memory state reflects
        self._own: set[int] = set()  # revisions this process wrote itself (already in memory)
        self._replaced: list[weakref.ref[Gallery]] = []  # galleries a reload replaced (see ``_reload``)
        self._publish()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def sealed(self) -> bool:
        return self._state is None

    def on_seal_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(sealed)`` now and whenever the state changes (health, metrics)."""
        self._listeners.append(listener)
        listener(self.sealed)

    def unseal(self) -> None:
        """Unwrap the keyring and open every template. Raises SealError if the seal cannot."""
        if self._state is not None:
            return
        # Read before the rows: a change committed meanwhile is applied again by ``follow``, and
        # applying is idempotent (a known template id is skipped, a delete of nothing is nothing;
        # a put's range is re-read after its deletes). If the log is pruned past this revision
        # before the first follow, that follow reloads.
        self._applied = self._store.revision()
        barrier = Barrier(vault.load_or_create(self._store, self._seal))
        galleries = {name: self._open_gallery(barrier, g) for name, g in self._config.galleries.items()}
        self._state = _Unsealed(barrier, galleries, derive_audit_key(barrier.keyring.index_key.reveal()))
        self._publish()
        log.info("unsealed", extra={"seal": self._seal.describe(), "key_versions": len(barrier.keyring.versions())})
        for listener in self._listeners:
            listener(False)

    def unseal_until(self, stop: threading.Event, max_backoff: float = 5.0) -> None:
        """Retry ``unseal`` with exponential backoff until it works or ``stop`` is set."""
        delay = 0.5
        while not stop.is_set():
            try:
                self.unseal()
                return
            except (SealError, StoreError) as exc:
                log.warning("still sealed; retrying", extra={"reason": str(exc), "retry_in_seconds": delay})
            stop.wait(delay)
            delay = min(max_backoff, delay * 2)

    def follow(self) -> int:
        """Apply changes other writers committed (replicas, worker processes) to memory.

        Returns how many were applied (a full reload counts as one). Under the write lock, so a
        local write and a followed one never interleave; a Match keeps reading the gallery
        meanwhile. A follower that fell behind the store's pruned change log reloads everything.
        """
        state = self._state
        if state is None:
            return 0
        with self._write_lock:
            # Read before the changes: once no replaced gallery is left, every write that held one
            # has committed, so this round sees its change and the window can close after it.
            stale = any(ref() is not None for ref in self._replaced)
            try:
                revision, changes = self._store.changes_since(self._applied)
            except ChangesPruned as exc:
                log.warning("fell behind the store's change log; reloading every gallery", extra={"reason": str(exc)})
                return self._reload(state)
            # Own changes are skipped (already in memory), except after a reload: see ``_reload``.
            foreign = [c for c in changes if self._replaced or c.revision not in self._own]
            if any(c.kind == "keys" for c in foreign):
                try:
                    keyring = vault.load(self._store, self._seal)
                except SealError as exc:
                    log.error("cannot follow a keyring change; keeping the current keys", extra={"reason": str(exc)})
                    return 0
                state = _Unsealed(Barrier(keyring), state.galleries, state.audit_key)
                self._state = state
            for change in foreign:
                gallery = state.galleries.get(change.gallery)
                if gallery is None:
                    continue
                if change.kind == "delete_subject":
                    gallery.remove_ref(change.subject_ref)
                elif change.kind == "put":
                    # The rows still in the range (one deleted since is gone; a later change says
                    # so); one already in memory (read by unseal, or twice in a range) is skipped.
                    rows = self._store.templates_between(change.gallery, change.first_seq, change.last_seq)
                    known = gallery.has_template
                    self._open_rows(state.barrier, gallery, (r for r in rows if not known(r.template_id)))
            self._applied = revision
            self._own = {r for r in self._own if r > revision}
            if not stale:
                self._replaced = []
        if foreign:
            self._publish()
        return len(foreign)

    def _reload(self, state: _Unsealed) -> int:
        """Rebuild the keyring and every gallery from the store, as unseal does, and swap them in.

        Called under the write lock when the change log no longer reaches back to ``_applied``.
        Match keeps reading the old galleries until the new ones replace them.

        A local Enroll or Delete picks its gallery object before it takes the write lock, so one
        in flight across the swap updates the replaced object, and its change, being its own,
        would be skipped: the new gallery would miss an enrollment or keep a deleted subject.
        So while any replaced gallery is still referenced (weakly tracked here), and for one
        round after, ``follow`` applies own changes too; applying is idempotent.
        """
        revision = self._store.revision()  # before the rows, as in unseal
        try:
            keyring = vault.load(self._store, self._seal)
        except SealError as exc:
            log.error("cannot reload the keyring; keeping the current state", extra={"reason": str(exc)})
            return 0
        barrier = Barrier(keyring)
        galleries = {name: self._open_gallery(barrier, g) for name, g in self._config.galleries.items()}
        self._replaced += [weakref.ref(g) for g in state.galleries.values()]
        self._state = _Unsealed(barrier, galleries, state.audit_key)
        self._applied = revision
        self._own = {r for r in self._own if r > revision}
        self._publish()
        return 1

    def follow_until(self, stop: threading.Event) -> None:
        """Poll the store's revision until ``stop``; a failed poll is logged and retried."""
        while not stop.wait(self._config.store.follow_interval_seconds):
            try:
                self.follow()
            except Exception as exc:  # the store may be briefly unreachable; try again next tick
                log.warning("could not follow the store", extra={"reason": type(exc).__name__})

    def _open_row(self, barrier: Barrier, gallery: Gallery, row: TemplateRow) -> None:
        self._open_rows(barrier, gallery, (row,))

    def _open_rows(self, barrier: Barrier, gallery: Gallery, rows: Iterable[TemplateRow]) -> None:
        """Open rows and append them to ``gallery`` in batches of ``_OPEN_BATCH``.

        Batching keeps one growth, one copy and one norm computation per batch instead of per
        row, and lets the barrier decrypt a batch straight into one matrix. A row that fails its
        integrity check raises the alarm and poisons its subject; the others still open. The
        caller skips template ids the gallery already holds.
        """
        batch: list[TemplateRow] = []
        for row in rows:
            batch.append(row)
            if len(batch) == _OPEN_BATCH:
                self._open_batch(barrier, gallery, batch)
                batch = []
        if batch:
            self._open_batch(barrier, gallery, batch)

    def _open_batch(self, barrier: Barrier, gallery: Gallery, rows: list[TemplateRow]) -> None:
        config = gallery.config
        ids, matrix = barrier.open_many(config.name, rows, config.dimension)
        pairs = zip(ids, rows, strict=True)
        entries = [(sid, row.template_id, row.subject_ref) for sid, row in pairs if sid is not None]
        if len(entries) < len(rows):
            for sid, row in zip(ids, rows, strict=True):
                if sid is None:
                    self._alarm(config.name)
                    gallery.poison(row.subject_ref)
            matrix = matrix[[sid is not None for sid in ids]]
        gallery.add_many(entries, matrix)

    def _open_gallery(self, barrier: Barrier, config: GalleryConfig) -> Gallery:
        """Decrypt every row of a gallery into one matrix, appended in batches; the matrix is
        sized up front from the store's count, so it is neither copied while it grows nor larger
        than needed (a few rows more room for the enrollments that follow)."""
        _, templates = self._store.gallery_counts().get(config.name, (0, 0))
        gallery = Gallery(config, capacity=templates + templates // 64 + 1024)
        with _no_cyclic_gc():
            self._open_rows(barrier, gallery, self._store.iter_templates(config.name))
        return gallery

    def _audit_key(self) -> bytes | None:
        state = self._state
        return None if state is None else state.audit_key

    def resolve_gallery(self, name: str) -> str | None:
        """The configured gallery a request names (empty: the default), or None if it names none."""
        name = name or self._config.default_gallery
        return name if name in self._config.galleries else None

    def _publish(self) -> None:
        """Bring the state gauges up to date after a change of seal state, keys or galleries."""
        state = self._state
        self._metrics.sealed.set(1 if state is None else 0)
        if state is not None:
            self._metrics.key_versions.set(len(state.barrier.keyring.versions()))
            for name, gallery in state.galleries.items():
                self._metrics.templates.labels(name).set(gallery.size()[1])

    def _alarm(self, gallery: str) -> None:
        self.integrity_failures += 1
        self._metrics.integrity_failures.labels(gallery).inc()
        log.error("integrity failure: a stored template did not open", extra={"gallery": gallery})

    def _unsealed(self) -> _Unsealed:
        state = self._state
        if state is None:
            raise Sealed("the daemon is sealed: its keys are not available yet; retry later")
        return state

    def _gallery(
        self, caller: Caller, permission: Permission, name: str, *, admit: bool = True
    ) -> tuple[_Unsealed, Gallery]:
        name = validation.gallery_name(name) if name else self._config.default_gallery
        try:
            caller.authorize(permission, name)
        except PermissionDenied as exc:
            self._metrics.auth_denied.labels(exc.reason).inc()
            raise
        if admit:
            self.guard.admit(caller)
        state = self._unsealed()
        gallery = state.galleries.get(name)
        if gallery is None:
            raise NotFound("no such gallery")
        return state, gallery

    # -- operations -------------------------------------------------------------------------

    def enroll(
        self, caller: Caller, gallery_name: str, subject_id: str, encoding: Sequence[float], replace: bool
    ) -> EnrollOutcome:
        item = self._prepare(caller, gallery_name, subject_id, encoding, replace)
        return self._commit([item])[0]

    def bulk_enroll(
        self, caller: Caller, items: Iterable[EnrollItem], idempotency_key: str = ""
    ) -> list[EnrollOutcome | FaceSealError]:
        """Validate every item, then store all valid ones in one transaction, in stream order.

        An invalid item is reported and skipped; the rest commit together or not at all (a
        stream that breaks off, an audit log that cannot be written), so a client can resend
        a whole batch without duplicating templates.

        ``idempotency_key`` covers the one case that leaves: a client that lost the answer of a
        committed stream (killed after the commit) and sends it again. The commit remembers the
        stream by a keyed hash of (caller, key) with a keyed digest of its items; a stream that
        comes again under the same key gets the first answer back and stores nothing, and one
        with other items under a used key is refused whole (FAILED_PRECONDITION): storing it or
        answering it with the first stream's results would both lose its items.
        """
        self.guard.admit(caller)
        key = validation.idempotency_key(idempotency_key) if idempotency_key else ""
        state = self._unsealed()
        digest = state.barrier.keyed_hash(_BATCH_DIGEST_CONTEXT) if key else None
        prepared: list[_Pending | FaceSealError] = []
        for n, item in enumerate(items):
            if n >= self._config.server.max_batch:
                raise InvalidArgument(f"a BulkEnroll stream holds at most {self._config.server.max_batch} items")
            if digest is not None:  # the gallery as resolved: "" and the default's name are one
                _digest_item(digest, self.resolve_gallery(item[0]) or item[0], *item[1:])
            try:
                prepared.append(self._prepare(caller, *item, admit=False))
            except (InvalidArgument, PermissionDenied, NotFound) as exc:
                prepared.append(exc)
        batch = None
        if digest is not None:
            name = state.barrier.keyed_hash(_BATCH_KEY_CONTEXT)
            for part in (caller.identity, key):
                name.update(blob.field(part.encode()))
            batch_key, items_digest = name.digest(), digest.digest()
            stored = self._store.batch(batch_key)
            if stored is not None:
                if not hmac.compare_digest(stored.digest, items_digest):
                    raise FailedPrecondition(
                        "this idempotency_key was used for a stream with other items; nothing was stored"
                    )
                replayed = _outcomes_from_json(stored.outcome)
                # Nothing changes, but template ids are handed out again: the trail shows it.
                self.audit.record(AuditEntry("OK", decision="replayed", candidates=len(replayed)))
                return replayed
            batch = BatchRecord(batch_key, items_digest, _outcomes_to_json(prepared), time.time())
        # The answer must fit one message: gRPC would refuse to send it after the commit, and
        # the client could not tell a stored stream from a refused one.
        if sum(_RESULT_BYTES + (len(str(p).encode()) if not isinstance(p, _Pending) else 0) for p in prepared) > (
            self._config.server.max_message_bytes
        ):
            raise InvalidArgument(
                f"the answer to these {len(prepared)} items would exceed one message "
                f"({self._config.server.max_message_bytes} bytes); send fewer items per stream"
            )
        valid = [p for p in prepared if isinstance(p, _Pending)]
        outcomes = iter(self._commit(valid, counts=False, batch=batch)) if valid else iter(())
        return [next(outcomes) if isinstance(p, _Pending) else p for p in prepared]

    def _prepare(
        self,
        caller: Caller,
        gallery_name: str,
        subject_id: str,
        encoding: Sequence[float],
        replace: bool,
        *,
        admit: bool = True,
    ) -> _Pending:
        _, gallery = self._gallery(caller, Permission.ENROLL, gallery_name, admit=admit)
        subject_id = validation.subject_id(subject_id)
        vector = validation.vector(encoding, gallery.config.dimension, "encoding")
        return _Pending(gallery, subject_id, vector, replace, secrets.token_hex(16))

    def _commit(
        self, items: Sequence[_Pending], *, counts: bool = True, batch: BatchRecord | None = None
    ) -> list[EnrollOutcome]:
        """Audit, seal and store ``items`` in one transaction, then add them to memory.

        ``counts``: report each subject's template count (Enroll answers it; BulkEnroll does not,
        and skipping it saves the store a count per item). ``batch``: the stream to remember
        by its idempotency key, in the same transaction.
        """
        with self._write_lock:
            # On record before anything is stored (fail closed), all of a batch in one write.
            entries = [AuditEntry("OK", i.gallery.config.name, i.subject_id) for i in items]
            self.audit.record_many(entries)
            # Seal under the keyring current inside the lock: one taken before it could name a
            # version that a RetireKey in between has destroyed (an acknowledged, unopenable row).
            barrier = self._unsealed().barrier
            rows = []
            for item in items:
                name = item.gallery.config.name
                sealed = barrier.seal(name, item.subject_id, item.template_id, item.vector)
                ref = barrier.subject_ref(name, item.subject_id)
                row = TemplateRow(
                    name, ref, item.template_id, sealed.key_version, sealed.subject_blob, sealed.template_blob
                )
                rows.append((row, item.replace))
            with self._retract_on_store_failure(entries):
                stored = self._store.put_templates(rows, counts=counts, batch=batch)
            self._own.add(self._store.last_revision)
            self._remember(items, [row.subject_ref for row, _ in rows])
        for gallery in {id(i.gallery): i.gallery for i in items}.values():
            self._metrics.templates.labels(gallery.config.name).set(gallery.size()[1])
        if not counts:
            stored = [0] * len(items)
        return [EnrollOutcome(i.subject_id, i.template_id, c) for i, c in zip(items, stored, strict=True)]

    @contextmanager
    def _retract_on_store_failure(self, entries: Sequence[AuditEntry]) -> Iterator[None]:
        """The audit records of a change go out before the store commits it (fail closed); if the
        store then fails, follow them with records of the same entries saying UNAVAILABLE, so the
        log never shows as done a change that was not stored."""
        try:
            yield
        except StoreError:
            with suppress(Unavailable):  # the audit log failed too; its own error is logged there
                self.audit.record_many([replace(e, outcome="UNAVAILABLE") for e in entries])
            raise

    @staticmethod
    def _remember(items: Sequence[_Pending], refs: Sequence[bytes]) -> None:
        """Add committed items to their galleries: runs of plain additions to one gallery in one
        block (one copy, one norm computation), a replacement on its own, in stream order."""
        run: list[int] = []

        def flush() -> None:
            if run:
                gallery = items[run[0]].gallery
                entries = [(items[k].subject_id, items[k].template_id, refs[k]) for k in run]
                gallery.add_many(entries, np.stack([items[k].vector for k in run]))
                run.clear()

        for k, item in enumerate(items):
            if item.replace:
                flush()
                item.gallery.add(item.subject_id, item.template_id, item.vector, subject_ref=refs[k], replace=True)
                item.gallery.clear_poison(refs[k])
            else:
                if run and items[run[0]].gallery is not item.gallery:
                    flush()
                run.append(k)
        flush()

    def match(self, caller: Caller, gallery_name: str, subject_id: str, probe: Sequence[float]) -> MatchOutcome:
        state, gallery = self._gallery(caller, Permission.MATCH, gallery_name)
        subject_id = validation.subject_id(subject_id)
        vector = validation.vector(probe, gallery.config.dimension, "probe")
        ref = state.barrier.subject_ref(gallery.config.name, subject_id)
        attempt = self.guard.check_match(caller, gallery.config.name, ref)
        try:
            try:
                best = gallery.match(subject_id, ref, vector)
            except IntegrityError:
                self._alarm(gallery.config.name)
                raise
            decision = "match" if best <= gallery.config.threshold else "no_match"
            # Counted before the answer leaves: a failure that is never recorded is a free guess.
            self.guard.record_match(caller, gallery.config, ref, vector, decision == "match", attempt.subject_row)
        finally:
            attempt.release()
        self.audit.record(AuditEntry("OK", gallery.config.name, subject_id, decision))
        self._metrics.match_decisions.labels(gallery.config.name, decision).inc()
        return MatchOutcome(decision == "match", _disclose(caller, best))

    def identify(self, caller: Caller, gallery_name: str, probe: Sequence[float], top_k: int) -> list[Candidate]:
        _, gallery = self._gallery(caller, Permission.IDENTIFY, gallery_name)
        vector = validation.vector(probe, gallery.config.dimension, "probe")
        k = validation.top_k(top_k, self._config.server.max_top_k)
        self.guard.spend_identify(caller)
        hits = gallery.identify(vector, k)
        self.audit.record(AuditEntry("OK", gallery.config.name, candidates=len(hits)))
        return [Candidate(h.subject_id, _disclose(caller, h.distance)) for h in hits]

    def identify_many(
        self, caller: Caller, gallery_name: str, probes: Sequence[Sequence[float]], top_k: int
    ) -> list[list[Candidate]]:
        """Identify for each probe: every probe is checked before any is searched, each spends
        one search of the caller's budget and gets its own audit record (one write for all)."""
        _, gallery = self._gallery(caller, Permission.IDENTIFY, gallery_name, admit=False)
        server = self._config.server
        limit = server.max_identify_batch
        if not 1 <= len(probes) <= limit:
            raise InvalidArgument(f"an IdentifyBatch carries 1 to {limit} probes, got {len(probes)}")
        k = validation.top_k(top_k, server.max_top_k)
        # The answer must fit one message, or the call would fail after spending the budget.
        if len(probes) * (k * _CANDIDATE_BYTES + _PROBE_ANSWER_BYTES) > server.max_message_bytes:
            raise InvalidArgument(
                f"{len(probes)} probes x top_k {k} could answer more than one message holds "
                f"({server.max_message_bytes} bytes); send fewer probes or a smaller top_k"
            )
        self.guard.admit(caller, len(probes))
        dimension = gallery.config.dimension
        matrix = np.stack([validation.vector(p, dimension, f"probes[{i}].encoding") for i, p in enumerate(probes)])
        self.guard.spend_identify(caller, len(probes))
        answers = gallery.identify_many(matrix, k)
        self.audit.record_many([AuditEntry("OK", gallery.config.name, candidates=len(hits)) for hits in answers])
        return [[Candidate(h.subject_id, _disclose(caller, h.distance)) for h in hits] for hits in answers]

    def delete(self, caller: Caller, gallery_name: str, subject_id: str) -> int:
        state, gallery = self._gallery(caller, Permission.DELETE, gallery_name)
        subject_id = validation.subject_id(subject_id)
        ref = state.barrier.subject_ref(gallery.config.name, subject_id)
        with self._write_lock:
            if self._store.subject_template_count(gallery.config.name, ref) == 0:
                gallery.remove(subject_id, ref)  # drop a poisoned marker, if any
                raise NotFound("no such subject in this gallery")
            entry = AuditEntry("OK", gallery.config.name, subject_id)
            self.audit.record(entry)
            with self._retract_on_store_failure([entry]):
                deleted = self._store.delete_subject(gallery.config.name, ref)
            self._own.add(self._store.last_revision)
            gallery.remove(subject_id, ref)
        self._metrics.templates.labels(gallery.config.name).set(gallery.size()[1])
        return deleted

    # -- key administration (permission: admin, checked at the edge) --------------------------

    def status(self) -> Status:
        if self._state is not None:
            self.audit.record(AuditEntry("OK"))
        counts = self._store.key_version_counts()
        state = self._state
        if state is None:
            return Status(True, [], [])
        keyring = state.barrier.keyring
        versions = [KeyVersionStatus(v, counts.get(v, 0), v == keyring.active) for v in keyring.versions()]
        galleries = []
        for name, gallery in state.galleries.items():
            subjects, templates = gallery.size()
            c = gallery.config
            galleries.append(GalleryStatus(name, c.dimension, c.metric, subjects, templates))
        return Status(False, versions, galleries)

    def audit_hash(self, gallery_name: str, subject_id: str) -> str:
        """The ``subject`` value audit records carry for this subject (admin only, and audited)."""
        name = validation.gallery_name(gallery_name) if gallery_name else self._config.default_gallery
        if name not in self._config.galleries:
            raise NotFound("no such gallery")
        subject_id = validation.subject_id(subject_id)
        state = self._unsealed()
        self.audit.record(AuditEntry("OK", name, subject_id))
        return subject_hmac(state.audit_key, name, subject_id)

    def rotate_key(self) -> int:
        with self._write_lock:
            state = self._unsealed()
            self.audit.record(AuditEntry("OK"))
            keyring = vault.add_version(self._store, self._seal, state.barrier.keyring)
            self._own.add(self._store.last_revision)
            self._state = _Unsealed(Barrier(keyring), state.galleries, state.audit_key)
            self._publish()
        log.info("data key rotated", extra={"key_version": keyring.active})
        return keyring.active

    def rewrap(self) -> Iterator[RewrapProgress]:
        """Re-seal every template not under the active version. Resumable: a rerun only sees what
        is left. Safe under traffic: the in-memory galleries hold plaintext that does not change,
        and each row is swapped only if it still holds the blob that was read (compare-and-swap)."""
        target = self._unsealed().barrier.keyring.active
        self.audit.record(AuditEntry("OK"))
        pending = [
            (gallery, row)
            for gallery in self._config.galleries.values()
            for row in self._store.iter_templates(gallery.name)
            if row.key_version != target
        ]
        total, done = len(pending), 0
        yield RewrapProgress(0, total, target)
        for gallery, row in pending:
            with self._write_lock:
                barrier = self._unsealed().barrier
                sealed = SealedTemplate(row.key_version, row.subject_blob, row.template_blob)
                try:
                    subject_id, encoding = barrier.open(
                        gallery.name, row.subject_ref, row.template_id, sealed, gallery.dimension
                    )
                except IntegrityError:
                    self._alarm(gallery.name)
                    continue
                new = barrier.seal(gallery.name, subject_id, row.template_id, encoding, key_version=target)
                self._store.replace_template(
                    row,
                    TemplateRow(
                        gallery.name,
                        row.subject_ref,
                        row.template_id,
                        target,
                        new.subject_blob,
                        new.template_blob,
                    ),
                )
            done += 1
            if done % 256 == 0 or done == total:
                yield RewrapProgress(done, total, target)
        if done < total:  # some blobs did not open (alarmed above): still end with a final report
            yield RewrapProgress(done, total, target)

    def retire_key(self, version: int) -> None:
        """Destroy a data-key version. Refused for the active version and while any blob uses it."""
        with self._write_lock:
            state = self._unsealed()
            keyring = state.barrier.keyring
            if keyring.key(version) is None:
                raise NotFound("no such key version")
            if version == keyring.active:
                raise FailedPrecondition("the active key version cannot be retired; rotate first")
            in_use = self._store.key_version_counts().get(version, 0)
            if in_use:
                raise FailedPrecondition(f"key version {version} still seals {in_use} templates; run Rewrap first")
            self.audit.record(AuditEntry("OK"))
            keyring = vault.retire_version(self._store, self._seal, keyring, version)
            self._own.add(self._store.last_revision)
            self._state = _Unsealed(Barrier(keyring), state.galleries, state.audit_key)
            self._publish()
        log.info("data key retired", extra={"key_version": version})


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a gallery opens: the millions of short-lived row
    objects of a large gallery (none of them in a cycle; reference counting frees each) would
    otherwise trigger a collection every few hundred allocations, each walking the heap."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _digest_item(digest: KeyedHash, gallery: str, subject_id: str, encoding: Sequence[float], replace: bool) -> None:
    """Feed one item, as received (refused ones too), to a stream's digest: every field length
    prefixed, the encoding as float64 (exactly the wire's float32 values, whatever they are)."""
    for part in (gallery.encode(), subject_id.encode(), np.array(encoding, dtype=np.float64).tobytes()):
        digest.update(blob.field(part))
    digest.update(b"\1" if replace else b"\0")


def _outcomes_to_json(prepared: Sequence[_Pending | FaceSealError]) -> bytes:
    """A stream's answer as the store keeps it for a replay: per item a template id or a refusal
    (code and message: messages state rules, never values). No subject ids, no encodings."""
    items: list[list[str]] = []
    for p in prepared:
        if isinstance(p, _Pending):
            items.append(["OK", p.template_id])
        else:
            code = next(c for c, kind in _ITEM_ERRORS.items() if isinstance(p, kind))
            items.append([code, str(p)])
    return json.dumps(items, separators=(",", ":")).encode()


def _outcomes_from_json(data: bytes) -> list[EnrollOutcome | FaceSealError]:
    outcomes: list[EnrollOutcome | FaceSealError] = []
    for code, value in json.loads(data):
        # The subject id is not kept; a BulkEnroll answer does not carry it.
        outcomes.append(EnrollOutcome("", value, 0) if code == "OK" else _ITEM_ERRORS[code](value))
    return outcomes


def _disclose(caller: Caller, value: float) -> float | None:
    return round(value, DISTANCE_DECIMALS) if caller.disclosure == "distance" else None
