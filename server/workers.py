"""``server.workers = N``: N daemon processes sharing one listening port (SO_REUSEPORT).

One Python process tops out near one core (the GIL), so a multi-core host runs several. The
kernel spreads new connections across the processes; each worker unseals on its own and follows
the store's change log exactly as a replica does, so a write made through one worker reaches the
others within ``store.follow_interval_seconds``. The supervisor itself never unseals: it holds no
key, only starts workers, forwards SIGTERM / SIGHUP, and restarts a worker that died.

Per worker: its own audit chain (``<audit.dir>/worker-<i>``) and, when the metrics port is not
0, its own metrics port (``port + i``), because two processes' counters cannot share a scrape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from faceseal.server.signals import HANDLED_SIGNALS, SignalFlag

log = logging.getLogger("faceseal.workers")

WORKER_ENV = "FACESEAL_WORKER"


def worker_index() -> int | None:
    """This process's worker number, or None when it is not a worker."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def pin(index: int) -> int:
    """Pin this worker process, every thread of it, to one CPU, before it serves.

    Returns the CPU. The CPUs are the ones this process may use (a cgroup or ``taskset`` may
    have narrowed them), in order; worker ``index`` takes the ``index``-th, wrapping around.
    """
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    # Every thread that exists already (importing grpc starts some), then this one: threads
    # started later inherit the affinity of the thread that starts them.
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), {cpu})
    os.sched_setaffinity(0, {cpu})
    return cpu


def supervise(config_path: Path, workers: int, grace_seconds: float, stopping: SignalFlag) -> int:
    """Run ``workers`` copies of ``faceseald serve`` until SIGTERM/SIGINT; returns the exit code.

    ``stopping`` is set by the caller's handler if a stop signal came before this took over.
    After a stop each worker gets its drain (``grace_seconds``) and some slack before it is
    killed. The exit code is 0 only when every worker exited with 0: a worker starts with the
    stop signals blocked until its handlers are in, so one killed by a signal is an error.
    """
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(index: int) -> None:
        env = {**os.environ, WORKER_ENV: str(index)}
        # The worker starts with these signals blocked (the mask survives fork and exec) and
        # unblocks them once its handlers are in: one passed on while it is still importing
        # waits for its handler instead of ending it by the default action. (Blocked here in
        # the main thread only: one that reaches the supervisor meanwhile is handled by another
        # thread or after the fork, and the resend after the loop covers a worker it missed.)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            procs[index] = subprocess.Popen(  # our own entry point, fixed arguments
                [sys.executable, "-m", "faceseal.server.cli", "serve", "--config", str(config_path)], env=env
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        log.info("worker started", extra={"worker": index, "pid": procs[index].pid})

    def send_all(signum: int) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping.set(signum)
        send_all(signum)

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, forward)
    for index in range(workers):
        if not stopping.is_set():
            spawn(index)
    backoff = dict.fromkeys(range(workers), 0.5)
    while not stopping.is_set():
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is not None and not stopping.is_set():
                log.error("worker exited; restarting", extra={"worker": index, "exit_code": code})
                stopping.wait(backoff[index])
                backoff[index] = min(30.0, backoff[index] * 2)
                if not stopping.is_set():
                    spawn(index)
        stopping.wait(0.5)
    log.info("signal received; stopping the workers", extra={"signal": stopping.name()})
    # Once more: a worker spawned while the signal was being handled never saw it.
    send_all(stopping.signum or signal.SIGTERM)
    # Daemon.stop waits up to 10 s for its follower (a store that is down), up to grace + 10 s
    # for the last calls, then closes the store: grace + 30 s leaves it room.
    patience = grace_seconds + 30
    deadline = time.monotonic() + patience
    clean = True
    for index, proc in procs.items():
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            log.error("worker did not stop in time; killed", extra={"worker": index, "seconds": patience})
            clean = False
            continue
        if code != 0:
            log.error("worker stopped with an error", extra={"worker": index, "exit_code": code})
            clean = False
    return 0 if clean else 1
