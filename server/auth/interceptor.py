"""Authentication at the edge: every call is tied to a policy Caller before its handler runs.

Each method handler is wrapped once, at startup (``api/edge.py`` collects the generated handlers
and registers the wrapped ones): the wrapper reads the verified peer certificate from the call's
auth context, resolves it against the current policy, and refuses with UNAUTHENTICATED (unknown
identity) or PERMISSION_DENIED (no such permission anywhere) before the servicer is entered.
Per-gallery checks happen in the core, which knows the gallery. (grpc's server interceptors were
the first way of doing this, but they run per call and had to build a new handler each time.)

Before any policy lookup, on every call (the open services included), the certificate itself is
checked: one on the policy's ``[revoked]`` list, or past its validity period, is refused with
UNAUTHENTICATED. TLS checks validity only at the handshake and a connection may live for days;
checking per call means a revocation (on SIGHUP) or an expiry also ends an existing connection's
access at its next call.

Parsing the certificate is the expensive part of that, and its result never changes, so what the
checks need from it (identity, serial, fingerprint, validity period) is kept per certificate in a
bounded cache. The checks themselves still run per call against the policy in force, so a SIGHUP
or the passing of ``notAfter`` takes effect at the next call exactly as without the cache.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import Counter

from faceseal.server.api.errors import abort
from faceseal.server.auth.identity import identity_of
from faceseal.server.auth.policy import Caller, Permission, Policy
from faceseal.server.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from faceseal.server.metrics import DENIAL_REASONS, Metrics
from faceseal.server.request import RequestInfo, bind, current, new_request_id, unbind

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

# Certificates (and, per policy, identities) remembered. Every client certificate our CA issued
# to a live client fits many times over; past it the oldest entry goes, costing one re-parse.
PEER_CACHE_SIZE = 1024


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


@dataclass(frozen=True, slots=True)
class Peer:
    """What the per-call checks need from a verified peer certificate, parsed once."""

    identity: str | None
    serial: int
    sha256: bytes
    not_before: float  # POSIX seconds, compared with time.time() per call
    not_after: float

    @classmethod
    def parse(cls, pem: bytes) -> Peer:
        cert = x509.load_pem_x509_certificate(pem)
        return cls(
            identity_of(cert),
            cert.serial_number,
            cert.fingerprint(hashes.SHA256()),
            cert.not_valid_before_utc.timestamp(),
            cert.not_valid_after_utc.timestamp(),
        )


class PeerCache:
    """Parsed certificates by their PEM bytes, at most ``size``, the oldest evicted first.

    Keyed by the whole PEM, not a serial or a name: two certificates only share an entry if they
    are the same certificate. Lookups take no lock (a dict read is atomic); inserts do, so that
    concurrent evictions cannot remove the same entry twice.
    """

    def __init__(self, size: int = PEER_CACHE_SIZE) -> None:
        self._size = max(1, size)
        self._peers: dict[bytes, Peer] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, pem: object) -> bool:
        return pem in self._peers

    def get(self, pem: bytes) -> Peer:
        peer = self._peers.get(pem)
        if peer is None:
            peer = Peer.parse(pem)  # outside the lock: a parse error or a slow parse blocks nobody
            with self._lock:
                while len(self._peers) >= self._size:
                    del self._peers[next(iter(self._peers))]
                self._peers[pem] = peer
        return peer


class Authenticator:
    """Wraps each method's handler to refuse callers that lack the permission it needs."""

    def __init__(
        self,
        policies: PolicyHolder,
        permissions: dict[str, Permission],
        metrics: Metrics,
        audit_failure: FailureAudit,
        *,
        reflection_streams: int = 2,
        cache_size: int = PEER_CACHE_SIZE,
    ) -> None:
        self._policies = policies
        self._permissions = permissions
        self._audit_failure = audit_failure
        self._reflection_streams = threading.BoundedSemaphore(reflection_streams) if reflection_streams else None
        self._denied: dict[str, Counter] = {reason: metrics.auth_denied.labels(reason) for reason in DENIAL_REASONS}
        self.peers = PeerCache(cache_size)
        self._cache_size = cache_size
        # Policy.resolve scans every rule; its answer depends only on the policy and the identity,
        # so it is kept per identity for the policy it came from and dropped with that policy.
        self._callers: tuple[Policy | None, dict[str, Caller | None]] = (None, {})

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` (of ``method``, "/package.Service/Name") behind authentication; once per method."""
        if method.startswith(OPEN_SERVICES):
            return self._wrap_open(handler, method)
        return self._wrap(handler, method, self._permissions.get(method))

    def _peer(self, context: grpc.ServicerContext) -> Peer | None:
        """The peer's verified leaf certificate (the handshake checked its chain against our CA)."""
        raw: bytes | list[bytes] | None = context.auth_context().get("x509_pem_cert")
        if not raw:
            return None
        return self.peers.get(raw if isinstance(raw, bytes) else raw[0])

    def _resolve(self, policy: Policy, identity: str) -> Caller | None:
        cached_policy, callers = self._callers
        if cached_policy is not policy:  # first call under a new policy: forget the old answers
            callers = {}
            self._callers = (policy, callers)
        try:
            return callers[identity]
        except KeyError:
            pass
        found = policy.resolve(identity)
        if len(callers) < self._cache_size:  # beyond it, resolve per call rather than grow
            callers[identity] = found
        return found

    def _refuse_untrusted(self, context: grpc.ServicerContext, policy: Policy, peer: Peer, method: str) -> None:
        """Refuse a certificate on the revocation list, or outside its validity period: the
        handshake checked the dates, but the connection may be older than the certificate's
        remaining life."""
        if policy.revoked.revokes(peer.serial, peer.sha256):
            log.warning(
                "revoked certificate refused",
                extra={"reason": "revoked", "sha256": peer.sha256.hex(), "method": method},
            )
            self._denied["revoked"].inc()
            abort(context, Unauthenticated("this certificate has been revoked"))
        if not peer.not_before <= time.time() <= peer.not_after:
            log.warning(
                "expired certificate refused",
                extra={"reason": "expired", "sha256": peer.sha256.hex(), "method": method},
            )
            self._denied["expired"].inc()
            abort(context, Unauthenticated("this certificate is outside its validity period"))

    def _authenticate(self, context: grpc.ServicerContext, info: RequestInfo, permission: Permission | None) -> None:
        policy = self._policies.policy  # one policy for the whole check, even across a SIGHUP
        peer = self._peer(context)
        identity = peer.identity if peer is not None else None
        info.identity = identity or ""  # set first, so a refusal below is logged and audited with it
        if peer is not None:
            self._refuse_untrusted(context, policy, peer, info.method)
        found = self._resolve(policy, identity) if identity else None
        if found is None:
            log.warning("unknown caller refused", extra={"reason": "unknown_identity", "method": info.method})
            self._denied["unknown_identity"].inc()
            abort(context, Unauthenticated("this certificate names no caller in the policy"))
        if permission is None or not found.may(permission):
            # A method nobody mapped to a permission is refused rather than guessed at.
            self._denied["no_permission"].inc()
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
            peer = self._peer(context)
            if peer is not None:
                self._refuse_untrusted(context, self._policies.policy, peer, method)

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
        authenticate = self._authenticate

        def start(context: grpc.ServicerContext) -> tuple[RequestInfo, Any]:
            info = RequestInfo(None, "", method, new_request_id())
            context.set_trailing_metadata((("x-request-id", info.request_id),))
            return info, bind(info)

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        kwargs["request_deserializer"] = _lenient(handler.request_deserializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                info, token = start(context)
                try:
                    authenticate(context, info, permission)
                    if request is _UNDECODABLE:
                        _undecodable(context)
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
                    authenticate(context, info, permission)
                    if request is _UNDECODABLE:
                        _undecodable(context)
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
                    authenticate(context, info, permission)
                    return inner_client_stream(_decoded_stream(requests), context)
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


def _decoded_stream(requests: Iterator[Any]) -> Iterator[Any]:
    """A client stream's messages; one that did not decode fails the whole call INVALID_ARGUMENT
    when the servicer reaches it (BulkEnroll has stored nothing by then: it commits at the end)."""
    for request in requests:
        if request is _UNDECODABLE:
            raise InvalidArgument("a message of the stream is not a valid message for this method")
        yield request


def _undecodable(context: grpc.ServicerContext) -> NoReturn:
    """Refuse a request that did not decode (after authentication: strangers learn nothing)."""
    abort(context, InvalidArgument("the request is not a valid message for this method"))
