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
        if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
            locked = libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) == 0
        if not locked:
            log.warning(
                "memory not locked: keys may reach swap; disable swap, or run with CAP_IPC_LOCK "
                "or an unlimited RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity)",
            )
    return Hardening(True, not_dumpable, locked)
