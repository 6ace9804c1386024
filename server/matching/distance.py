"""Distances and top-k selection: pure numpy, no I/O, no state.

Final decisions are made on float64 distances computed directly (``||a - b||`` or
``1 - cos``), so Match, Identify and a reader re-checking with numpy agree to the last bit on
which side of the threshold a pair falls. Identify narrows a large gallery with one float32
matrix product first, then re-scores only the short list exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt

Metric = Literal["euclidean", "cosine"]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def exact(rows: F32, probe: F32, metric: Metric) -> F64:
    """Exact float64 distance from ``probe`` to every row."""
    a = rows.astype(np.float64, copy=False)
    p = probe.astype(np.float64, copy=False)
    if metric == "euclidean":
        return np.asarray(np.linalg.norm(a - p, axis=1), dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(p)
    return np.asarray(1.0 - (a @ p) / norms, dtype=np.float64)


def exact_one(row: F32, probe: F32, metric: Metric) -> float:
    """``exact`` for a single row (Match on a one-template subject), without its per-call costs.

    Bit for bit the same value as ``exact``: the same float64 differences, the same pairwise sum
    of squares (``np.add.reduce`` over one contiguous row, as ``linalg.norm(axis=1)`` does), and
    a correctly rounded square root either way. A dot product would be faster still but rounds
    differently, and Match and Identify must agree on which side of the threshold a pair falls.
    """
    if metric != "euclidean":
        return float(exact(row[np.newaxis, :], probe, metric)[0])
    d = np.subtract(row, probe, dtype=np.float64)
    np.multiply(d, d, out=d)
    return math.sqrt(float(np.add.reduce(d)))


def approximate(matrix: F32, sq_norms: F32, probe: F32, metric: Metric) -> F32:
    """A fast float32 score per row, monotone in the exact distance (smaller is closer).

    Euclidean: ``||r||^2 - 2 r.p`` (``||p||^2`` is the same for every row). Cosine: ``-r.p /
    ||r||`` with ``sq_norms`` holding ``||r||^2``. One matrix-vector product either way.
    """
    dots: F32 = matrix @ probe
    # In place: the product is a fresh array, and two more passes over a million-row temporary
    # would cost a tenth of the product itself.
    if metric == "euclidean":
        dots *= np.float32(-2.0)
        dots += sq_norms
    else:
        dots /= np.sqrt(sq_norms)
        np.negative(dots, out=dots)
    return dots


def approximate_many(matrix: F32, sq_norms: F32, probes: F32, metric: Metric) -> F32:
    """``approximate`` for each row of ``probes`` at once: row i of the result scores probe i.

    One matrix-matrix product, so the matrix is read from memory once for the whole group.
    """
    if metric == "euclidean":
        # -2 folded into the (few) probes instead of a pass over the (many) scores: scaling by a
        # power of two is exact, so the scores are the same to the bit.
        scores: F32 = np.multiply(probes, -2.0, dtype=np.float32) @ matrix.T
        scores += sq_norms
    else:
        scores = probes @ matrix.T
        scores /= np.sqrt(sq_norms)
        np.negative(scores, out=scores)
    return scores


_SAMPLE = 8192  # scores sampled to pick a cut-off before selecting from a large gallery


def shortlist(scores: F32, k: int) -> npt.NDArray[np.intp]:
    """Indices of the ``k`` smallest scores, unordered.

    ``argpartition`` over a million scores costs about as much as a sixth of the matrix product
    that made them. For a large gallery a cut-off is read off an even sample of the scores first
    (at the rank where about 4k of all scores would fall below it), one vectorised comparison
    keeps the scores at or below it, and only those are partitioned. Exact: whenever at least
    ``k`` scores pass the cut-off, the ``k`` smallest of all are among them; otherwise (a skewed
    sample) it falls back to partitioning everything.
    """
    n = scores.shape[0]
    if k >= n:
        return np.arange(n)
    if n >= 8 * _SAMPLE:
        sample = scores[:: n // _SAMPLE]
        rank = min(sample.shape[0] - 1, 4 * k * sample.shape[0] // n + 16)
        cutoff = np.partition(sample, rank)[rank]
        candidates = np.flatnonzero(scores <= cutoff)
        if candidates.shape[0] > k:
            return candidates[np.argpartition(scores[candidates], k)[:k]]
        if candidates.shape[0] == k:
            return candidates
    return np.argpartition(scores, k)[:k]
