"""server.workers = 2: two daemon processes share the port and follow each other through the store."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import SubprocessDaemon, poll, random_encodings

from faceseal.client import FaceSealClientError

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def audited_methods(directory: Path) -> list[str]:
    return [
        json.loads(line)["method"].rsplit("/", 1)[-1]
        for path in sorted(directory.glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_two_workers_share_the_port_and_each_others_writes(subprocess_daemon: SubprocessDaemon) -> None:
    dev = subprocess_daemon.dev
    dev.set_server(workers=2)
    dev.edit_config(lambda c: c["store"].update(follow_interval_seconds=0.1))
    subprocess_daemon.start()
    workers = children(subprocess_daemon.pid)
    assert len(workers) == 2, "the supervisor should run exactly two worker processes"
    # The port answers once one worker serves; the other may still be unsealing.
    poll("both workers to unseal", lambda: subprocess_daemon.log().count('"msg":"unsealed"') == 2 or None)

    alice = random_encodings(1, seed=21)[0]
    with dev.client(subprocess_daemon.target, "enroller") as enroller:
        enroller.enroll("alice", alice)
    # Fresh connections land on either worker; every one must find alice within 2 s.
    for _ in range(16):
        with dev.client(subprocess_daemon.target, "gateway") as gateway:
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    assert gateway.match("alice", alice).match
                    break
                except FaceSealClientError:
                    assert time.monotonic() < deadline, "a worker did not see the enrollment within 2 s"
                    time.sleep(0.05)

    # Each worker keeps its own audit chain; both served Match calls.
    audit = dev.data_dir / "audit"
    per_worker = {w: audited_methods(audit / f"worker-{w}") for w in (0, 1)}
    assert all("Match" in methods for methods in per_worker.values()), per_worker
    assert sum(methods.count("Enroll") for methods in per_worker.values()) == 1

    stopped_cleanly(subprocess_daemon)
    assert not [
        pid
        for pid in workers
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    ]


def stopped_cleanly(daemon: SubprocessDaemon) -> None:
    """SIGTERM the supervisor; it must exit 0 (every worker drained), else show why."""
    code = daemon.stop(timeout=30)
    assert code == 0, f"exit code {code}; the log:\n{daemon.log()}"


def allowed_cpus(pid: int) -> set[str]:
    """The CPU list of every thread of ``pid`` (each as /proc prints it, e.g. "1")."""
    found = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found.add(line.split(":", 1)[1].strip())
    return found


def test_pinned_workers_each_run_every_thread_on_a_cpu_of_their_own(subprocess_daemon: SubprocessDaemon) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to pin two workers apart")
    dev = subprocess_daemon.dev
    dev.set_server(workers=2, pin_workers=True)
    subprocess_daemon.start()
    workers = children(subprocess_daemon.pid)
    assert len(workers) == 2
    # The port answers as soon as one worker serves; wait until both have pinned themselves
    # (before building anything: grpc's threads, started later, inherit the affinity).
    poll(
        "both workers to pin themselves",
        lambda: True if subprocess_daemon.log().count('"msg":"worker pinned"') == 2 else None,
    )
    alice = random_encodings(1, seed=22)[0]
    with dev.client(subprocess_daemon.target, "enroller") as enroller:
        enroller.enroll("alice", alice)
    pinned = [allowed_cpus(pid) for pid in workers]
    assert all(len(p) == 1 for p in pinned), f"every thread of a worker should share one CPU: {pinned}"
    assert {next(iter(p)) for p in pinned} == {str(cpus[0]), str(cpus[1])}
    stopped_cleanly(subprocess_daemon)


@pytest.mark.parametrize("moment", ["workers_importing", "workers_building"])
def test_a_stop_while_the_workers_are_still_starting_ends_everything_cleanly(
    subprocess_daemon: SubprocessDaemon, moment: str
) -> None:
    """systemd or an operator may stop the daemon at any moment, including the first second.

    A worker still importing has no handler yet; one building its store and keys has. Either
    way the supervisor must report a clean stop (0), not a worker error, and leave no worker.
    """
    dev = subprocess_daemon.dev
    dev.set_server(workers=2, pin_workers=True)
    subprocess_daemon.launch()
    workers = poll("two workers", lambda: w if len(w := children(subprocess_daemon.pid)) == 2 else None)
    if moment == "workers_building":
        # Pinning is the first thing a worker does after its handlers are in and its config read.
        poll(
            "both workers to start building",
            lambda: subprocess_daemon.log().count('"msg":"worker pinned"') == 2 or None,
        )
    stopped_cleanly(subprocess_daemon)
    assert '"msg":"worker exited; restarting"' not in subprocess_daemon.log()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_a_reload_while_the_workers_are_still_importing_is_applied_not_fatal(
    subprocess_daemon: SubprocessDaemon,
) -> None:
    """SIGHUP's default action ends a process. Passed on to a worker that has no handler yet,
    it must wait for the handler (the supervisor starts workers with it blocked), not end the
    worker and cost a restart."""
    dev = subprocess_daemon.dev
    dev.set_server(workers=2)
    subprocess_daemon.launch()
    poll("two workers", lambda: len(children(subprocess_daemon.pid)) == 2 or None)
    subprocess_daemon.send(signal.SIGHUP)
    poll("both workers to listen", lambda: subprocess_daemon.log().count('"msg":"listening"') == 2 or None)
    log = subprocess_daemon.log()
    assert log.count('"msg":"policy and certificates reloaded"') == 2, log
    assert '"msg":"worker exited; restarting"' not in log
    stopped_cleanly(subprocess_daemon)
