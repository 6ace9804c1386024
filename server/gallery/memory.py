"""One gallery's opened templates, held in memory as one contiguous float32 matrix.

Match and Identify read only here; the store is written first and this copy is updated only
after the store has committed, so a reader never sees a template that a crash could lose.
Rows that failed to open at unseal are remembered by their subject reference ("poisoned"):
Match on such a subject answers DATA_LOSS, never a match, until the subject is re-enrolled
with replace or deleted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from faceseal.server.config import GalleryConfig
from faceseal.server.errors import IntegrityError, NotFound
from faceseal.server.matching import distance
from faceseal.server.matching.distance import F32


@dataclass(frozen=True, slots=True)
class Hit:
    """A subject and its smallest exact distance to the probe."""

    subject_id: str
    distance: float


class Gallery:
    """Templates of one gallery, grouped by subject."""

    def __init__(self, config: GalleryConfig, capacity: int = 1024) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._matrix: F32 = np.zeros((capacity, config.dimension), dtype=np.float32)
        self._sq_norms: F32 = np.zeros(capacity, dtype=np.float32)
        self._n = 0
        self._row_subject: list[str] = []
        self._row_template: list[str] = []
        self._rows: dict[str, list[int]] = {}
        self._refs: dict[str, bytes] = {}
        self._by_ref: dict[bytes, str] = {}
        self._templates: set[str] = set()
        self._poisoned: set[bytes] = set()

    # -- writes (after the store committed) -------------------------------------------------

    def add(
        self, subject_id: str, template_id: str, encoding: F32, *, subject_ref: bytes, replace: bool = False
    ) -> None:
        with self._lock:
            if replace:
                self._remove_locked(subject_id)
            self._append_locked([(subject_id, template_id, subject_ref)], encoding[np.newaxis, :])

    def add_many(self, entries: list[tuple[str, str, bytes]], encodings: F32) -> None:
        """Append many (subject_id, template_id, subject_ref) rows at once: one growth, one copy
        and one norm computation for the whole batch (opening a gallery at unseal)."""
        with self._lock:
            self._append_locked(entries, encodings)

    def _append_locked(self, entries: list[tuple[str, str, bytes]], encodings: F32) -> None:
        start, count = self._n, len(entries)
        while start + count > self._matrix.shape[0]:
            self._grow()
        block = self._matrix[start : start + count]
        block[:] = encodings
        self._sq_norms[start : start + count] = np.einsum("ij,ij->i", block, block)
        for offset, (subject_id, template_id, subject_ref) in enumerate(entries):
            self._row_subject.append(subject_id)
            self._row_template.append(template_id)
            self._rows.setdefault(subject_id, []).append(start + offset)
            self._refs[subject_id] = subject_ref
            self._by_ref[subject_ref] = subject_id
            self._templates.add(template_id)
        self._n += count

    def has_template(self, template_id: str) -> bool:
        with self._lock:
            return template_id in self._templates

    def remove_ref(self, subject_ref: bytes) -> None:
        """Remove a subject known only by its reference (a replica applying another's Delete)."""
        with self._lock:
            subject_id = self._by_ref.get(subject_ref)
            if subject_id is not None:
                self._remove_locked(subject_id)
            self._poisoned.discard(subject_ref)

    def remove(self, subject_id: str, subject_ref: bytes) -> None:
        with self._lock:
            self._remove_locked(subject_id)
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
        with self._lock:
            if subject_ref in self._poisoned:
                raise IntegrityError("a stored template of this subject failed its integrity check")
            rows = self._rows.get(subject_id)
            if not rows:
                raise NotFound("no such subject in this gallery")
            candidates = self._matrix[rows]
        return float(distance.exact(candidates, probe, self.config.metric).min())

    def identify(self, probe: F32, top_k: int) -> list[Hit]:
        """At most ``top_k`` subjects within the threshold, closest first."""
        threshold = self.config.threshold
        with self._lock:
            n = self._n
            if n == 0:
                return []
            matrix = self._matrix[:n]
            scores = distance.approximate(matrix, self._sq_norms[:n], probe, self.config.metric)
            want = min(n, 2 * top_k + 8)
            while True:
                rows = distance.shortlist(scores, want)
                exact = distance.exact(matrix[rows], probe, self.config.metric)
                best: dict[str, float] = {}
                for row, d in zip(rows.tolist(), exact.tolist(), strict=True):
                    sid = self._row_subject[row]
                    # A subject with a tampered row is never a candidate: its intact rows could
                    # be the attacker's copy, and the tampered one is already an alarm.
                    if self._poisoned and self._refs[sid] in self._poisoned:
                        continue
                    if d <= threshold and d < best.get(sid, np.inf):
                        best[sid] = d
                # Enough distinct subjects, or everything within the threshold was seen.
                if len(best) >= top_k or want == n or float(exact.max()) > threshold:
                    break
                want = min(n, want * 4)
        ranked = sorted(best.items(), key=lambda item: (item[1], item[0]))[:top_k]
        return [Hit(sid, d) for sid, d in ranked]

    def size(self) -> tuple[int, int]:
        """(subjects, templates)."""
        with self._lock:
            return len(self._rows), self._n

    def template_count(self, subject_id: str) -> int:
        with self._lock:
            return len(self._rows.get(subject_id, ()))

    # -- internals --------------------------------------------------------------------------

    def _grow(self) -> None:
        capacity = max(1024, self._matrix.shape[0] * 2)
        matrix = np.zeros((capacity, self.config.dimension), dtype=np.float32)
        matrix[: self._n] = self._matrix[: self._n]
        norms = np.zeros(capacity, dtype=np.float32)
        norms[: self._n] = self._sq_norms[: self._n]
        self._matrix, self._sq_norms = matrix, norms

    def _remove_locked(self, subject_id: str) -> None:
        # Remove rows from the highest index down, moving the last row into each hole so the
        # matrix stays dense; the moved row's subject has its index list updated.
        ref = self._refs.pop(subject_id, None)
        if ref is not None:
            self._by_ref.pop(ref, None)
        for row in sorted(self._rows.pop(subject_id, ()), reverse=True):
            last = self._n - 1
            self._templates.discard(self._row_template[row])
            if row != last:
                moved = self._row_subject[last]
                self._matrix[row] = self._matrix[last]
                self._sq_norms[row] = self._sq_norms[last]
                self._row_subject[row] = moved
                self._row_template[row] = self._row_template[last]
                self._rows[moved] = [row if r == last else r for r in self._rows[moved]]
            self._matrix[last] = 0.0
            self._row_subject.pop()
            self._row_template.pop()
            self._n -= 1
