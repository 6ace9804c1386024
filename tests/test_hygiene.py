"""Memory hygiene at start, checked from outside the process where the kernel allows it.

* ``faceseald serve`` runs as a child: /proc/PID/limits shows core dumps off (RLIMIT_CORE 0/0),
  /proc/PID/status shows locked memory (VmLck) when it may lock (root), and the process is not
  dumpable. That last one is checked independently of the daemon's own log line: the kernel
  hands the /proc/PID/* files of a non-dumpable process to root:root instead of the process's
  effective uid:gid, so the child runs with a non-root group (or, for a non-root runner, its own
  uid) and the owner of /proc/PID/status tells. A plain child with the same group is the
  control that shows the check can fail.
* Where memory may not be locked (not root, small RLIMIT_MEMLOCK), the daemon warns and goes
  on: a child drops to a non-root effective uid (which clears its capabilities), lowers the
  limit, runs ``hygiene.apply()`` and reports what the kernel says. What decides is
  CAP_IPC_LOCK, not the uid: root without it does not lock under a finite limit, an
  unprivileged user with it does (children shaped with setpriv; root only).
* Key material stays out of reprs: nothing reachable from a running, unsealed daemon shows a key
  in its repr, on each seal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from helpers import FACESEALD, Dev, InProcessDaemon, free_port, health, poll, random_encodings
from seals import EACH_SEAL, SealSetup

from faceseal.server.crypto.keyring import Keyring, SecretKey

NOBODY = 65534
MEMLOCK_SMALL = 64 * 1024
IS_ROOT = os.geteuid() == 0


# ------------------------------------------------------------------------------------ /proc helpers


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core file size in /proc/PID/limits")


def _kib(value: str) -> int:
    number, unit = value.split()
    assert unit == "kB"
    return int(number)


def _not_dumpable_by_proc_owner(pid: int) -> bool:
    """The kernel's own answer: /proc/PID/status belongs to root:root when the process is not
    dumpable, to its effective uid:gid otherwise. Meaningful only if that is not root:root."""
    status = _status(pid)
    euid, egid = int(status["Uid"].split()[1]), int(status["Gid"].split()[1])
    assert (euid, egid) != (0, 0), "run the child with a non-root uid or gid"
    st = os.stat(f"/proc/{pid}/status")
    if (st.st_uid, st.st_gid) == (0, 0):
        return True
    assert (st.st_uid, st.st_gid) == (euid, egid)
    return False


def _as_non_root_group() -> dict[str, Any]:
    """Popen arguments giving the child a non-root group (root only; others already qualify)."""
    return {"group": NOBODY, "extra_groups": []} if IS_ROOT else {}


def _records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


# -------------------------------------------------------------------------------- the real daemon


@pytest.fixture
def hardened_daemon(dev: Dev, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``faceseald serve`` as a child with a non-root group, SERVING."""
    log_path = tmp_path / "faceseald.log"
    dev.set_server(listen=f"127.0.0.1:{free_port()}")
    target = dev.config()["server"]["listen"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(FACESEALD), "serve", "--config", str(dev.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            **_as_non_root_group(),
        )
    try:

        def up() -> bool | None:
            assert proc.poll() is None, f"faceseald exited at start:\n{log_path.read_text()}"
            return health(dev, target, timeout=1.0) == "SERVING" or None

        poll("the daemon to report SERVING", up, deadline=30)
        yield proc, log_path
    finally:
        dev.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_daemon_runs_without_core_dumps_not_dumpable_and_locked(
    hardened_daemon: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, log_path = hardened_daemon
    pid = proc.pid
    assert _core_limit(pid) == ("0", "0")
    assert _not_dumpable_by_proc_owner(pid)

    (hardened,) = [r for r in _records(log_path.read_text()) if r["msg"] == "process hardened"]
    assert hardened["not_dumpable"] is True
    vmlck = _kib(_status(pid)["VmLck"])
    if IS_ROOT:  # root may lock without limit: the daemon does, and the kernel agrees
        assert hardened["memory_locked"] is True
        assert vmlck > 0
    else:
        assert hardened["memory_locked"] is (vmlck > 0)


def test_proc_owner_check_can_fail() -> None:
    """The control: an ordinary child with the same credentials is reported dumpable."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        **_as_non_root_group(),
    )
    try:
        poll("the child to exec", lambda: "python" in Path(f"/proc/{proc.pid}/cmdline").read_text() or None)
        assert not _not_dumpable_by_proc_owner(proc.pid)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


# ------------------------------------------------------------------------ hygiene.apply() in a child

_CHILD = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, os, resource, sys
    from faceseal.server import hygiene, logs

    ctypes.util.find_library("c")  # warm up before losing access to root-only paths
    before = hygiene.dumpable()
    limit, drop_root = int(sys.argv[1]), sys.argv[2] == "drop-root"
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    if drop_root and os.geteuid() == 0:
        os.setegid(65534)
        os.seteuid(65534)  # a non-root effective uid: the capabilities (CAP_IPC_LOCK) are gone
    logs.configure()
    hardening = hygiene.apply()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    vmlck = [l for l in open("/proc/self/status") if l.startswith("VmLck:")][0].split()[1]
    refused = libc.mlockall(1) != 0  # would the kernel have let it lock at all?
    print(json.dumps({
        "euid": os.geteuid(),
        "dumpable_before": before,
        "dumpable_after": hygiene.dumpable(),
        "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
        "hardening": {"core_dumps_off": hardening.core_dumps_off, "not_dumpable": hardening.not_dumpable,
                      "memory_locked": hardening.memory_locked},
        "mlockall_refused": refused,
        "vmlck_kib": int(vmlck),
    }))
    """
)


def _run_child(tmp_path: Path, limit: int, mode: str, prefix: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """Run _CHILD (behind ``prefix``, e.g. setpriv); its report and its log (stderr)."""
    result = subprocess.run(
        [*prefix, sys.executable, "-c", _CHILD, str(limit), mode],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report, result.stderr


def _memlock_warnings(log: str) -> list[dict[str, Any]]:
    return [r for r in _records(log) if r["level"] == "warning" and r["msg"].startswith("memory not locked")]


def test_small_memlock_limit_without_root_warns_and_goes_on(tmp_path: Path) -> None:
    report, log = _run_child(tmp_path, MEMLOCK_SMALL, "drop-root")
    assert report["euid"] != 0
    assert report["hardening"] == {"core_dumps_off": True, "not_dumpable": True, "memory_locked": False}
    assert report["dumpable_before"] is True
    assert report["dumpable_after"] is False  # prctl(PR_GET_DUMPABLE), after apply()
    assert report["core"] == [0, 0]
    assert report["mlockall_refused"] is True  # the kernel refuses too: the warning is right
    assert report["vmlck_kib"] == 0
    warnings = [r for r in _records(log) if r["level"] == "warning"]
    assert [r["logger"] for r in warnings] == ["faceseal.hygiene"]
    assert warnings[0]["msg"].startswith("memory not locked: keys may reach swap")
    assert "LimitMEMLOCK=infinity" in warnings[0]["msg"]


SETPRIV = shutil.which("setpriv")
needs_root_and_setpriv = pytest.mark.skipif(
    not IS_ROOT or SETPRIV is None, reason="needs root and setpriv (util-linux) to shape capabilities"
)


@needs_root_and_setpriv
def test_root_without_cap_ipc_lock_does_not_lock_under_a_finite_limit(tmp_path: Path) -> None:
    """A container's root without CAP_IPC_LOCK: locking now would make later allocations beyond
    the limit fail (MCL_FUTURE), so the daemon warns instead, even though the limit would hold
    what is mapped today."""
    assert SETPRIV is not None
    # As large a limit as this process may set (raising the hard limit needs CAP_SYS_RESOURCE).
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    limit = 1 << 30 if hard == resource.RLIM_INFINITY else min(hard, 1 << 30)
    report, log = _run_child(tmp_path, limit, "keep", (SETPRIV, "--bounding-set=-ipc_lock", "--"))
    assert report["euid"] == 0
    assert report["hardening"]["memory_locked"] is False
    assert report["vmlck_kib"] == 0
    assert len(_memlock_warnings(log)) == 1


@needs_root_and_setpriv
def test_unprivileged_with_cap_ipc_lock_locks(tmp_path: Path) -> None:
    """A service user with CAP_IPC_LOCK (systemd AmbientCapabilities): the small limit does not
    apply to it, so the daemon locks, as its own warning advises. (CAP_DAC_READ_SEARCH only lets
    nobody read this test's interpreter, which lives under /root.)"""
    assert SETPRIV is not None
    caps = "+ipc_lock,+dac_read_search"
    prefix = (SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    prefix += (f"--inh-caps={caps}", f"--ambient-caps={caps}", "--")
    report, log = _run_child(tmp_path, MEMLOCK_SMALL, "keep", prefix)
    assert report["euid"] == NOBODY
    assert report["hardening"] == {"core_dumps_off": True, "not_dumpable": True, "memory_locked": True}
    assert report["vmlck_kib"] > MEMLOCK_SMALL // 1024  # beyond the limit: the capability lifts it
    assert _memlock_warnings(log) == []


# ---------------------------------------------------------------------------- key material in reprs


def _reachable(root: object) -> Iterator[tuple[str, object]]:
    """(attribute or key name, object) for every object reachable from ``root`` through faceseal
    objects and plain containers."""
    seen: set[int] = set()
    stack: list[tuple[str, object]] = [("root", root)]
    while stack:
        name, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield name, obj
        children: list[tuple[str, object]] = []
        if isinstance(obj, dict | MappingProxyType):
            children = [(str(k), v) for k, v in obj.items()] + [(name, k) for k in obj]
        elif isinstance(obj, list | tuple | set | frozenset):
            children = [(name, v) for v in obj]
        elif type(obj).__module__.startswith("faceseal."):
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                children += [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
            children += list(getattr(obj, "__dict__", {}).items())
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        children.append((slot, getattr(obj, slot)))
        stack.extend(children)


def _forms(secret: bytes) -> list[str]:
    forms = [repr(secret), secret.hex(), secret.hex().upper(), str(list(secret))]
    if secret.isascii() and secret.decode().isprintable():  # a PIN or a token, held as str
        forms.append(secret.decode())
    return forms


@EACH_SEAL
def test_no_repr_reachable_from_the_daemon_shows_a_key(
    harness: InProcessDaemon, seal_setup: SealSetup, tmp_path: Path
) -> None:
    daemon = harness.start()
    for n, encoding in enumerate(random_encodings(3, seed=900)):
        daemon.client("enroller").enroll(f"s{n}", encoding)
    assert daemon.daemon is not None
    named = list(_reachable(daemon.daemon))
    objects = [obj for _, obj in named]

    # Key material: what SecretKeys hold (data keys, index key), any bytes the daemon keeps
    # under a name that says key (a derived audit key), and the seal's secrets (PIN, token).
    secrets = [k.reveal() for k in objects if isinstance(k, SecretKey)]
    assert len(secrets) >= 2, "found no data key or index key to look for"
    secrets += [o for name, o in named if isinstance(o, bytes) and len(o) >= 16 and "key" in name.lower()]
    secrets += list(seal_setup.secrets.values())
    if seal_setup.kind == "file":
        secrets.append(harness.dev.kek())

    shown = []
    for obj in objects:
        if isinstance(obj, bytes | str):
            continue
        if isinstance(obj, dict | MappingProxyType | list | tuple | set | frozenset):
            text = repr(obj)
        elif type(obj).__module__.startswith("faceseal."):
            text = repr(obj) + str(obj)
        else:
            continue
        if any(form in text for secret in secrets for form in _forms(secret)):
            shown.append(f"{type(obj).__module__}.{type(obj).__qualname__}")  # never the text itself
    assert shown == [], "these objects show key material in their repr"


def test_keys_refuse_to_be_printed_or_pickled() -> None:
    key = SecretKey(bytes(range(32)))
    ring = Keyring(key, {1: key, 2: SecretKey.generate()})
    for text in (repr(key), str(key), repr(ring), str(ring), f"{key}", f"{ring!r}", repr([key]), repr({1: key})):
        assert not any(form in text for form in _forms(key.reveal())), text
    assert repr(key) == "SecretKey(<redacted>)"
    for obj in (key, ring):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
