"""One gallery's opened templates, held in memory as one contiguous float32 matrix.

Match and Identify read only here; the store is written first and this copy is updated only
after the store has committed, so a reader never sees a template that a crash could lose.
Rows that failed to open at unseal are remembered by their subject reference ("poisoned"):
Match on such a subject answers DATA_LOSS, never a match, until the subject is re-enrolled
with replace or deleted.

The bookkeeping beside the matrix is kept to a few numpy arrays and one dict, because a gallery
of a million templates is mostly rows: per-row Python objects (a str per id, a list per subject,
set entries) once cost more memory than the floats themselves. Per row there is a 16-byte
template key, a subject id in a shared byte arena, and one list slot pointing at the subject
reference; per subject one dict entry whose value is a plain int for the usual single template.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from faceseal.server.config import GalleryConfig
from faceseal.server.errors import IntegrityError, NotFound
from faceseal.server.matching import distance
from faceseal.server.matching.distance import F32

_KEY = np.dtype("S16")  # a template key; every key is exactly 16 bytes, so numpy's NUL padding is moot
_BATCH_RESTARTS = 3  # IdentifyBatch starts over this often when rows move, then holds the lock
_SCORE_BLOCK_BYTES = 64 << 20  # the most float32 scores an IdentifyBatch holds at once (probes x rows)
_INDEX_BULK = 64  # an append of more rows than this re-sorts the template index lazily instead


def _template_key(template_id: str) -> bytes:
    """16 bytes naming a template: the id itself when it is the daemon's 32 lowercase hex digits,
    else a 128-bit hash of it (ids written by other tools, tests). Either way no str is kept."""
    if len(template_id) == 32:
        try:
            raw = bytes.fromhex(template_id)
        except ValueError:
            raw = b""
        if len(raw) == 16 and raw.hex() == template_id:
            return raw
    return hashlib.blake2b(template_id.encode(), digest_size=16, person=b"faceseal/tid").digest()


@dataclass(frozen=True, slots=True)
class Hit:
    """A subject and its smallest exact distance to the probe."""

    subject_id: str
    distance: float

    def __repr__(self) -> str:
        # Neither the subject nor the distance: a caller's disclosure decides whether one is shown.
        return "Hit(<subject>, <distance>)"


class Gallery:
    """Templates of one gallery, grouped by subject. Every method is thread-safe."""

    def __init__(self, config: GalleryConfig, capacity: int = 1024) -> None:
        """``capacity``: rows to allocate up front (the store's count at unseal). The matrix grows
        by 1.5x after that; untouched capacity costs address space, not resident memory."""
        self.config = config
        self._lock = threading.Lock()
        capacity = max(1, capacity)
        self._n = 0
        # Bumped whenever rows move (a removal fills its hole with the last row): a reader that
        # let go of the lock between blocks of rows knows whether its row numbers still hold.
        self._layout = 0
        self._matrix: F32 = np.zeros((capacity, config.dimension), dtype=np.float32)
        self._sq_norms: F32 = np.zeros(capacity, dtype=np.float32)
        self._keys: npt.NDArray[np.bytes_] = np.zeros(capacity, dtype=_KEY)
        # Subject id of each row: bytes ``_ids[off : off + len]``; removed rows leave garbage that
        # ``_compact_ids`` reclaims once it is half the arena.
        self._ids = bytearray()
        self._id_off: npt.NDArray[np.int64] = np.zeros(capacity, dtype=np.int64)
        self._id_len: npt.NDArray[np.int32] = np.zeros(capacity, dtype=np.int32)
        self._id_garbage = 0
        self._row_ref: list[bytes] = []  # the subject reference of each row (shared with the dict key)
        self._subjects: dict[bytes, int | list[int]] = {}  # subject reference -> its row(s)
        self._poisoned: set[bytes] = set()
        # has_template: a sorted snapshot of the keys plus the keys added and removed since. A bulk
        # append only marks the snapshot stale; the next lookup re-sorts every row's key once.
        self._sorted: npt.NDArray[np.bytes_] = np.zeros(0, dtype=_KEY)
        self._added: set[bytes] = set()
        self._removed: set[bytes] = set()
        self._stale = False

    # -- writes (after the store committed) -------------------------------------------------

    def add(
        self, subject_id: str, template_id: str, encoding: F32, *, subject_ref: bytes, replace: bool = False
    ) -> None:
        with self._lock:
            if replace:
                self._remove_locked(subject_ref)
            self._append_locked([(subject_id, template_id, subject_ref)], encoding[np.newaxis, :])

    def add_many(self, entries: list[tuple[str, str, bytes]], encodings: F32) -> None:
        """Append many (subject_id, template_id, subject_ref) rows at once: one growth, one copy
        and one norm computation for the whole batch (opening a gallery at unseal)."""
        if not entries:
            return
        with self._lock:
            self._append_locked(entries, encodings)

    def has_template(self, template_id: str) -> bool:
        key = _template_key(template_id)
        with self._lock:
            if key in self._added:
                return True
            if key in self._removed:
                return False
            if self._stale:
                self._sorted = np.sort(self._keys[: self._n])
                self._added.clear()
                self._removed.clear()
                self._stale = False
            i = int(np.searchsorted(self._sorted, key))
            return i < self._sorted.shape[0] and self._sorted[i : i + 1].tobytes() == key

    def remove_ref(self, subject_ref: bytes) -> None:
        """Remove a subject known only by its reference (a replica applying another's Delete)."""
        with self._lock:
            self._remove_locked(subject_ref)
            self._poisoned.discard(subject_ref)

    def remove(self, subject_id: str, subject_ref: bytes) -> None:
        """Remove a subject; rows are found by ``subject_ref``, which names ``subject_id``."""
        with self._lock:
            self._remove_locked(subject_ref)
            self._poisoned.discard(subject_ref)

    def poison(self, subject_ref: bytes) -> None:
        with self._lock:
            self._poisoned.add(subject_ref)

    def clear_poison(self, subject_ref: bytes) -> None:
        with self._lock:
            self._poisoned.discard(subject_ref)

    # -- reads ------------------------------------------------------------------------------

    def match(self, subject_id: str, subject_ref: bytes, probe: F32) -> float:
        """The smallest exact distance from ``probe`` to the subject's templates."""
        metric = self.config.metric
        with self._lock:
            if subject_ref in self._poisoned:
                raise IntegrityError("a stored template of this subject failed its integrity check")
            rows = self._subjects.get(subject_ref)
            if rows is None:
                raise NotFound("no such subject in this gallery")
            if isinstance(rows, int):
                # Computed under the lock: a removal may move another row into this slot.
                return distance.exact_one(self._matrix[rows], probe, metric)
            candidates = self._matrix[rows]
        return float(distance.exact(candidates, probe, metric).min())

    def identify(self, probe: F32, top_k: int) -> list[Hit]:
        """At most ``top_k`` subjects within the threshold, closest first."""
        with self._lock:
            n = self._n
            if n == 0:
                return []
            matrix = self._matrix[:n]
            scores = distance.approximate(matrix, self._sq_norms[:n], probe, self.config.metric)
            return self._search(matrix, scores, probe, top_k, min(n, 2 * top_k + 8))

    def identify_many(self, probes: F32, top_k: int) -> list[list[Hit]]:
        """``identify`` for each row of ``probes``, reading the matrix once for all of them.

        One matrix-vector product per probe streams the whole matrix from memory each time; a
        matrix-matrix product over blocks of rows reads it once for the whole batch, and with
        all the probes in one product (BLAS is several times faster per probe at 64 probes than
        at 8). Blocks are sized so a block's scores (probes x rows) stay within
        ``_SCORE_BLOCK_BYTES``, and after each block every probe keeps only its best ``want``
        rows so far, so memory stays bounded however large the gallery. Those are the short
        list ``identify`` would take; a probe it does not settle (many templates per subject,
        poisoned subjects) is widened on its own, as ``identify`` widens it. Same answers as
        ``identify`` but for near-ties at the edge of the short list (the float32 scores of a
        matrix-matrix product round differently; exact float64 distances decide).

        The lock is let go between blocks, so a Match waits for one block, not the batch. Rows
        only move when a subject is removed: a batch that sees it happened starts again, and
        after ``_BATCH_RESTARTS`` such starts holds the lock from the first block to the last.
        """
        for _ in range(_BATCH_RESTARTS):
            answers = self._identify_many(probes, top_k, hold=False)
            if answers is not None:
                return answers
        with self._lock:
            answers = self._identify_many(probes, top_k, hold=True)
        assert answers is not None
        return answers

    def _identify_many(self, probes: F32, top_k: int, *, hold: bool) -> list[list[Hit]] | None:
        """One attempt at ``identify_many``: None if rows moved while the lock was let go."""
        locked = contextlib.nullcontext() if hold else self._lock
        with locked:
            n, layout = self._n, self._layout
        if n == 0:
            return [[] for _ in range(probes.shape[0])]
        metric = self.config.metric
        want = min(n, 2 * top_k + 8)
        block = max(want, _SCORE_BLOCK_BYTES // (4 * probes.shape[0]))
        best_rows = [np.empty(0, dtype=np.intp) for _ in range(probes.shape[0])]
        best_scores = [np.empty(0, dtype=np.float32) for _ in range(probes.shape[0])]
        for start in range(0, n, block):
            end = min(n, start + block)
            with locked:
                if self._layout != layout:
                    return None
                # Rows below n do not change while the layout holds (appends go above them).
                scores = distance.approximate_many(self._matrix[start:end], self._sq_norms[start:end], probes, metric)
            for i, row_scores in enumerate(scores):
                chosen = distance.shortlist(row_scores, min(want, end - start))
                rows = np.concatenate((best_rows[i], chosen + start))
                kept = np.concatenate((best_scores[i], row_scores[chosen]))
                if rows.shape[0] > want:
                    top = distance.shortlist(kept, want)
                    rows, kept = rows[top], kept[top]
                best_rows[i], best_scores[i] = rows, kept
        answers: list[list[Hit]] = []
        with locked:
            if self._layout != layout:
                return None
            matrix = self._matrix[:n]
            for i, probe in enumerate(probes):
                hits = self._rank(matrix, best_rows[i], probe, top_k, complete=want == n)
                if hits is None:  # widen, as identify does, with this probe's own scores
                    scores_one = distance.approximate(matrix, self._sq_norms[:n], probe, metric)
                    hits = self._search(matrix, scores_one, probe, top_k, min(n, want * 4))
                answers.append(hits)
        return answers

    def _search(self, matrix: F32, scores: F32, probe: F32, top_k: int, want: int) -> list[Hit]:
        """``_rank`` the ``want`` best-scored rows, widening the short list fourfold until it
        settles the answer (at worst it is every row). Called with the lock held."""
        n = matrix.shape[0]
        while True:
            hits = self._rank(matrix, distance.shortlist(scores, want), probe, top_k, complete=want == n)
            if hits is not None:
                return hits
            want = min(n, want * 4)

    def _rank(
        self, matrix: F32, rows: npt.NDArray[np.intp], probe: F32, top_k: int, complete: bool
    ) -> list[Hit] | None:
        """The ``top_k`` closest subjects within the threshold among a short list of ``rows``, or
        None if the list cannot settle that (too few distinct subjects in it, and rows within
        the threshold may lie beyond it) and must be widened. ``complete``: the list is every row.

        Called with the lock held. Exact float64 distances decide; a subject with a tampered
        row is never a candidate (its intact rows could be the attacker's copy, and the
        tampered one is already an alarm).
        """
        threshold = self.config.threshold
        exact = distance.exact(matrix[rows], probe, self.config.metric)
        found: dict[bytes, tuple[float, int]] = {}
        for row, d in zip(rows.tolist(), exact.tolist(), strict=True):
            ref = self._row_ref[row]
            if self._poisoned and ref in self._poisoned:
                continue
            if d <= threshold and d < found.get(ref, (np.inf, 0))[0]:
                found[ref] = (d, row)
        # Enough distinct subjects, or everything within the threshold was seen.
        if not (len(found) >= top_k or complete or float(exact.max()) > threshold):
            return None
        ranked = sorted((d, self._subject_id(row)) for d, row in found.values())[:top_k]
        return [Hit(sid, d) for d, sid in ranked]

    def size(self) -> tuple[int, int]:
        """(subjects, templates)."""
        with self._lock:
            return len(self._subjects), self._n

    def template_count(self, subject_id: str, subject_ref: bytes | None = None) -> int:
        """Templates of a subject: a lookup given its reference, else a scan (tests, diagnostics)."""
        with self._lock:
            if subject_ref is not None:
                rows = self._subjects.get(subject_ref)
                return 0 if rows is None else 1 if isinstance(rows, int) else len(rows)
            want = subject_id.encode()
            candidates = np.flatnonzero(self._id_len[: self._n] == len(want))
            return sum(1 for row in candidates.tolist() if self._subject_id_bytes(row) == want)

    # -- internals --------------------------------------------------------------------------

    def _subject_id_bytes(self, row: int) -> bytes:
        off = int(self._id_off[row])
        return bytes(self._ids[off : off + int(self._id_len[row])])

    def _subject_id(self, row: int) -> str:
        return self._subject_id_bytes(row).decode()

    def _append_locked(self, entries: list[tuple[str, str, bytes]], encodings: F32) -> None:
        start, count = self._n, len(entries)
        end = start + count
        if end > self._matrix.shape[0]:
            self._grow(end)
        block = self._matrix[start:end]
        block[:] = encodings
        self._sq_norms[start:end] = np.einsum("ij,ij->i", block, block)
        keys = [_template_key(template_id) for _, template_id, _ in entries]
        self._keys[start:end] = np.frombuffer(b"".join(keys), dtype=_KEY)
        ids = [subject_id.encode() for subject_id, _, _ in entries]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=count)
        self._id_len[start:end] = lengths
        self._id_off[start:end] = len(self._ids) + np.cumsum(lengths) - lengths
        self._ids += b"".join(ids)
        subjects, row_ref = self._subjects, self._row_ref
        for row, (_, _, ref) in enumerate(entries, start):
            rows = subjects.get(ref)
            if rows is None:
                subjects[ref] = row
            elif isinstance(rows, int):
                subjects[ref] = [rows, row]
            else:
                rows.append(row)
            row_ref.append(ref)
        self._n = end
        if self._stale:
            return
        if count > _INDEX_BULK:
            self._mark_stale()
            return
        for key in keys:
            if key in self._removed:
                self._removed.discard(key)  # still in the sorted snapshot
            else:
                self._added.add(key)
        self._check_index()

    def _grow(self, needed: int) -> None:
        n = self._n
        capacity = max(needed, self._matrix.shape[0] * 3 // 2, 1024)
        matrix = np.zeros((capacity, self.config.dimension), dtype=np.float32)
        matrix[:n] = self._matrix[:n]
        self._matrix = matrix
        for name in ("_sq_norms", "_keys", "_id_off", "_id_len"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[:n] = old[:n]
            setattr(self, name, new)

    def _mark_stale(self) -> None:
        self._stale = True
        self._added.clear()
        self._removed.clear()

    def _check_index(self) -> None:
        # Past this many pending changes a fresh sort is cheaper than the sets' memory.
        if len(self._added) + len(self._removed) > max(1024, self._n >> 4):
            self._mark_stale()

    def _remove_locked(self, subject_ref: bytes) -> None:
        # Remove rows from the highest index down, moving the last row into each hole so the
        # matrix stays dense; the moved row's subject has its entry updated. The moved row is
        # never one of the removed subject's: those above ``row`` were removed already.
        rows = self._subjects.pop(subject_ref, None)
        if rows is None:
            return
        self._layout += 1
        for row in sorted([rows] if isinstance(rows, int) else rows, reverse=True):
            last = self._n - 1
            if not self._stale:
                key = self._keys[row : row + 1].tobytes()
                if key in self._added:
                    self._added.discard(key)
                else:
                    self._removed.add(key)
            self._id_garbage += int(self._id_len[row])
            if row != last:
                self._matrix[row] = self._matrix[last]
                self._sq_norms[row] = self._sq_norms[last]
                self._keys[row] = self._keys[last]
                self._id_off[row] = self._id_off[last]
                self._id_len[row] = self._id_len[last]
                moved = self._row_ref[last]
                self._row_ref[row] = moved
                entry = self._subjects[moved]
                if isinstance(entry, int):
                    self._subjects[moved] = row
                else:
                    entry[entry.index(last)] = row
            self._matrix[last] = 0.0
            self._row_ref.pop()
            self._n -= 1
        if not self._stale:
            self._check_index()
        if self._id_garbage > max(1 << 16, len(self._ids) // 2):
            self._compact_ids()

    def _compact_ids(self) -> None:
        n = self._n
        offsets, lengths = self._id_off[:n].tolist(), self._id_len[:n].tolist()
        ids = self._ids
        self._ids = bytearray(b"".join([ids[o : o + k] for o, k in zip(offsets, lengths, strict=True)]))
        self._id_off[:n] = np.cumsum(self._id_len[:n]) - self._id_len[:n]
        self._id_garbage = 0
