"""The standard grpc.health.v1 service, minus a deadlock in grpcio-health.

``grpc_health.v1.health.HealthServicer`` sends a status change to every Watch stream while it
holds its lock, and each send waits for grpc's serving thread to report the send done. When a
watcher closes, its close callback runs on that same serving thread and takes the same lock to
forget the watcher. A status change (unseal, seal, SIGTERM's NOT_SERVING) that meets a closing
watcher therefore stops both threads for good: the daemon hangs, and a load balancer's health
checks with it. Seen in CI as a daemon stop that never returned.

Here the close callback hands the bookkeeping to a thread of its own, so the serving thread
never waits for the lock. Until that thread gets the lock, a status change may still try to
send to the closed stream; grpc answers such a send at once (the call is no longer active).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health


class HealthServicer(health.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._closed: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._forgetter = threading.Thread(target=self._forget, name="health-watch-close", daemon=True)
        self._forgetter.start()

    def _on_close_callback(self, send_response_callback: Callable[[Any], None], service: str) -> Callable[[], None]:
        forget = super()._on_close_callback(send_response_callback, service)

        def callback() -> None:  # on grpc's serving thread: must not block
            self._closed.put(forget)

        return callback

    def _forget(self) -> None:
        while True:
            forget = self._closed.get()
            with contextlib.suppress(KeyError):  # a watcher already forgotten: nothing left to do
                forget()
