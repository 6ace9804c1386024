"""The standard gRPC server metrics, taken around every handler.

Outermost interceptor: it sees the final status of every call, including the ones the auth
interceptor refused, so ``grpc_server_handled_total`` counts what callers actually received.
Only method names the server implements become labels (an unknown method has no handler and is
not counted), so a caller cannot mint label values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from faceseal.server.metrics import Metrics

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


def rpc_type(handler: Any) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


class MetricsInterceptor(_Interceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        service, _, name = details.method.strip("/").partition("/")
        kind = rpc_type(handler)
        labels = (kind, service, name)
        m = self._metrics

        def finish(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]  # grpc >= 1.49
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            m.handled.labels(*labels, code.name).inc()
            m.handling.labels(*labels).observe(time.perf_counter() - start)

        if kind in ("unary", "client_stream"):
            # One request or a request iterator in, one response out: timed the same way.
            inner = handler.unary_unary if kind == "unary" else handler.stream_unary
            factory = grpc.unary_unary_rpc_method_handler if kind == "unary" else grpc.stream_unary_rpc_method_handler

            def single(request: Any, context: grpc.ServicerContext) -> Any:
                m.started.labels(*labels).inc()
                start, failed = time.perf_counter(), True
                try:
                    response = inner(request, context)
                    failed = False
                    return response
                finally:
                    finish(context, start, failed)

            return factory(
                single,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if kind == "server_stream" and getattr(handler.unary_stream, "experimental_non_blocking", False):
            # The health service's Watch answers through a callback instead of holding a worker
            # thread for as long as the watcher stays; wrapping it in a generator would make every
            # open Watch occupy one of the server's workers.
            inner_callback = handler.unary_stream

            def callback_stream(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
                m.started.labels(*labels).inc()
                start = time.perf_counter()
                try:
                    result = inner_callback(request, context, *callback)
                except BaseException:
                    finish(context, start, True)
                    raise
                if not context.add_callback(lambda: finish(context, start, False)):
                    finish(context, start, False)  # the call had ended already
                return result

            callback_stream.experimental_non_blocking = True  # type: ignore[attr-defined]
            callback_stream.experimental_thread_pool = getattr(  # type: ignore[attr-defined]
                inner_callback, "experimental_thread_pool", None
            )
            return grpc.unary_stream_rpc_method_handler(
                callback_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if kind == "server_stream":
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                m.started.labels(*labels).inc()
                start, failed = time.perf_counter(), True
                try:
                    yield from inner_stream(request, context)
                    failed = False
                finally:
                    finish(context, start, failed)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
