"""Request validation: every check runs before anything is stored or compared. Pure.

Messages describe the rule that was broken, never the value: an error must not echo a probe,
an encoding or a subject id back into a log or a client's exception.
"""

from __future__ import annotations

import math
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
# Values below this cannot exceed float32's range (about 3.4e38), so their cast needs no guard
# against numpy's overflow warning (the guard, ``np.errstate``, costs more than the check). NaN
# compares false and takes the guarded path.
_FLOAT32_SAFE = 3e38


def subject_id(value: str) -> str:
    if not SUBJECT_ID.fullmatch(value):
        raise InvalidArgument("subject_id must be 1-128 characters of [A-Za-z0-9._:@-]")
    return value


def idempotency_key(value: str) -> str:
    if not SUBJECT_ID.fullmatch(value):
        raise InvalidArgument("idempotency_key must be 1-128 characters of [A-Za-z0-9._:@-], or empty for none")
    return value


def gallery_name(value: str) -> str:
    if not GALLERY_NAME.fullmatch(value):
        raise InvalidArgument("gallery must be 1-64 characters of [A-Za-z0-9._-], or empty for the default")
    return value


def vector(values: Sequence[float], dimension: int, field: str) -> npt.NDArray[np.float32]:
    """A finite, non-zero float32 vector of the gallery's dimension.

    This runs on every Match, so the checks share one float64 dot product of the float32 values
    (the squared length ``s``) instead of a numpy call each: ``s`` is NaN or infinite exactly when
    some value is, zero exactly when all are (a float32's smallest square is still a float64
    above zero), and ``sqrt(s)`` is the length ``np.linalg.norm`` computes the same way.
    """
    if len(values) != dimension:
        raise InvalidArgument(f"{field} must have exactly {dimension} values for this gallery, got {len(values)}")
    wide = np.array(values, dtype=np.float64)
    if float(np.abs(wide).max()) < _FLOAT32_SAFE:
        arr = wide.astype(np.float32)
    else:
        # A float64 beyond float32's range becomes infinity here and is refused just below; numpy's
        # overflow warning would only add noise (or an exception where warnings are errors).
        with np.errstate(over="ignore", invalid="ignore"):
            arr = wide.astype(np.float32)
    exact = arr.astype(np.float64)
    squared = float(exact @ exact)
    if not math.isfinite(squared):
        raise InvalidArgument(f"{field} must contain only finite numbers (no NaN or infinity)")
    if squared == 0.0:
        raise InvalidArgument(f"{field} must not be all zeros")
    if not MIN_NORM <= math.sqrt(squared) <= MAX_NORM:
        raise InvalidArgument(f"{field} must have a length (L2 norm) between {MIN_NORM:g} and {MAX_NORM:g}")
    return arr


def top_k(value: int, maximum: int) -> int:
    if not 1 <= value <= maximum:
        raise InvalidArgument(f"top_k must be between 1 and {maximum}")
    return value
