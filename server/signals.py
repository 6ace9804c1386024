"""What a signal handler may touch: a flag the main thread polls, never a lock (not even logging's).

Python runs signal handlers in the main thread, between two bytecodes of whatever it was doing.
``threading.Event.set`` takes the Event's condition lock, which is not reentrant, and the main
thread holds that very lock for a moment on its way into and out of ``Event.wait``: a stop
signal that lands there deadlocks the process for good (python/cpython#126434). So the handlers
only flip a boolean and the main thread waits by sleeping in short steps; a second SIGTERM a
moment after the first (systemd signals every process of the unit, the supervisor passes it on
again) is then as harmless as the first.
"""

from __future__ import annotations

import signal
import time

# Stop (TERM, INT) and reload (HUP): what the daemon handles and the supervisor passes on.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

_STEP = 0.1  # seconds: how late the main thread may notice a stop


class SignalFlag:
    """Set from a signal handler, waited on by the main thread (only there: it polls)."""

    def __init__(self) -> None:
        self._set = False
        self.signum = 0  # the last signal that set it, for the main thread to log

    def set(self, signum: int = 0) -> None:
        self.signum = signum
        self._set = True

    def name(self) -> str:
        """The setting signal's name (SIGTERM ...), for a log line written outside the handler."""
        return signal.Signals(self.signum).name if self.signum else "none"

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until set or ``timeout`` seconds passed; whether it is set."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = _STEP if end is None else min(_STEP, end - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
        return self._set
