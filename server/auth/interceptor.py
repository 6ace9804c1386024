"""Authentication at the edge: every call is tied to a policy Caller before its handler runs.

grpc's Python interceptors see only the method name, not the peer, so (as in grpc's own auth
examples) the interceptor wraps the handler: the wrapper reads the verified peer certificate
from the call's auth context, resolves it against the current policy, and refuses with
UNAUTHENTICATED (unknown identity) or PERMISSION_DENIED (no such permission anywhere) before
the servicer is entered. Per-gallery checks happen in the core, which knows the gallery.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from faceseal.server.api.errors import abort
from faceseal.server.auth.identity import identity_from_pem
from faceseal.server.auth.policy import Caller, Permission, Policy
from faceseal.server.errors import PermissionDenied, Unauthenticated
from faceseal.server.metrics import Metrics

log = logging.getLogger("faceseal.auth")

# Methods any peer holding a certificate from our CA may call, without a policy entry:
# load balancers and grpcurl need health and reflection before they know anything else.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Who is calling, for the duration of one call."""

    caller: Caller
    method: str
    request_id: str


_current: contextvars.ContextVar[RequestInfo] = contextvars.ContextVar("faceseal_request")


def current() -> RequestInfo:
    """The authenticated caller of the call being handled on this thread."""
    return _current.get()


class PolicyHolder:
    """The policy in force; replaced whole on SIGHUP so a call sees one policy or the other."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._lock = threading.Lock()

    @property
    def policy(self) -> Policy:
        return self._policy

    def replace(self, policy: Policy) -> None:
        with self._lock:
            self._policy = policy


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # the stubs make it generic; the runtime class is not subscriptable
    _Interceptor = grpc.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Maps each method to the permission it needs and refuses callers that lack it."""

    def __init__(self, policies: PolicyHolder, permissions: dict[str, Permission], metrics: Metrics) -> None:
        self._metrics = metrics
        self._policies = policies
        self._permissions = permissions

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        permission = self._permissions.get(method)
        if permission is None:
            # A method the servicers implement but nobody mapped: refuse rather than guess.
            return _wrap(
                handler, method, lambda ctx: self._refuse(ctx, PermissionDenied("method not permitted"))
            )
        return _wrap(handler, method, lambda ctx: self._authenticate(ctx, permission))

    def _refuse(self, context: grpc.ServicerContext, exc: Exception) -> Caller:
        abort(context, exc)

    def _authenticate(self, context: grpc.ServicerContext, permission: Permission) -> Caller:
        raw: bytes | list[bytes] = context.auth_context().get("x509_pem_cert") or []
        pems = [raw] if isinstance(raw, bytes) else list(raw)
        identity = identity_from_pem(pems[0]) if pems else None
        caller = self._policies.policy.resolve(identity) if identity else None
        if caller is None:
            log.warning("unknown caller refused", extra={"reason": "unknown_identity"})
            self._metrics.auth_denied.labels("unknown_identity").inc()
            abort(context, Unauthenticated("this certificate names no caller in the policy"))
        if not caller.may(permission):
            self._metrics.auth_denied.labels("no_permission").inc()
            abort(context, PermissionDenied(f"this caller lacks the '{permission}' permission"))
        return caller


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, check: Callable[[grpc.ServicerContext], Caller]
) -> grpc.RpcMethodHandler[Any, Any]:
    def guard(behaviour: Any) -> Callable[[Any, grpc.ServicerContext], Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            caller = check(context)
            request_id = uuid.uuid4().hex
            context.set_trailing_metadata((("x-request-id", request_id),))
            token = _current.set(RequestInfo(caller, method, request_id))
            try:
                return behaviour(request, context)
            finally:
                _current.reset(token)

        return run

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream), **kwargs)
