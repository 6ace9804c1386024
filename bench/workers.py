"""Match throughput with ``server.workers`` = 1 and 2, each with and without pinning every worker
process to a core of its own; the bare grpcio echo server (bench/echo_server.py) in one process
and in two pinned SO_REUSEPORT processes as the ceiling of the same gRPC stack.

* The daemon: ``faceseald serve`` on a scratch ``faceseald init --dev`` setup (128-d gallery,
  ``--subjects`` enrolled once; guard on with its per-caller request rate lifted; the
  decision-only dev ``gateway`` calls). With ``workers = 2`` the supervisor starts two worker
  processes sharing the port (SO_REUSEPORT); the kernel hashes each new connection to one.
* Pinning: every thread of a worker (``/proc/PID/task/*``, ``os.sched_setaffinity``) goes to one
  core: with one worker, CPU 0; with two, worker 0 to CPU 0 and worker 1 to CPU 1. The
  supervisor (idle) and the load generator are not pinned: the load generator is a process of
  its own that the scheduler places on whichever core has room, so on this 2-core machine it
  always shares a core with a worker. Unpinned, every process floats over both cores.
* The load: bench/loadgen (C++), ``--channels`` TLS connections (several, so that both workers
  get some: the table shows how many each got), ``--concurrency`` calls outstanding, closed loop.

    .venv/bin/python bench/workers.py                    # 2 rounds, 15 s per configuration
    .venv/bin/python bench/workers.py --rounds 1 --seconds 5 --no-echo

Every server (a 1-worker daemon, a 2-worker daemon, the echo servers) is started once and stays
up; the configurations take turns within each round, pinning or unpinning the workers before
their window, and the summary takes the median over the rounds.

Target (issue "Scale"): 2 pinned workers >= 1.8x the QPS of one worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from match_vs_echo import (  # bench/ is sys.path[0]
    Load,
    Result,
    Server,
    Setup,
    build_loadgen,
    enroll_and_write_requests,
    free_port,
    machine,
    make_setup,
    measure,
    pin,
    scratch,
    start_daemon,
    start_echo,
)


def affinity(pid: int) -> str:
    """The CPU sets of ``pid``'s threads, e.g. "{0} x23" (all 23 threads on CPU 0)."""
    masks: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, OSError):
            key = "{" + ",".join(map(str, sorted(os.sched_getaffinity(int(task.name))))) + "}"
            masks[key] = masks.get(key, 0) + 1
    return ", ".join(f"{mask} x{n}" for mask, n in sorted(masks.items()))


def connections(pids: Sequence[int], port: int) -> list[int]:
    """Established TCP connections on ``port`` held by each of ``pids`` (from /proc/net/tcp*)."""
    inodes: dict[str, int] = {}
    for tcp in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(tcp).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":
                    inodes[f[9]] = 0
    out = []
    for pid in pids:
        n = 0
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        n += 1
        out.append(n)
    return out


def run(
    label: str, server: Server, setup: Setup, load: Load, port: int, pinned: bool, target: str | None = None
) -> tuple[str, Result, list[int], str]:
    workers = server.worker_pids()
    every = set(range(os.cpu_count() or 1))
    for i, pid in enumerate(workers):
        pin(pid, {i % len(every)} if pinned else every)
    if pinned:
        sharing = "; ".join(f"worker {i} on {affinity(pid)}" for i, pid in enumerate(workers))
        sharing += "; load generator unpinned"
    else:
        sharing = "unpinned: every process floats over both cores"

    def during() -> object:
        return connections(workers, port)

    result = measure(label, server, setup, load, target, during=during)
    conns = list(result.raw["during"])  # type: ignore[call-overload]
    return label, result, conns, sharing


def line(label: str, r: Result, conns: list[int]) -> str:
    per = " + ".join(f"{c:.2f}" for c in r.per_worker_cores)
    bad = f"  errors {r.errors} unexpected {r.unexpected}" if r.errors or r.unexpected else ""
    return (
        f"  {label:<28} {r.qps:7.0f} QPS  p50 {r.p50_us / 1e3:6.2f} ms  p99 {r.p99_us / 1e3:6.2f} ms  "
        f"server {r.server_cpu_us:6.1f} us/call, worker cores {per}, connections {'/'.join(map(str, conns))}  "
        f"loadgen {r.loadgen_cores:4.2f} cores ({r.loadgen_cpu_us:5.1f} us/call)  other {r.other_cores:4.2f}{bad}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all configurations (default 2)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per configuration (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up before each window (default 3)")
    parser.add_argument("--channels", type=int, default=8, help="TLS connections (default 8)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls outstanding (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="load generator threads (default 2)")
    parser.add_argument("--subjects", type=int, default=200, help="enrolled subjects (default 200)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each window wait up to this many seconds for other load to pause (default 30; 0: never)",
    )
    parser.add_argument("--no-echo", action="store_true", help="skip the echo-server ceiling")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 120 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 10 and args.quiet_wait <= 600):
        parser.error("keep it bounded: 0 < --seconds <= 120, --warmup <= 60, 1 <= --rounds <= 10, --quiet-wait <= 600")

    load = Load(
        build_loadgen(), args.channels, args.concurrency, args.threads, args.warmup, args.seconds, args.quiet_wait
    )
    print(f"machine: {machine()}")
    print(
        f"load: {load.channels} TLS connections, {load.concurrency} calls outstanding, {load.threads} loadgen "
        f"threads, {load.seconds:g} s per configuration after {load.warmup:g} s of warm-up"
    )
    rows: list[tuple[str, Result, list[int], str]] = []

    def show(r: tuple[str, Result, list[int], str]) -> None:
        rows.append(r)
        print(line(r[0], r[1], r[2]), flush=True)
        print(f"  {'':<28} cores: {r[3]}", flush=True)

    # Every server is started once and stays up (idle between its windows); the configurations
    # take turns in each round, so a change of other load on the machine hits them all alike.
    configs: list[tuple[str, Server, Setup, int, bool, str | None]] = []
    with contextlib.ExitStack() as stack:
        for workers in (1, 2):
            setup = make_setup(stack.enter_context(scratch("faceseal-bench-workers-")), workers=workers)
            daemon = start_daemon(setup, workers)
            stack.callback(daemon.stop)
            enroll_and_write_requests(setup, args.subjects)
            for pinned in (False, True):
                label = f"ours, {workers} worker{'s' if workers > 1 else ''}, {'pinned' if pinned else 'unpinned'}"
                configs.append((label, daemon, setup, setup.port, pinned, None))
        if not args.no_echo:
            for processes, pinned in ((1, False), (2, True)):
                port = free_port()
                echo = start_echo(setup, port, processes)
                stack.callback(echo.stop)
                plural = "es" if processes > 1 else ""
                label = f"echo, {processes} process{plural}, {'pinned' if pinned else 'unpinned'}"
                configs.append((label, echo, setup, port, pinned, f"127.0.0.1:{port}"))
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            for label, server, setup, port, pinned, target in configs:
                show(run(label, server, setup, load, port, pinned, target))

    by_label: dict[str, list[Result]] = {}
    for label, r, _, _ in rows:
        by_label.setdefault(label, []).append(r)
    print(f"\nmedian of {args.rounds} round(s)")
    for label, results in by_label.items():
        print(
            f"  {label:<28} {statistics.median(r.qps for r in results):7.0f} QPS  "
            f"p99 {statistics.median(r.p99_us for r in results) / 1e3:6.2f} ms  "
            f"server {statistics.median(r.server_cpu_us for r in results):6.1f} us/call  "
            f"other {statistics.median(r.other_cores for r in results):4.2f} cores"
        )
    qps = {label: statistics.median(r.qps for r in results) for label, results in by_label.items()}
    print("\nscaling (ratios of the median QPS)")
    ratios: list[tuple[str, str, str, Callable[[float], str]]] = [
        ("2 pinned / 1 pinned", "ours, 2 workers, pinned", "ours, 1 worker, pinned", lambda x: _target(x, 1.8)),
        ("2 pinned / 1 unpinned", "ours, 2 workers, pinned", "ours, 1 worker, unpinned", lambda x: _target(x, 1.8)),
        ("2 unpinned / 1 unpinned", "ours, 2 workers, unpinned", "ours, 1 worker, unpinned", lambda x: ""),
        ("echo: 2 pinned / 1 unpinned", "echo, 2 processes, pinned", "echo, 1 process, unpinned", lambda x: ""),
        ("ours 2 pinned / echo 2 pinned", "ours, 2 workers, pinned", "echo, 2 processes, pinned", lambda x: ""),
    ]
    for name, a, b, verdict in ratios:
        if a in qps and b in qps and qps[b]:
            x = qps[a] / qps[b]
            print(f"  {name:<30} {x:5.2f}x  {verdict(x)}".rstrip())
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "rows": [
                        {"label": label, "connections": c, "cores": sharing, **r.__dict__}
                        for label, r, c, sharing in rows
                    ],
                },
                indent=1,
            ),
            encoding="utf-8",
        )
    return 0


def _target(x: float, bound: float) -> str:
    return f"target >= {bound:g}x: {'met' if x >= bound else 'MISSED'}"


if __name__ == "__main__":
    sys.exit(main())
