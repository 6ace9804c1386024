"""Typed exceptions for the client, one per status code a caller is expected to handle.

::

    FaceSealClientError            base: .code (grpc.StatusCode), .message (the server's details)
    ├── InvalidArgumentError       bad vector, subject id, gallery or top_k; fix the request
    ├── UnauthenticatedError       the certificate maps to no caller in the daemon's policy
    ├── PermissionDeniedError      the caller may not call this method on this gallery
    ├── NotFoundError              unknown subject or gallery (or key version)
    ├── FailedPreconditionError    refused in the daemon's current state (retiring a key in use)
    ├── ResourceExhaustedError     locked out or over a budget; .retry_after in seconds, or None
    ├── DataLossError              a stored template failed to open; an alarm, never a match
    ├── UnavailableError           sealed, shutting down or unreachable; retrying later may work
    └── DeadlineExceededError      no answer within the deadline

Any other code (UNKNOWN, INTERNAL, UNIMPLEMENTED, ...) is raised as the base class, so
``except FaceSealClientError`` is always enough to catch everything an RPC can fail with.
"""

from __future__ import annotations

from typing import cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class FaceSealClientError(Exception):
    """Base of every error an RPC raises; callers switch on the subclass, scripts on ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(FaceSealClientError):
    """Retrying the same request cannot help; nothing was stored or compared."""


class UnauthenticatedError(FaceSealClientError):
    """TLS succeeded but the daemon's policy does not know this certificate's identity."""


class PermissionDeniedError(FaceSealClientError):
    """The caller is known but its role does not grant this method or gallery."""


class NotFoundError(FaceSealClientError):
    """The subject, gallery or key version does not exist."""


class FailedPreconditionError(FaceSealClientError):
    """The request is valid but the daemon's state forbids it now (e.g. a key version in use)."""


class ResourceExhaustedError(FaceSealClientError):
    """The daemon asks the caller to back off, usually for ``retry_after`` seconds."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after


class DataLossError(FaceSealClientError):
    """Distinct from other failures because it means tampering or a retired key: page someone."""


class UnavailableError(FaceSealClientError):
    """Transient by nature, so the one error worth an automatic retry with backoff."""


class DeadlineExceededError(FaceSealClientError):
    """The call may still have taken effect on the server (e.g. an enrollment)."""


_BY_CODE: dict[grpc.StatusCode, type[FaceSealClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(err: grpc.RpcError) -> FaceSealClientError:
    """Translate a raw gRPC failure so callers never have to import grpc to handle one."""
    code = err.code()
    message = err.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(code, message, retry_after=_retry_after(err))
    return _BY_CODE.get(code, FaceSealClientError)(code, message)


def _retry_after(err: grpc.RpcError) -> float | None:
    """Read google.rpc.RetryInfo from the rich status; a malformed one is ignored, not fatal."""
    try:
        # A failed sync call is both an RpcError and a Call; the stubs only know the former.
        status = rpc_status.from_call(cast(grpc.Call, err))
    except (ValueError, DecodeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            if info.HasField("retry_delay"):
                return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None
