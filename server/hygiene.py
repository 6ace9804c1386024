"""Process hardening applied before any key is unwrapped.

What Python can promise here is limited, and the README says so: key bytes live in immutable
``bytes`` objects that cannot be wiped, and the allocator may copy them. What the process *can*
do is keep them off the disk and away from other users: no core dumps (RLIMIT_CORE 0), not
dumpable (PR_SET_DUMPABLE 0 also blocks ptrace by same-uid processes and makes /proc/PID/mem
root-only), and memory locked against swap where the limits allow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
from dataclasses import dataclass

log = logging.getLogger("faceseal.hygiene")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4
_CAP_IPC_LOCK = 14


@dataclass(frozen=True, slots=True)
class Hardening:
    core_dumps_off: bool
    not_dumpable: bool
    memory_locked: bool


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def dumpable() -> bool:
    """Whether this process is dumpable (for tests and status)."""
    return bool(_libc().prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def _may_lock_beyond_limit() -> bool:
    """Whether CAP_IPC_LOCK is in the effective set, which lifts RLIMIT_MEMLOCK for mlock.

    Root usually has it, but a container may run root without it, and a service may run
    unprivileged with it (systemd: AmbientCapabilities=CAP_IPC_LOCK); the uid alone cannot tell.
    """
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def apply(lock_memory: bool = True) -> Hardening:
    """Harden this process; warn (never fail) where the OS refuses."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = _libc()
    not_dumpable = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    if not not_dumpable:
        log.warning("could not mark the process non-dumpable", extra={"errno": ctypes.get_errno()})
    locked = False
    if lock_memory:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        # Lock only when the limit cannot bite later: with MCL_FUTURE a capped limit would turn a
        # large gallery's allocation into a MemoryError at run time instead of a warning now.
        if soft == resource.RLIM_INFINITY or _may_lock_beyond_limit():
            locked = libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) == 0
        if not locked:
            log.warning(
                "memory not locked: keys may reach swap; disable swap, or run with CAP_IPC_LOCK "
                "or an unlimited RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity)",
            )
    return Hardening(True, not_dumpable, locked)
