"""Reading face encodings from files, and shaping them for the wire.

Encoding files come from whatever produced the embedding (a notebook, a capture service), so
only inert formats are read: ``.npy`` without pickle and ``.json``. Error messages name the file
and the problem but never print the values: an encoding is biometric data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

EncodingLike: TypeAlias = npt.NDArray[np.floating[Any]] | Sequence[float]
"""What the client accepts as an encoding or probe: a 1-D numpy array or a sequence of floats."""


def load_encoding(path: Path | str) -> npt.NDArray[np.float32]:
    """Read one encoding as float32, the precision it travels in, so what you see is what is sent."""
    values = load_encodings(path)
    if values.shape[0] != 1:
        raise ValueError(f"{path}: expected one encoding (a 1-D array), got shape {values.shape}")
    one: npt.NDArray[np.float32] = values[0]
    return one


def load_encodings(path: Path | str) -> npt.NDArray[np.float32]:
    """Read one encoding (a 1-D array) or several (one per row of a 2-D array) as an N x dim
    float32 matrix: several probes for one IdentifyBatch."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        values = _read_npy(path)
    elif suffix == ".json":
        values = _read_json(path)
    else:
        raise ValueError(f"{path}: unsupported encoding file type {suffix or '(none)'!r}; use .npy or .json")
    if values.ndim == 1:
        values = values[np.newaxis, :]
    if values.ndim != 2:
        raise ValueError(f"{path}: expected encodings as a 1-D or 2-D array, got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"{path}: the encoding is empty")
    return values.astype(np.float32)


def _read_npy(path: Path) -> npt.NDArray[Any]:
    try:
        # allow_pickle=False: a .npy file with an object array could run code when unpickled.
        loaded: object = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a plain numeric .npy file (pickled data is refused)") from exc
    except EOFError as exc:
        raise ValueError(f"{path}: empty or truncated .npy file") from exc
    if not isinstance(loaded, np.ndarray):  # np.load returns an archive for .npz content
        raise ValueError(f"{path}: expected a single array, not an .npz archive")
    if loaded.dtype.kind not in "fiu":
        raise ValueError(f"{path}: expected a numeric array, got dtype {loaded.dtype}")
    return loaded


def _read_json(path: Path) -> npt.NDArray[Any]:
    try:
        document: object = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON") from exc
    if isinstance(document, dict) and "encoding" in document:
        document = document["encoding"]
    if not isinstance(document, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in document
    ):
        raise ValueError(f'{path}: expected a JSON list of numbers or an object {{"encoding": [...]}}')
    return np.asarray(document, dtype=np.float64)


def as_floats(encoding: EncodingLike) -> list[float]:
    """Check the shape here, so a 2-D array fails with a plain message instead of a protobuf TypeError."""
    values = np.asarray(encoding, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"an encoding must be 1-D, got shape {values.shape}")
    floats: list[float] = values.tolist()  # Python floats, as the loop ``[float(x) ...]`` would give
    return floats
