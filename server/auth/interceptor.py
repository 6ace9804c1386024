"""Authentication at the edge: every call is tied to a policy Caller before its handler runs.

grpc's Python interceptors see only the method name, not the peer, so (as in grpc's own auth
examples) the interceptor wraps the handler: the wrapper reads the verified peer certificate
from the call's auth context, resolves it against the current policy, and refuses with
UNAUTHENTICATED (unknown identity) or PERMISSION_DENIED (no such permission anywhere) before
the servicer is entered. Per-gallery checks happen in the core, which knows the gallery.

Before any policy lookup, on every call (the open services included), the certificate itself is
checked: one on the policy's ``[revoked]`` list, or past its validity period, is refused with
UNAUTHENTICATED. TLS checks validity only at the handshake and a connection may live for days;
checking per call means a revocation (on SIGHUP) or an expiry also ends an existing connection's
access at its next call.

Reflection streams hold a worker thread for as long as the client keeps them open, so at most
``reflection_streams`` may be open at once; more are refused with RESOURCE_EXHAUSTED rather than
letting any certificate holder occupy every worker.

The wrapper also guarantees one audit record per call: the core records what it decided or
changed (before committing it); a call that fails without such a record (refused here, invalid,
not found, ...) is recorded here, with the status code it ended with.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from faceseal.server.api.errors import abort
from faceseal.server.auth.identity import identity_of
from faceseal.server.auth.policy import Caller, Permission, Policy
from faceseal.server.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
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

# Attributes grpc reads off a server-streaming behaviour (the health service's non-blocking
# Watch); a wrapper must carry them, or each Watch would hold a worker thread while open.
STREAM_BEHAVIOUR_ATTRIBUTES = ("experimental_non_blocking", "experimental_thread_pool")

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
        *,
        reflection_streams: int = 2,
    ) -> None:
        self._metrics = metrics
        self._policies = policies
        self._permissions = permissions
        self._audit_failure = audit_failure
        self._reflection_streams = threading.BoundedSemaphore(reflection_streams) if reflection_streams else None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        if method.startswith(OPEN_SERVICES):
            return self._wrap_open(handler, method)
        permission = self._permissions.get(method)
        return self._wrap(handler, method, permission)

    @staticmethod
    def _peer(context: grpc.ServicerContext) -> x509.Certificate | None:
        """The peer's verified leaf certificate (the handshake checked its chain against our CA)."""
        raw: bytes | list[bytes] = context.auth_context().get("x509_pem_cert") or []
        pems = [raw] if isinstance(raw, bytes) else list(raw)
        return x509.load_pem_x509_certificate(pems[0]) if pems else None

    def _refuse_untrusted(
        self, context: grpc.ServicerContext, policy: Policy, cert: x509.Certificate, method: str
    ) -> None:
        """Refuse a certificate on the revocation list, or outside its validity period: the
        handshake checked the dates, but the connection may be older than the certificate's
        remaining life."""
        fingerprint = cert.fingerprint(hashes.SHA256())
        if policy.revoked.revokes(cert.serial_number, fingerprint):
            log.warning(
                "revoked certificate refused",
                extra={"reason": "revoked", "sha256": fingerprint.hex(), "method": method},
            )
            self._metrics.auth_denied.labels("revoked").inc()
            abort(context, Unauthenticated("this certificate has been revoked"))
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            log.warning(
                "expired certificate refused",
                extra={"reason": "expired", "sha256": fingerprint.hex(), "method": method},
            )
            self._metrics.auth_denied.labels("expired").inc()
            abort(context, Unauthenticated("this certificate is outside its validity period"))

    def _authenticate(self, context: grpc.ServicerContext, info: RequestInfo, permission: Permission | None) -> None:
        policy = self._policies.policy  # one policy for the whole check, even across a SIGHUP
        cert = self._peer(context)
        identity = identity_of(cert) if cert is not None else None
        info.identity = identity or ""  # set first, so a refusal below is logged and audited with it
        if cert is not None:
            self._refuse_untrusted(context, policy, cert, info.method)
        found = policy.resolve(identity) if identity else None
        if found is None:
            log.warning("unknown caller refused", extra={"reason": "unknown_identity", "method": info.method})
            self._metrics.auth_denied.labels("unknown_identity").inc()
            abort(context, Unauthenticated("this certificate names no caller in the policy"))
        if permission is None or not found.may(permission):
            # A method nobody mapped to a permission is refused rather than guessed at.
            self._metrics.auth_denied.labels("no_permission").inc()
            abort(context, PermissionDenied(f"this caller lacks the '{permission}' permission"))
        info.caller = found

    def _wrap_open(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        """Health and reflection: no policy entry needed, but a revoked or expired certificate is
        refused here too, and reflection streams are capped."""
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        def check(context: grpc.ServicerContext) -> None:
            cert = self._peer(context)
            if cert is not None:
                self._refuse_untrusted(context, self._policies.policy, cert, method)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
                check(context)
                return inner_stream(request, context, *callback)  # send_response_callback, if non-blocking

            for attribute in STREAM_BEHAVIOUR_ATTRIBUTES:
                if hasattr(inner_stream, attribute):
                    setattr(stream, attribute, getattr(inner_stream, attribute))
            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        if handler.stream_stream:
            inner_bidi = handler.stream_stream
            slots = self._reflection_streams

            def bidi(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                check(context)
                if slots is None or not slots.acquire(blocking=False):
                    log.warning("reflection stream refused: too many open", extra={"method": method})
                    abort(context, ResourceExhausted("too many reflection streams are open; retry later", 1.0))
                try:
                    yield from inner_bidi(requests, context)
                finally:
                    slots.release()

            return grpc.stream_stream_rpc_method_handler(bidi, **kwargs)
        raise NotImplementedError(f"an open method of an unexpected kind: {method}")

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
        if handler.unary_unary or handler.unary_stream:
            kwargs["request_deserializer"] = _lenient(handler.request_deserializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                info, token = start(context)
                try:
                    self._authenticate(context, info, permission)
                    _decoded(request, context)
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
                    _decoded(request, context)
                    yield from inner_stream(request, context)
                except BaseException:
                    self._failed(request, context, info)
                    raise
                finally:
                    unbind(token)

            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        if handler.stream_unary:
            inner_client_stream = handler.stream_unary

            def client_stream(requests: Any, context: grpc.ServicerContext) -> Any:
                info, token = start(context)
                try:
                    self._authenticate(context, info, permission)
                    return inner_client_stream(requests, context)
                except BaseException:
                    self._failed(None, context, info)
                    raise
                finally:
                    unbind(token)

            return grpc.stream_unary_rpc_method_handler(client_stream, **kwargs)
        # No bidirectional methods exist; refuse rather than run one unauthenticated.
        raise NotImplementedError(f"bidirectional streams are not wired for authentication: {method}")


class _Undecodable:
    """What a request body that is not a valid message of the method's type decodes to."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize``, but a body that does not decode (bad wire format, invalid UTF-8 in a string
    field) becomes _UNDECODABLE instead of an exception: gRPC would answer INTERNAL for it before any
    handler ran, unauthenticated, unaudited and uncounted, where the caller sent INVALID_ARGUMENT."""
    if deserialize is None:
        return None

    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # protobuf's DecodeError, or whatever a deserializer raises
            return _UNDECODABLE

    return run


def _decoded(request: Any, context: grpc.ServicerContext) -> None:
    """Refuse a request that did not decode (after authentication: strangers learn nothing)."""
    if request is _UNDECODABLE:
        abort(context, InvalidArgument("the request is not a valid message for this method"))
