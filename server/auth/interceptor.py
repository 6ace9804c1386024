"""Authentication at the edge: every call is tied to a policy Caller before its handler runs.

grpc's Python interceptors see only the method name, not the peer, so (as in grpc's own auth
examples) the interceptor wraps the handler: the wrapper reads the verified peer certificate
from the call's auth context, resolves it against the current policy, and refuses with
UNAUTHENTICATED (unknown identity) or PERMISSION_DENIED (no such permission anywhere) before
the servicer is entered. Per-gallery checks happen in the core, which knows the gallery.

The wrapper also guarantees one audit record per call: the core records what it decided or
changed (before committing it); a call that fails without such a record (refused here, invalid,
not found, ...) is recorded here, with the status code it ended with.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from faceseal.server.api.errors import abort
from faceseal.server.auth.identity import identity_from_pem
from faceseal.server.auth.policy import Caller, Permission, Policy
from faceseal.server.errors import PermissionDenied, Unauthenticated
from faceseal.server.metrics import Metrics
from faceseal.server.request import RequestInfo, bind, current, unbind

log = logging.getLogger("faceseal.auth")

# Methods any peer holding a certificate from our CA may call, without a policy entry:
# load balancers and grpcurl need health and reflection before they know anything else.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# Called with (request, final status code) for a call that ended without an audit record.
FailureAudit = Callable[[Any, grpc.StatusCode], None]

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # the stubs make it generic; the runtime class is not subscriptable
    _Interceptor = grpc.ServerInterceptor


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


def caller() -> Caller:
    """The authenticated caller of the call being handled on this thread."""
    info = current()
    if info is None or info.caller is None:
        raise RuntimeError("called outside an authenticated call")
    return info.caller


class AuthInterceptor(_Interceptor):
    """Maps each method to the permission it needs and refuses callers that lack it."""

    def __init__(
        self,
        policies: PolicyHolder,
        permissions: dict[str, Permission],
        metrics: Metrics,
        audit_failure: FailureAudit,
    ) -> None:
        self._metrics = metrics
        self._policies = policies
        self._permissions = permissions
        self._audit_failure = audit_failure

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
        return self._wrap(handler, method, permission)

    def _authenticate(self, context: grpc.ServicerContext, info: RequestInfo, permission: Permission | None) -> None:
        raw: bytes | list[bytes] = context.auth_context().get("x509_pem_cert") or []
        pems = [raw] if isinstance(raw, bytes) else list(raw)
        identity = identity_from_pem(pems[0]) if pems else None
        info.identity = identity or ""
        found = self._policies.policy.resolve(identity) if identity else None
        if found is None:
            log.warning("unknown caller refused", extra={"reason": "unknown_identity", "method": info.method})
            self._metrics.auth_denied.labels("unknown_identity").inc()
            abort(context, Unauthenticated("this certificate names no caller in the policy"))
        if permission is None or not found.may(permission):
            # A method nobody mapped to a permission is refused rather than guessed at.
            self._metrics.auth_denied.labels("no_permission").inc()
            abort(context, PermissionDenied(f"this caller lacks the '{permission}' permission"))
        info.caller = found

    def _failed(self, request: Any, context: grpc.ServicerContext, info: RequestInfo) -> None:
        if info.audited:
            return
        code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
        try:
            self._audit_failure(request, code or grpc.StatusCode.UNKNOWN)
        except Exception:  # the call has failed already; the audit log's own error is logged there
            log.error("could not audit a failed call", extra={"method": info.method})

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, permission: Permission | None
    ) -> grpc.RpcMethodHandler[Any, Any]:
        def start(context: grpc.ServicerContext) -> tuple[RequestInfo, Any]:
            info = RequestInfo(None, "", method, uuid.uuid4().hex)
            context.set_trailing_metadata((("x-request-id", info.request_id),))
            return info, bind(info)

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                info, token = start(context)
                try:
                    self._authenticate(context, info, permission)
                    return inner(request, context)
                except BaseException:
                    self._failed(request, context, info)
                    raise
                finally:
                    unbind(token)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                info, token = start(context)
                try:
                    self._authenticate(context, info, permission)
                    yield from inner_stream(request, context)
                except BaseException:
                    self._failed(request, context, info)
                    raise
                finally:
                    unbind(token)

            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        # No client-streaming methods exist yet; refuse rather than run one unauthenticated.
        raise NotImplementedError(f"streaming requests are not wired for authentication: {method}")
