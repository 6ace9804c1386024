"""Registering the servicers behind metrics and authentication, with every wrapper built once.

grpc's server interceptors run per call and can only answer with a handler, so ours built new
closures and a new RpcMethodHandler on every call. Instead, ``Edge`` stands in for the server
while the generated ``add_*Servicer_to_server`` functions (and grpc's health and reflection
helpers) run, collects the handlers they would have registered, wraps each one once (metrics
outermost, so refusals are counted; then authentication and the request context), and registers
the wrapped handlers on the real server as registered methods, which grpc core matches without
asking any Python code which handler a method has.

A method no servicer implements is never wrapped: grpc answers it UNIMPLEMENTED itself, and it
mints no metric label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import grpc

from faceseal.server.api.observe import with_metrics
from faceseal.server.auth.interceptor import Authenticator
from faceseal.server.metrics import Metrics

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _GenericRpcHandler = grpc.GenericRpcHandler[Any, Any]
else:  # the stubs make them generic; the runtime classes are not subscriptable
    Handler = grpc.RpcMethodHandler
    _GenericRpcHandler = grpc.GenericRpcHandler


class Edge:
    """Collects method handlers as a server would, then registers them wrapped on a real one."""

    def __init__(self, metrics: Metrics, authenticator: Authenticator) -> None:
        self._metrics = metrics
        self._auth = authenticator
        self._services: dict[str, dict[str, Handler]] = {}
        self._generic: list[grpc.GenericRpcHandler[Any, Any]] = []

    @property
    def server(self) -> grpc.Server:
        """This collector, typed as what the ``add_*_to_server`` functions take; they call only
        the two ``add_*_handlers`` methods below."""
        return cast(grpc.Server, self)

    # The two methods the generated code calls (grpcio >= 1.63 calls both for every service).

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Handler]) -> None:
        self._services.setdefault(service_name, {}).update(method_handlers)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self._generic.extend(generic_rpc_handlers)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` of ``method`` ("/package.Service/Name") behind metrics and authentication."""
        wrapped: Handler = with_metrics(self._metrics, method, self._auth.wrap(method, handler))
        return wrapped

    def register(self, server: grpc.Server) -> None:
        """Register everything collected, wrapped, on ``server`` (before it starts)."""
        for service, handlers in self._services.items():
            wrapped = {name: self.wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
            server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]  # grpc >= 1.63
            # As the generated code does: a generic handler too, consulted only for a call grpc
            # core did not match to a registered method.
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        # A generic handler for a service that registered its methods duplicates them; any other
        # (a helper that only registers generically) is wrapped method by method as it answers.
        others = [h for h in self._generic if _service_of(h) not in self._services]
        if others:
            server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self.wrap) for h in others))


def _service_of(handler: grpc.GenericRpcHandler[Any, Any]) -> str | None:
    return handler.service_name() if isinstance(handler, grpc.ServiceRpcHandler) else None


class _WrappedGeneric(_GenericRpcHandler):
    """A generic handler whose handlers are wrapped the first time each method is looked up."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], wrap: Callable[[str, Handler], Handler]) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # not one of its methods: not remembered, so no name is ever kept
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped
