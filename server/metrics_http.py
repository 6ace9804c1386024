"""The metrics listener: prometheus-client's handler on a threaded HTTP(S) server of our own.

prometheus-client's ``start_http_server`` performs the TLS handshake inside ``accept()`` on its
one serving thread, so a single idle TCP connection stalls every scrape (and shutdown). Here
the handshake runs in the connection's own thread, with a timeout.
"""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

HANDSHAKE_TIMEOUT = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, context: ssl.SSLContext | None) -> None:
        self._tls = context
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._tls is None:
            request.settimeout(HANDSHAKE_TIMEOUT)
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            wrapped = self._tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class MetricsServer:
    """Serves ``registry`` at /metrics until ``close``."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, cert: Path | None = None, key: Path | None = None
    ) -> None:
        context = None
        if cert is not None and key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cert, key)
        self._server = _Server((host, port), MetricsHandler.factory(registry), context)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
