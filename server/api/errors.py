"""The one table that turns domain errors into gRPC status codes (DESIGN.md's error model).

Every servicer and interceptor ends a failed call through ``abort``; nothing else picks codes.
A ResourceExhausted carries its retry delay as a google.rpc.RetryInfo detail, the way Google's
error model (AIP-193) lets clients back off without parsing a message.
"""

from __future__ import annotations

import logging
import math
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from faceseal.server import errors
from faceseal.server.store.base import StoreError

log = logging.getLogger("faceseal.api")

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
)


def code_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with ``exc``'s code. Unexpected exceptions become a bare INTERNAL.

    An unexpected exception's text could hold anything, so it is neither sent nor logged; only
    its type name is, which is enough to find the bug without leaking request data.
    """
    code = code_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error", extra={"exception_type": type(exc).__name__})
        message = "internal error"
    elif isinstance(exc, StoreError):
        message = "the store is unavailable; retry later"
    else:
        message = str(exc)
    status = status_pb2.Status(code=_rpc_code(code), message=message)
    if isinstance(exc, errors.ResourceExhausted):
        seconds = max(0.0, exc.retry_after)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
        message = f"{message} (retry after {math.ceil(seconds)} s)"
        status.message = message
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _rpc_code(code: grpc.StatusCode) -> int:
    value: int = code_pb2.Code.Value(code.name)
    return value
