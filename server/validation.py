"""Request validation: every check runs before anything is stored or compared. Pure.

Messages describe the rule that was broken, never the value: an error must not echo a probe,
an encoding or a subject id back into a log or a client's exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from faceseal.server.config import GALLERY_NAME
from faceseal.server.errors import InvalidArgument

SUBJECT_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}", re.ASCII)

# The length (L2 norm) a vector may have. No face model comes near either end, and beyond them the
# gallery's float32 pre-ranking over- or underflows (squares past 3.4e38, squared lengths below the
# smallest normal float32), so Identify would silently rank such a template or probe last.
MIN_NORM = 1e-10
MAX_NORM = 1e10


def subject_id(value: str) -> str:
    if not SUBJECT_ID.fullmatch(value):
        raise InvalidArgument("subject_id must be 1-128 characters of [A-Za-z0-9._:@-]")
    return value


def gallery_name(value: str) -> str:
    if not GALLERY_NAME.fullmatch(value):
        raise InvalidArgument("gallery must be 1-64 characters of [A-Za-z0-9._-], or empty for the default")
    return value


def vector(values: Sequence[float], dimension: int, field: str) -> npt.NDArray[np.float32]:
    """A finite, non-zero float32 vector of the gallery's dimension."""
    if len(values) != dimension:
        raise InvalidArgument(f"{field} must have exactly {dimension} values for this gallery, got {len(values)}")
    # A float64 beyond float32's range becomes infinity here and is refused just below; numpy's
    # overflow warning would only add noise (or an exception where warnings are errors).
    with np.errstate(over="ignore"):
        arr = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{field} must contain only finite numbers (no NaN or infinity)")
    if not np.any(arr):
        raise InvalidArgument(f"{field} must not be all zeros")
    if not MIN_NORM <= float(np.linalg.norm(arr.astype(np.float64))) <= MAX_NORM:
        raise InvalidArgument(f"{field} must have a length (L2 norm) between {MIN_NORM:g} and {MAX_NORM:g}")
    return arr


def top_k(value: int, maximum: int) -> int:
    if not 1 <= value <= maximum:
        raise InvalidArgument(f"top_k must be between 1 and {maximum}")
    return value
