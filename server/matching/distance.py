"""Distances and top-k selection: pure numpy, no I/O, no state.

Final decisions are made on float64 distances computed directly (``||a - b||`` or
``1 - cos``), so Match, Identify and a reader re-checking with numpy agree to the last bit on
which side of the threshold a pair falls. Identify narrows a large gallery with one float32
matrix product first, then re-scores only the short list exactly.
"""

from __future__ import annotations

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
