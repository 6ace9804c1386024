"""Python client for faceseald: ``FaceSealClient``, ``AdminClient``, typed errors, encoding loading.

::

    from faceseal.client import AdminClient, FaceSealClient, load_encoding

    with FaceSealClient.from_profile("gateway") as client:
        result = client.match("alice", load_encoding("probe.npy"))

    with AdminClient.from_profile("admin") as admin:
        print(admin.status().active_version)

    with FaceSealClient.from_profile("enroller") as client:  # one BulkEnroll stream per call
        refused = [r for r in client.bulk_enroll(zip(ids, encodings)) if not r.ok]

``faceseal import FILE`` (cli.py, _import.py) sends a whole file that way, in resumable batches.
"""

from faceseal.client._admin import AdminClient, GalleryStatus, KeyVersion, RewrapProgress, Status
from faceseal.client._client import BulkResult, Candidate, EnrollResult, FaceSealClient, MatchResult
from faceseal.client._encodings import EncodingLike, load_encoding
from faceseal.client._errors import (
    DataLossError,
    DeadlineExceededError,
    FaceSealClientError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)

__all__ = [
    "AdminClient",
    "BulkResult",
    "Candidate",
    "DataLossError",
    "DeadlineExceededError",
    "EncodingLike",
    "EnrollResult",
    "FaceSealClient",
    "FaceSealClientError",
    "FailedPreconditionError",
    "GalleryStatus",
    "InvalidArgumentError",
    "KeyVersion",
    "MatchResult",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RewrapProgress",
    "Status",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "load_encoding",
]
