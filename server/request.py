"""Who is calling, for the duration of one call: set at the edge, read by the core and the audit.

A context variable rather than a parameter threaded through every layer: the servicers keep
their fixed gRPC signatures, and the audit log records the caller of the call being handled
without the core passing identities around.
"""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass, field

from faceseal.server.auth.policy import Caller


@dataclass(slots=True)
class RequestInfo:
    """The authenticated caller, the method, a request id, and whether the call was audited."""

    caller: Caller | None
    identity: str
    method: str
    request_id: str
    audited: bool = field(default=False)


_current: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("faceseal_request", default=None)


def new_request_id() -> str:
    """32 hex digits from the OS's CSPRNG: unique for correlation, and unlike a counter it tells a
    caller nothing about other callers' traffic. A quarter of uuid4's cost, which builds a UUID
    object around the same 16 random bytes."""
    return os.urandom(16).hex()


def current() -> RequestInfo | None:
    return _current.get()


def bind(info: RequestInfo) -> contextvars.Token[RequestInfo | None]:
    return _current.set(info)


def unbind(token: contextvars.Token[RequestInfo | None]) -> None:
    _current.reset(token)
