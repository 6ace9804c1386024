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
    dots = matrix @ probe
    if metric == "euclidean":
        return np.asarray(sq_norms - 2.0 * dots, dtype=np.float32)
    return np.asarray(-dots / np.sqrt(sq_norms), dtype=np.float32)


def shortlist(scores: F32, k: int) -> npt.NDArray[np.intp]:
    """Indices of the ``k`` smallest scores, unordered (argpartition: O(n), not a full sort)."""
    n = scores.shape[0]
    if k >= n:
        return np.arange(n)
    return np.argpartition(scores, k)[:k]
