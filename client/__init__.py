"""Python client for faceseald: ``FaceSealClient``, its typed errors, and encoding-file loading.

::

    from faceseal.client import FaceSealClient, load_encoding

    with FaceSealClient.from_profile("gateway") as client:
        result = client.match("alice", load_encoding("probe.npy"))
"""

from faceseal.client._client import Candidate, EnrollResult, FaceSealClient, MatchResult
from faceseal.client._encodings import EncodingLike, load_encoding
from faceseal.client._errors import (
    DataLossError,
    DeadlineExceededError,
    FaceSealClientError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)

__all__ = [
    "Candidate",
    "DataLossError",
    "DeadlineExceededError",
    "EncodingLike",
    "EnrollResult",
    "FaceSealClient",
    "FaceSealClientError",
    "InvalidArgumentError",
    "MatchResult",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "load_encoding",
]
