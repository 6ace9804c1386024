"""The standard gRPC server metrics, taken around every handler.

Outermost wrapper (see ``api/edge.py``): it sees the final status of every call, including the
ones authentication refused, so ``grpc_server_handled_total`` counts what callers actually
received. Only method names the server implements are wrapped, so only they become labels (an
unknown method has no handler and is not counted): a caller cannot mint label values.

Each method's wrapper is built once, at startup, with its metric children already bound:
``labels()`` hashes the label tuple and takes the metric's lock, which per call was a measurable
part of the edge's cost. Children for status codes other than OK are bound on first use and kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from faceseal.server.metrics import Metrics


def rpc_type(handler: Any) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


class MethodSeries:
    """One method's metric children: ``started`` and ``handling`` bound up front, ``handled`` per
    final code bound on first use (a code a method never ends with gets no series)."""

    __slots__ = ("_handled", "_labels", "_lock", "_metric", "handling", "started")

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._metric = metrics.handled
        self._lock = threading.Lock()
        self.started: Counter = metrics.started.labels(*labels)
        self.handling: Histogram = metrics.handling.labels(*labels)
        # OK is already a series (metrics.py starts it at zero); bind it now, the others lazily.
        self._handled: dict[grpc.StatusCode, Counter] = {grpc.StatusCode.OK: self._metric.labels(*labels, "OK")}

    def handled(self, code: grpc.StatusCode) -> Counter:
        child = self._handled.get(code)
        if child is None:
            with self._lock:  # copy-on-write: readers never see a dict being resized
                child = self._metric.labels(*self._labels, code.name)
                self._handled = {**self._handled, code: child}
        return child


def with_metrics(metrics: Metrics, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    """``handler`` wrapped to count its calls, their final codes and their duration."""
    service, _, name = method.strip("/").partition("/")
    kind = rpc_type(handler)
    if kind == "bidi_stream":
        return handler  # reflection only: never counted (its streams last as long as the client likes)
    series = MethodSeries(metrics, (kind, service, name))
    started, handling, handled = series.started, series.handling, series.handled
    perf_counter = time.perf_counter
    ok = grpc.StatusCode.OK
    unknown = grpc.StatusCode.UNKNOWN

    def finish(context: grpc.ServicerContext, start: float, failed: bool) -> None:
        code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]  # grpc >= 1.49
        if code is None:
            code = unknown if failed else ok
        handled(code).inc()
        handling.observe(perf_counter() - start)

    if kind in ("unary", "client_stream"):
        # One request or a request iterator in, one response out: timed the same way.
        inner = handler.unary_unary if kind == "unary" else handler.stream_unary
        factory = grpc.unary_unary_rpc_method_handler if kind == "unary" else grpc.stream_unary_rpc_method_handler
        assert inner is not None  # rpc_type() said which behaviour is set

        def single(request: Any, context: grpc.ServicerContext) -> Any:
            started.inc()
            start, failed = perf_counter(), True
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
    if getattr(handler.unary_stream, "experimental_non_blocking", False):
        # The health service's Watch answers through a callback instead of holding a worker
        # thread for as long as the watcher stays; wrapping it in a generator would make every
        # open Watch occupy one of the server's workers.
        inner_callback = handler.unary_stream
        assert inner_callback is not None

        def callback_stream(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
            started.inc()
            start = perf_counter()
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
    inner_stream = handler.unary_stream
    assert inner_stream is not None

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started.inc()
        start, failed = perf_counter(), True
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
