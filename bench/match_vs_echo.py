"""Match through the whole daemon against a bare grpcio echo server: server CPU time per call
(the primary figure), QPS, p50 and p99, with the same load generator, message sizes, mutual TLS
setup and concurrency, in the same run.

* ours: ``faceseald serve`` on a scratch ``faceseald init --dev`` setup (128-d gallery, the
  ``--subjects`` enrolled), the abuse guard on but its per-caller request rate lifted, a
  decision-only caller (the dev ``gateway``): interceptors (metrics, auth + policy), guard
  (store reads), the in-memory Match, one audit record per call;
* echo: ``bench/echo_server.py`` built from the same faceseal.toml (same certificates, client
  certificate required, same thread pool, channel arguments and concurrency limit) returning a
  constant ``MatchResponse(match=True)``, which is byte for byte the daemon's answer;
* the load: ``bench/loadgen`` (C++, grpc++ from Debian's libgrpc++-dev; built on first use into
  build/loadgen) sends the same pre-serialized MatchRequests (genuine probes: each a noisy copy of
  an enrolled encoding, 0.1 away) in a closed loop over ``--channels`` TLS connections with
  ``--concurrency`` calls outstanding, and reports its own CPU time (getrusage).

Server CPU is utime + stime of the server process (all its threads) from /proc/PID/stat, read
when the load generator opens and closes its measured window, divided by the calls completed in
the window. Rounds alternate ours / echo (both servers stay up, the idle one costs nothing
measurable); the table shows the median of the rounds. Nothing is pinned unless ``--pin`` (each
server on CPU 0, the load generator on CPU 1): the server and the load generator share the two
cores as the scheduler likes. The machine-wide CPU not spent by the server or the load generator
during each window is shown as "other" (other sessions' work on a shared machine disturbs QPS
and latency far more than CPU per call); ``--quiet-wait`` holds each window back, for a while,
until such work pauses.

Also printed: ``--perf``, where each server's CPU went in round 1 (``perf record`` of every CPU,
the server's samples by shared library, in µs per call; needs Debian's ``linux-perf`` and root),
and, unless ``--no-breakdown``, the single-threaded in-process cost of each step of a Match.

    .venv/bin/python bench/match_vs_echo.py                 # 3 rounds of 15 s each
    .venv/bin/python bench/match_vs_echo.py --guard-off --perf --pin
    .venv/bin/python bench/match_vs_echo.py --rounds 1 --seconds 5

Targets (issue "Scale"): server CPU per call <= 1.1x echo's, QPS >= 0.9x, p99 <= 1.2x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceseal.client import AdminClient, FaceSealClient
from faceseal.v1 import faceseal_pb2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FACESEALD = Path(sys.executable).parent / "faceseald"
MATCH = "/faceseal.v1.FaceSealService/Match"
ANSWER_HEX = faceseal_pb2.MatchResponse(match=True).SerializeToString().hex()  # "0801"
TICK = os.sysconf("SC_CLK_TCK")
DIM = 128


# ------------------------------------------------------------------------------- /proc counters


def proc_cpu(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far, in seconds (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every live thread of ``pid`` so far."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for line in (task / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
    return total


def pin(pid: int, cpus: set[int]) -> int:
    """Restrict every thread of ``pid`` to ``cpus``; returns how many threads there were. Threads
    started later inherit the mask of the thread that starts them, which is set too."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)
            count += 1
    return count


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def machine_busy() -> float:
    """CPU seconds all cores spent on anything but idle and iowait (steal included), so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


PERF_HZ = 499


def perf_start(seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """``perf record`` of every CPU for ``seconds`` (no call graphs), or None without perf."""
    try:
        return subprocess.Popen(
            ["perf", "record", "-F", str(PERF_HZ), "-a", "-o", str(out), "--", "sleep", f"{seconds:g}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None


def perf_by_library(data: Path, pids: Sequence[int]) -> dict[str, float]:
    """CPU seconds of the samples taken in ``pids`` (any thread), by shared object."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "pid,ip,dso"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    ).stdout
    wanted = {str(p) for p in pids}
    by: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split(None, 2)  # "PID IP (DSO)"
        if len(parts) != 3 or parts[0] not in wanted:
            continue
        dso = parts[2].strip().strip("()").rsplit("/", 1)[-1]
        dso = dso.split(".cpython-")[0].split(".so")[0] or "?"
        by[dso] = by.get(dso, 0.0) + 1.0 / PERF_HZ
    return by


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Before a window, while our servers idle: wait (at most ``max_wait`` seconds) until the
    machine's busy CPU over one second is below ``threshold`` cores, i.e. other work on a shared
    machine has paused. Returns the busy cores last seen (the window runs either way)."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(1.0)
        busy = (machine_busy() - b0) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine() -> str:
    import grpc

    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {os.uname().release}, Python {sys.version.split()[0]}, "
        f"grpcio {grpc.__version__}, loadgen on grpc++ {loadgen_grpc_version()}"
    )


def loadgen_grpc_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["pkg-config", "--modversion", "grpc++"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    return "?"


# ------------------------------------------------------------------------------------ the setup


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_loadgen() -> Path:
    out = subprocess.run(
        ["bash", str(HERE / "loadgen" / "build.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"building the load generator failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class Setup:
    """A scratch dev directory: config, PKI, the enrolled subjects' probes as a request file."""

    directory: Path
    port: int
    requests: Path = field(init=False)

    @property
    def config(self) -> Path:
        return self.directory / "faceseal.toml"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_files(self, profile: str = "gateway") -> tuple[Path, Path, Path]:
        d = self.directory
        return d / "ca.crt", d / "clients" / f"{profile}.crt", d / "clients" / f"{profile}.key"


def make_setup(directory: Path, *, workers: int = 1, max_workers: int | None = None, guard: bool = True) -> Setup:
    """``init --dev`` on a free port, then :func:`configure`."""
    from faceseal.server.devinit import init_dev

    port = free_port()
    init_dev(directory, listen=f"127.0.0.1:{port}")
    setup = Setup(directory, port)
    (directory / "faceseal.toml.init").write_text(setup.config.read_text(encoding="utf-8"), encoding="utf-8")
    configure(setup, workers=workers, max_workers=max_workers, guard=guard)
    return setup


def configure(setup: Setup, *, workers: int = 1, max_workers: int | None = None, guard: bool = True) -> None:
    """Rewrite faceseal.toml from what ``init --dev`` wrote: ``server.workers`` (and
    ``server.max_workers`` if given), metrics on any free port (no clash with a running daemon),
    and the guard's per-caller request rate lifted (the benchmark measures the mechanism, not the
    policy; every other guard check stays on) or, with ``guard=False``, the guard off."""
    text = (setup.directory / "faceseal.toml.init").read_text(encoding="utf-8")
    out, section = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip()
        if section == "[metrics]" and line.startswith("listen ="):
            line = 'listen = "127.0.0.1:0"'
        out.append(line)
        if line == "[server]":
            out.append(f"workers = {workers}")
            if max_workers is not None:
                out.append(f"max_workers = {max_workers}")
    out += ["", "[guard]", "caller_rate = 1000000.0"] + ([] if guard else ["enabled = false"])
    setup.config.write_text("\n".join(out) + "\n", encoding="utf-8")


def enroll_and_write_requests(setup: Setup, subjects: int, seed: int = 7) -> None:
    """Enroll ``subjects`` random unit encodings (through the running daemon) and write one genuine
    probe per subject, serialized, to the load generator's request file."""
    rng = np.random.default_rng(seed)
    enc = rng.standard_normal((subjects, DIM)).astype(np.float32)
    enc /= np.linalg.norm(enc, axis=1, keepdims=True)
    noise = rng.standard_normal((subjects, DIM)).astype(np.float32)
    noise *= 0.1 / np.linalg.norm(noise, axis=1, keepdims=True)
    probes = enc + noise
    ids = [f"bench{i:05d}" for i in range(subjects)]
    with FaceSealClient.from_profile("enroller", dev_dir=setup.directory, target=setup.target, timeout=60) as c:
        c.bulk_enroll(list(zip(ids, enc, strict=True)))
    write_requests(setup, ids, probes)


def write_requests(setup: Setup, ids: Sequence[str], probes: np.ndarray) -> None:
    setup.requests = setup.directory / "match-requests.bin"
    with setup.requests.open("wb") as f:
        for subject, probe in zip(ids, probes, strict=True):
            body = faceseal_pb2.MatchRequest(subject_id=subject, probe=probe.tolist()).SerializeToString()
            f.write(struct.pack("<I", len(body)) + body)


def request_bytes(setup: Setup) -> int:
    data = setup.requests.read_bytes()
    return struct.unpack("<I", data[:4])[0]


# ----------------------------------------------------------------------------------- processes


@dataclass
class Server:
    name: str
    procs: list[subprocess.Popen[bytes]]
    log: Path

    def pids(self) -> list[int]:
        """Every process that serves: the started ones and their children (server.workers)."""
        out = []
        for p in self.procs:
            out.append(p.pid)
            out += children(p.pid)
        return out

    def worker_pids(self) -> list[int]:
        """The processes holding the listening socket: a supervisor's children, else the process."""
        out = []
        for p in self.procs:
            out += children(p.pid) or [p.pid]
        return out

    def cpu(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids())

    def switches(self) -> int:
        return sum(ctx_switches(pid) for pid in self.pids())

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def start_daemon(setup: Setup, workers: int = 1, deadline: float = 120.0) -> Server:
    """``faceseald serve``; returns once every worker has logged "listening" and "unsealed" and a
    Match answers."""
    log = setup.directory / "faceseald.log"
    log.write_bytes(b"")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(FACESEALD), "serve", "--config", str(setup.config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    server = Server("daemon", [proc], log)
    try:
        start = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"faceseald exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
            msgs = [x.get("msg") for x in lines]
            if msgs.count("listening") >= workers and msgs.count("unsealed") >= workers:
                with AdminClient.from_profile("admin", dev_dir=setup.directory, target=setup.target, timeout=5) as a:
                    if a.health(timeout=5) == "SERVING":
                        break
            if time.monotonic() - start > deadline:
                raise RuntimeError(f"the daemon did not serve within {deadline:g} s")
            time.sleep(0.05)
        while len(server.worker_pids()) < workers:
            time.sleep(0.05)
        return server
    except BaseException:
        server.stop()
        raise


def start_echo(setup: Setup, port: int, processes: int = 1) -> Server:
    """``processes`` copies of bench/echo_server.py on ``port`` (SO_REUSEPORT when more than one)."""
    log = setup.directory / "echo.log"
    procs = []
    try:
        for _ in range(processes):
            cmd = [sys.executable, str(HERE / "echo_server.py"), "--config", str(setup.config)]
            cmd += ["--listen", f"127.0.0.1:{port}"] + (["--reuseport"] if processes > 1 else [])
            with log.open("ab") as err:
                p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline().decode()  # "listening PORT PID"
            if not line.startswith("listening"):
                raise RuntimeError(f"echo_server did not start:\n{log.read_text()[-3000:]}")
        return Server("echo", procs, log)
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise


# --------------------------------------------------------------------------------- measurement


@dataclass
class Load:
    binary: Path
    channels: int = 4
    concurrency: int = 16
    threads: int = 1
    warmup: float = 3.0
    seconds: float = 15.0
    quiet_wait: float = 0.0  # see wait_quiet
    pin: bool = False  # server processes on CPU 0, the load generator on CPU 1
    perf_dir: Path | None = None  # perf record the window into this folder


@dataclass
class Result:
    name: str
    calls: int
    seconds: float
    qps: float
    p50_us: float
    p99_us: float
    server_cpu_us: float  # per call
    server_cores: float  # server CPU seconds / wall seconds
    server_switches: float  # context switches of the server's threads per call
    loadgen_cpu_us: float  # per call, the load generator's own getrusage
    loadgen_cores: float
    other_cores: float  # machine-wide busy CPU not spent by the server or the load generator
    errors: dict[str, int]
    unexpected: int
    per_worker_cores: list[float]
    raw: dict[str, object]


def measure(
    name: str,
    server: Server,
    setup: Setup,
    load: Load,
    target: str | None = None,
    during: Callable[[], object] | None = None,
) -> Result:
    """One closed-loop window; CPU counters read at the load generator's phase lines. ``during``
    is called when the window opens; what it returns is kept as ``raw["during"]``."""
    before = wait_quiet(load.quiet_wait) if load.quiet_wait > 0 else float("nan")
    ca, cert, key = setup.client_files()
    cmd = [str(load.binary), "--target", target or setup.target, "--ca", str(ca), "--cert", str(cert)]
    cmd += ["--key", str(key), "--method", MATCH, "--requests", str(setup.requests), "--expect-hex", ANSWER_HEX]
    cmd += ["--channels", str(load.channels), "--concurrency", str(load.concurrency), "--threads", str(load.threads)]
    cmd += ["--warmup", str(load.warmup), "--seconds", str(load.seconds)]
    if load.pin:
        for pid in server.pids():
            pin(pid, {0})
        cmd = ["taskset", "-c", "1", *cmd]  # taskset execs the load generator: same PID, every thread on CPU 1
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = time.monotonic() + load.warmup + load.seconds + 60
    watchdog = threading.Timer(load.warmup + load.seconds + 60, proc.kill)  # a hung client cannot block the run
    watchdog.start()
    try:
        assert proc.stdout is not None
        workers = server.worker_pids()
        marks: dict[str, tuple[float, float, list[float], float, float, int]] = {}
        seen: object = None
        profiler: subprocess.Popen[bytes] | None = None
        perf_data = Path()
        for line in proc.stdout:
            word = line.strip()
            if word == "phase measure" and during is not None:
                seen = during()
            if word == "phase measure" and load.perf_dir is not None:
                perf_data = load.perf_dir / f"{name.split()[0]}-{time.monotonic_ns()}.data"
                profiler = perf_start(load.seconds - 0.5, perf_data)
            if word in ("phase measure", "phase done"):
                marks[word] = (
                    server.cpu(),
                    proc_cpu(proc.pid),
                    [proc_cpu(w) for w in workers],
                    machine_busy(),
                    time.monotonic(),
                    server.switches(),
                )
            elif word.startswith("{"):
                raw = json.loads(word)
                break
            if time.monotonic() > limit:
                raise RuntimeError("the load generator overran its time")
        else:
            raise RuntimeError(f"the load generator printed no result: {proc.stderr.read() if proc.stderr else ''}")
        proc.wait(timeout=max(1.0, limit - time.monotonic()))
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (s0, l0, w0, m0, t0, x0), (s1, l1, w1, m1, t1, x1) = marks["phase measure"], marks["phase done"]
    wall = t1 - t0
    raw["during"] = seen
    raw["busy_before"] = before
    if profiler is not None:
        profiler.wait(timeout=60)
        cpu = perf_by_library(perf_data, server.pids())
        raw["perf_us_per_call"] = {
            k: v / max(int(raw["calls"]), 1) * 1e6 * (load.seconds / (load.seconds - 0.5))
            for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
        }  # type: ignore[call-overload]
        perf_data.unlink(missing_ok=True)
    calls = int(raw["calls"])  # type: ignore[call-overload]
    return Result(
        name=name,
        calls=calls,
        seconds=float(raw["seconds"]),  # type: ignore[arg-type]
        qps=float(raw["qps"]),  # type: ignore[arg-type]
        p50_us=float(raw["p50_us"]),  # type: ignore[arg-type]
        p99_us=float(raw["p99_us"]),  # type: ignore[arg-type]
        server_cpu_us=(s1 - s0) / max(calls, 1) * 1e6,
        server_cores=(s1 - s0) / wall,
        server_switches=(x1 - x0) / max(calls, 1),
        loadgen_cpu_us=float(raw["cpu_us_per_call"]),  # type: ignore[arg-type]
        loadgen_cores=float(raw["cpu_seconds"]) / float(raw["seconds"]),  # type: ignore[arg-type]
        other_cores=max(0.0, ((m1 - m0) - (s1 - s0) - (l1 - l0)) / wall),
        errors={str(k): int(v) for k, v in dict(raw["errors"]).items()},  # type: ignore[call-overload]
        unexpected=int(raw["unexpected_responses"]),  # type: ignore[call-overload]
        per_worker_cores=[(b - a) / wall for a, b in zip(w0, w1, strict=True)],
        raw=raw,
    )


def row(r: Result) -> str:
    bad = ""
    if r.errors or r.unexpected:
        bad = f"  errors {r.errors} unexpected {r.unexpected}"
    return (
        f"  {r.name:<22} {r.qps:8.0f} QPS  p50 {r.p50_us / 1e3:6.2f} ms  p99 {r.p99_us / 1e3:6.2f} ms  "
        f"server {r.server_cpu_us:6.1f} us/call ({r.server_cores:4.2f} cores, {r.server_switches:4.1f} cs/call)  "
        f"loadgen {r.loadgen_cpu_us:5.1f} us/call ({r.loadgen_cores:4.2f} cores)  other {r.other_cores:4.2f} cores"
        f"{bad}"
    )


def median_of(results: Sequence[Result], key: Callable[[Result], float]) -> float:
    return statistics.median(key(r) for r in results)


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / "dev"


# ------------------------------------------------------------------- in-process breakdown


def breakdown(setup: Setup, subjects: int, calls: int = 2000) -> list[tuple[str, float]]:
    """Single-threaded CPU cost (µs, best of 3 passes of ``calls``) of each per-call step of a
    Match, run in this process on a Daemon built (not started) from the same setup: what a call
    costs before any thread or GIL contention. Reads some of the daemon's internals, so a step
    whose internals moved is skipped rather than failing the benchmark."""
    import uuid

    import grpc

    from faceseal.server import validation
    from faceseal.server.api.edge import Edge
    from faceseal.server.audit.log import AuditEntry
    from faceseal.server.config import load_config
    from faceseal.server.daemon import Daemon
    from faceseal.server.request import RequestInfo, bind, unbind

    daemon = Daemon(load_config(setup.config))
    out: list[tuple[str, float]] = []
    try:
        core = daemon.core
        core.unseal()
        policy = daemon.policies.policy
        caller = policy.resolve("spiffe://faceseal.dev/gateway")
        assert caller is not None
        raw = setup.requests.read_bytes()
        bodies, at = [], 0
        while at < len(raw):
            n = struct.unpack("<I", raw[at : at + 4])[0]
            bodies.append(raw[at + 4 : at + 4 + n])
            at += 4 + n
        requests = [faceseal_pb2.MatchRequest.FromString(b) for b in bodies]
        pem = (setup.directory / "clients" / "gateway.crt").read_bytes()
        state = core._state  # internals: the unsealed keyring and galleries
        assert state is not None
        gallery = state.galleries[core.resolve_gallery("") or "faces"]
        refs = [state.barrier.subject_ref(gallery.config.name, r.subject_id) for r in requests]
        vectors = [validation.vector(r.probe, DIM, "probe") for r in requests]
        k = len(requests)
        info = RequestInfo(caller, caller.identity, MATCH, uuid.uuid4().hex)

        # The edge as the daemon runs it (handlers wrapped once: metrics, certificate check from
        # the peer cache, policy, request context), around a servicer that does nothing.
        response = faceseal_pb2.MatchResponse(match=True)
        bare = grpc.unary_unary_rpc_method_handler(
            lambda _request, _context: response,
            request_deserializer=faceseal_pb2.MatchRequest.FromString,
            response_serializer=faceseal_pb2.MatchResponse.SerializeToString,
        )
        wrapped = Edge(daemon.metrics, daemon.authenticator).wrap(MATCH, bare)

        class Context:  # what the wrappers read off a grpc.ServicerContext
            def auth_context(self) -> dict[str, list[bytes]]:
                return {"x509_pem_cert": [pem]}

            def set_trailing_metadata(self, _metadata: object) -> None:
                pass

            def code(self) -> None:
                return None

        def edge(i: int) -> None:
            wrapped.unary_unary(requests[i], Context())

        def audit(i: int) -> None:
            core.audit.record(AuditEntry("OK", gallery.config.name, requests[i].subject_id, "match"))

        def core_match(i: int) -> None:
            core.match(caller, "", requests[i].subject_id, requests[i].probe)

        steps: list[tuple[str, Callable[[int], object]]] = [
            ("parse MatchRequest (both servers)", lambda i: faceseal_pb2.MatchRequest.FromString(bodies[i])),
            ("edge: metrics, cached peer + revocation/expiry, policy, request id and context", edge),
            ("validation.vector (probe -> float32, checks)", lambda i: validation.vector(requests[i].probe, DIM, "p")),
            (
                "subject_ref (HMAC-SHA256)",
                lambda i: state.barrier.subject_ref(gallery.config.name, requests[i].subject_id),
            ),
            (
                "guard.check_match + release (1 SQLite read)",
                lambda i: core.guard.check_match(caller, gallery.config.name, refs[i]).release(),
            ),
            ("gallery.match (lookup + L2)", lambda i: gallery.match(requests[i].subject_id, refs[i], vectors[i])),
            (
                "guard.record_match, success (no read)",
                lambda i: core.guard.record_match(caller, gallery.config, refs[i], vectors[i], True, None),
            ),
            ("audit.record (HMAC chain, JSON, write)", audit),
            ("core.match (the servicer's whole body)", core_match),
        ]
        token = bind(info)
        try:
            for name, fn in steps:
                best = float("inf")
                try:
                    for _ in range(3):
                        t = time.perf_counter()
                        for j in range(calls):
                            fn(j % k)
                        best = min(best, (time.perf_counter() - t) / calls)
                except Exception as exc:  # internals changed: report, do not fail the benchmark
                    print(f"  breakdown step {name!r} skipped: {type(exc).__name__}: {exc}")
                    continue
                out.append((name, best * 1e6))
        finally:
            unbind(token)
    finally:
        daemon.store.close()
        daemon.core.audit.close()
    return out


@dataclass
class Contender:
    name: str
    server: Server
    setup: Setup
    target: str
    results: list[Result] = field(default_factory=list)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/echo windows (default 3)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per run (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up before each window (default 3)")
    parser.add_argument("--channels", type=int, default=4, help="TLS connections (default 4)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls outstanding (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="load generator threads (default 1)")
    parser.add_argument("--subjects", type=int, default=200, help="enrolled subjects, one probe each (default 200)")
    parser.add_argument(
        "--max-workers", type=int, help="server.max_workers for both servers (default: the daemon's, 16)"
    )
    parser.add_argument("--guard-off", action="store_true", help="also measure a daemon with [guard] enabled = false")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each window wait up to this many seconds for other load to pause (default 30; 0: never)",
    )
    parser.add_argument("--pin", action="store_true", help="pin each server to CPU 0 and the load generator to CPU 1")
    parser.add_argument(
        "--perf", action="store_true", help="profile each server in round 1 with perf (CPU per call by library)"
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process per-step costs")
    parser.add_argument("--json", type=Path, help="also write every window's figures here")
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 120 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 10 and args.quiet_wait <= 600):
        parser.error("keep it bounded: 0 < --seconds <= 120, --warmup <= 60, 1 <= --rounds <= 10, --quiet-wait <= 600")

    binary = build_loadgen()
    load = Load(
        binary, args.channels, args.concurrency, args.threads, args.warmup, args.seconds, args.quiet_wait, args.pin
    )
    print(f"machine: {machine()}")
    print(
        f"load: {load.channels} TLS connections, {load.concurrency} calls outstanding, {load.threads} loadgen "
        f"thread(s); server thread pool: {args.max_workers or 16}; "
        + ("each server pinned to CPU 0, the load generator to CPU 1" if args.pin else "nothing pinned")
    )
    contenders: list[Contender] = []
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(scratch("faceseal-bench-mve-"))
        setup = make_setup(directory, max_workers=args.max_workers)
        daemon = start_daemon(setup)
        stack.callback(daemon.stop)
        enroll_and_write_requests(setup, args.subjects)
        contenders.append(Contender("ours (faceseald)", daemon, setup, setup.target))
        if args.guard_off:
            other = make_setup(
                stack.enter_context(scratch("faceseal-bench-mve-")), max_workers=args.max_workers, guard=False
            )
            unguarded = start_daemon(other)
            stack.callback(unguarded.stop)
            enroll_and_write_requests(other, args.subjects)
            contenders.append(Contender("ours, guard off", unguarded, other, other.target))
        echo_port = free_port()
        echo_server = start_echo(setup, echo_port)
        stack.callback(echo_server.stop)
        contenders.append(Contender("echo (bare grpcio)", echo_server, setup, f"127.0.0.1:{echo_port}"))
        print(
            f"MatchRequest {request_bytes(setup)} bytes, MatchResponse {len(ANSWER_HEX) // 2} bytes, {DIM}-d, "
            f"{args.subjects} subjects (one template each), genuine probes; daemon pid {daemon.procs[0].pid}",
            flush=True,
        )
        perf_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="faceseal-perf-"))
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", flush=True)
            load.perf_dir = Path(perf_dir) if args.perf and i == 0 else None
            for c in contenders:
                c.results.append(measure(c.name, c.server, c.setup, load, c.target))
                print(row(c.results[-1]), flush=True)
        steps: list[tuple[str, float]] = []
        if not args.no_breakdown:
            daemon.stop()  # the in-process copy opens the same store and binds the same port
            steps = breakdown(setup, args.subjects)

    metrics: list[tuple[str, Callable[[Result], float], str, str, float, bool]] = [
        ("server CPU per call", lambda r: r.server_cpu_us, "us", "<= 1.1x", 1.1, False),
        ("QPS", lambda r: r.qps, "", ">= 0.9x", 0.9, True),
        ("p50 latency", lambda r: r.p50_us / 1e3, "ms", "", 0.0, False),
        ("p99 latency", lambda r: r.p99_us / 1e3, "ms", "<= 1.2x", 1.2, False),
        ("server cores busy", lambda r: r.server_cores, "", "", 0.0, False),
        ("server ctx switches", lambda r: r.server_switches, "/call", "", 0.0, False),
        ("loadgen CPU per call", lambda r: r.loadgen_cpu_us, "us", "", 0.0, False),
        ("loadgen cores busy", lambda r: r.loadgen_cores, "", "", 0.0, False),
        ("other load (cores)", lambda r: r.other_cores, "", "", 0.0, False),
    ]
    ours, echo = contenders[0], contenders[-1]
    extra = contenders[1:-1]
    print(f"\nmedian of {args.rounds} round(s), {args.seconds:g} s each")
    head = "".join(f" {c.name[:16]:>16}" for c in extra)
    print(f"  {'':<22} {'ours':>16} {'echo':>16} {'ours/echo':>9}  {'target':<8}{head}")
    for label, key, unit, target, bound, higher in metrics:
        a, b = median_of(ours.results, key), median_of(echo.results, key)
        ratio = a / b if b else float("nan")
        verdict = ""
        if bound:
            verdict = "met" if (ratio >= bound if higher else ratio <= bound) else "MISSED"
        cells = "".join(
            f" {median_of(c.results, key):10.1f} ({median_of(c.results, key) / b if b else float('nan'):3.2f}x)"
            for c in extra
        )
        print(
            f"  {label:<22} {a:10.1f} {unit:<5} {b:10.1f} {unit:<5} {ratio:9.2f}  {target + ' ' + verdict:<15}{cells}"
        )
    profiles = {c.name: c.results[0].raw.get("perf_us_per_call") for c in contenders}
    if any(profiles.values()):
        libraries: list[str] = []
        for prof in profiles.values():
            for lib in prof or {}:  # type: ignore[attr-defined]
                if lib not in libraries:
                    libraries.append(lib)
        print("\nwhere the server's CPU went in round 1 (perf, us per call by library)")
        print(f"  {'':<28} {'ours':>8} {'echo':>8} {'ours-echo':>9}")
        for lib in libraries[:12]:
            a = (profiles[ours.name] or {}).get(lib, 0.0)  # type: ignore[attr-defined]
            b = (profiles[echo.name] or {}).get(lib, 0.0)  # type: ignore[attr-defined]
            print(f"  {lib:<28} {a:8.1f} {b:8.1f} {a - b:+9.1f}")
    if steps:
        print("\nin-process, one thread, no gRPC: CPU per Match step (best of 3 x 2000 calls)")
        for name, us in steps:
            print(f"  {name:<48} {us:7.1f} us")
    if args.json:
        everything = {c.name: [r.__dict__ for r in c.results] for c in contenders}
        args.json.write_text(
            json.dumps({"machine": machine(), "breakdown_us": dict(steps), **everything}, indent=1),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
