"""Load soak: many concurrent clients against one ``faceseald serve``, watching for errors and leaks.

    .venv/bin/python bench/soak.py                # 64 clients, 5 s warm-up, 60 s measured
    .venv/bin/python bench/soak.py --seconds 10   # a quick run

What it does, loopback only and bounded in time and in calls:

1. writes a throw-away dev setup (``init_dev``) into a temp directory, with the abuse guard's
   per-caller rate and budgets raised so that the guard does not refuse a load test (lockouts stay
   on, and no probe here fails, so none triggers);
2. starts the daemon as a child process and waits for it to report SERVING;
3. runs ``--clients`` client threads (spread over ``--procs`` processes, so the clients' own GIL
   is not the bottleneck), each with its own mutual-TLS connections (enroller and gateway
   certificates) and its own subjects, enrolled first. Then each loops over a mix of Enroll
   (re-enrolling one of its subjects with ``replace``, so the gallery keeps its size), Match (a
   probe near the subject's current encoding) and Identify (the same, top 3);
4. samples the daemon's resident memory (VmRSS in /proc/PID/status) every second;
5. stops the daemon with SIGTERM, verifies its audit chain, and prints a summary.

Exit status 0 only if every call ended OK with the right answer (Match says match, Identify
ranks the subject first), the daemon stayed up and drained cleanly, the audit chain verifies, and
resident memory grew by less than ``--max-growth`` (10 %) between the first and the last quarter
of the measured window. The warm-up is not measured: it is where the allocator, gRPC and the
gallery reach their working size; a leak shows as growth that continues after it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FACESEALD = Path(sys.executable).parent / "faceseald"
DIM = 128  # the dev config's default gallery
METHODS = ("Enroll", "Match", "Identify")
NOISE = 0.05  # probe distance from the enrolled encoding; the threshold is 0.6


# ------------------------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value).__name__)


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    out = "".join(f"{k} = {_toml_value(v)}\n" for k, v in data.items() if not isinstance(v, dict))
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            out += f"\n[{name}]\n" + dump_toml(value, name)
    return out


def make_setup(directory: Path, port: int) -> Path:
    from faceseal.server.config import load_config
    from faceseal.server.devinit import init_dev

    init_dev(directory, listen=f"127.0.0.1:{port}")
    path = directory / "faceseal.toml"
    config = tomllib.loads(path.read_text(encoding="utf-8"))
    config.setdefault("metrics", {})["listen"] = "127.0.0.1:0"
    config.setdefault("guard", {}).update(
        caller_rate=1_000_000.0, identify_per_hour=1_000_000_000, caller_failures_per_hour=1_000_000_000
    )
    path.write_text(dump_toml(config), encoding="utf-8")
    load_config(path)  # the edit must leave a valid config
    return path


def health(dev_dir: Path, target: str, timeout: float = 1.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.secure_channel(target, credentials(dev_dir, "admin")) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as err:
            return str(err.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def credentials(dev_dir: Path, profile: str) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=(dev_dir / "ca.crt").read_bytes(),
        private_key=(dev_dir / "clients" / f"{profile}.key").read_bytes(),
        certificate_chain=(dev_dir / "clients" / f"{profile}.crt").read_bytes(),
    )


def read_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and Threads of a process, from /proc/PID/status; {} once it is gone."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        # utime + stime, in clock ticks (fields 14 and 15; the command name may hold spaces)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_ticks"] = int(fields[11]) + int(fields[12])
    return out


# ------------------------------------------------------------------------------------ clients


@dataclass
class Tally:
    """What one client (or, merged, all of them) saw in the measured window."""

    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    wrong: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    calls: int = 0

    def merge(self, other: Tally) -> None:
        self.codes.update(other.codes)
        for method, values in other.latencies.items():
            self.latencies[method].extend(values)
        self.wrong.update(other.wrong)
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])
        self.calls += other.calls

    def note(self, what: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(what)


def _unit(rng: Any) -> Any:
    import numpy as np

    v = rng.standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _near(rng: Any, encoding: Any) -> list[float]:
    import numpy as np

    step = rng.standard_normal(DIM)
    moved = encoding.astype(np.float64) + step * (NOISE / float(np.linalg.norm(step)))
    return [float(x) for x in moved.astype(np.float32)]


def client_thread(
    number: int, params: dict[str, Any], ready: threading.Barrier, times: Any, tally: Tally, failed: list[str]
) -> None:
    """One client: enroll its subjects, wait for the start, then loop over the mix until the end."""
    import grpc
    import numpy as np

    from faceseal.v1 import faceseal_pb2 as pb
    from faceseal.v1 import faceseal_pb2_grpc as pb_grpc

    dev_dir, target = Path(params["dev_dir"]), params["target"]
    rng = np.random.default_rng(1000 + number)
    enroll_channel = grpc.secure_channel(target, credentials(dev_dir, "enroller"))
    gateway_channel = grpc.secure_channel(target, credentials(dev_dir, "gateway"))
    try:
        enroller = pb_grpc.FaceSealServiceStub(enroll_channel)
        gateway = pb_grpc.FaceSealServiceStub(gateway_channel)
        pool = {f"c{number}-s{i}": _unit(rng) for i in range(params["subjects"])}
        try:
            for subject, encoding in pool.items():
                enroller.Enroll(
                    pb.EnrollRequest(subject_id=subject, encoding=encoding.tolist(), replace=True), timeout=30
                )
        except grpc.RpcError as err:
            failed.append(f"client {number}: enrolling its subjects failed: {err.code().name}")
            return
        finally:
            ready.wait()  # every client of this process has its subjects (or gave up)
        while times[0] == 0.0:
            time.sleep(0.01)
        measure_from, end = times[1], times[2]
        subjects = sorted(pool)
        p_enroll, p_match = params["mix"][0], params["mix"][0] + params["mix"][1]
        calls = 0
        while (now := time.monotonic()) < end and calls < params["max_calls"]:
            calls += 1
            subject = subjects[int(rng.integers(len(subjects)))]
            r = float(rng.random())
            method = "Enroll" if r < p_enroll else "Match" if r < p_match else "Identify"
            new = _unit(rng) if method == "Enroll" else None
            start = time.monotonic()
            code, outcome = "OK", ""
            try:
                if new is not None:
                    request = pb.EnrollRequest(subject_id=subject, encoding=new.tolist(), replace=True)
                    response: Any = enroller.Enroll(request, timeout=params["timeout"])
                    pool[subject] = new
                    if response.template_count != 1:
                        outcome = f"Enroll with replace left {response.template_count} templates"
                elif method == "Match":
                    request = pb.MatchRequest(subject_id=subject, probe=_near(rng, pool[subject]))
                    response = gateway.Match(request, timeout=params["timeout"])
                    if not response.match:
                        outcome = "Match refused a genuine probe"
                else:
                    request = pb.IdentifyRequest(probe=_near(rng, pool[subject]), top_k=3)
                    response = gateway.Identify(request, timeout=params["timeout"])
                    if not response.candidates or response.candidates[0].subject_id != subject:
                        outcome = "Identify did not rank the subject first"
            except grpc.RpcError as err:
                code = err.code().name
            elapsed = time.monotonic() - start
            if now < measure_from:
                continue
            tally.calls += 1
            tally.codes[method, code] += 1
            if code == "OK":
                tally.latencies[method].append(elapsed)
            if outcome:
                tally.wrong[method] += 1
                tally.note(f"client {number}: {outcome}")
    finally:
        enroll_channel.close()
        gateway_channel.close()


def worker(index: int, clients: list[int], params: dict[str, Any], ready_q: Any, times: Any, result_q: Any) -> None:
    """One process running ``clients`` as threads; puts its merged Tally on ``result_q``."""
    barrier = threading.Barrier(len(clients) + 1)
    tallies = [Tally() for _ in clients]
    failed: list[str] = []
    threads = [
        threading.Thread(target=client_thread, args=(n, params, barrier, times, t, failed), daemon=True)
        for n, t in zip(clients, tallies, strict=True)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    ready_q.put((index, failed))
    for t in threads:
        t.join()
    merged = Tally()
    for t in tallies:
        merged.merge(t)
    result_q.put((index, merged.codes, dict(merged.latencies), merged.wrong, merged.examples, merged.calls))


# -------------------------------------------------------------------------------------- main


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window (default 60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured load before it (default 5)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--procs", type=int, default=min(4, os.cpu_count() or 1), help="client processes")
    parser.add_argument("--subjects", type=int, default=8, help="subjects per client (default 8)")
    parser.add_argument("--mix", default="20,50,30", help="percent Enroll,Match,Identify (default 20,50,30)")
    parser.add_argument("--max-calls", type=int, default=2_000_000, help="cap on calls per client")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds")
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth (default 0.10)")
    parser.add_argument("--keep", action="store_true", help="keep the temp setup, log and database")
    args = parser.parse_args(argv)
    mix = [float(x) for x in args.mix.split(",")]
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        parser.error("--mix takes three non-negative percentages")
    if not 1 <= args.clients <= 1024 or not 0 < args.seconds <= 3600 or not 1 <= args.procs <= args.clients:
        parser.error("--clients 1..1024, --seconds 0..3600, --procs 1..clients")
    if not FACESEALD.is_file():
        print(f"soak: {FACESEALD} is missing; install the package into this venv first", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="faceseal-soak-"))
    dev_dir, log_path = work / "dev", work / "faceseald.log"
    port = free_port()
    config = make_setup(dev_dir, port)
    target = f"127.0.0.1:{port}"
    problems: list[str] = []
    with log_path.open("ab") as log:
        daemon = subprocess.Popen(
            [str(FACESEALD), "serve", "--config", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    procs: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while health(dev_dir, target) != "SERVING":
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(f"soak: the daemon did not start; its log:\n{log_path.read_text()}", file=sys.stderr)
                return 2
            time.sleep(0.1)

        ctx = mp.get_context("spawn")  # no fork after gRPC started in this process
        ready_q, result_q = ctx.Queue(), ctx.Queue()
        times = ctx.Array("d", 3)  # go, measure from, end (time.monotonic, shared by every process)
        params = {
            "dev_dir": str(dev_dir),
            "target": target,
            "subjects": args.subjects,
            "mix": [m / sum(mix) for m in mix],
            "max_calls": args.max_calls,
            "timeout": args.timeout,
        }
        groups = [list(range(args.clients))[i :: args.procs] for i in range(args.procs)]
        procs = [
            ctx.Process(target=worker, args=(i, g, params, ready_q, times, result_q), name=f"soak-clients-{i}")
            for i, g in enumerate(groups)
        ]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for _ in procs:
            _, failed = ready_q.get(timeout=120)
            problems.extend(failed)
        setup_seconds = time.monotonic() - t0

        go = time.monotonic()
        times[1], times[2] = go + args.warmup, go + args.warmup + args.seconds
        times[0] = go
        samples: list[tuple[float, dict[str, int]]] = []
        while (now := time.monotonic()) < times[2]:
            status = read_status(daemon.pid)
            if daemon.poll() is not None:
                problems.append(f"the daemon exited with {daemon.returncode} during the soak")
                break
            if now >= times[1]:
                samples.append((now - times[1], status))
            time.sleep(max(0.0, min(1.0, times[2] - time.monotonic())))
        samples.append((time.monotonic() - times[1], read_status(daemon.pid)))

        total = Tally()
        for _ in procs:
            try:
                _, codes, latencies, wrong, examples, calls = result_q.get(timeout=args.timeout + 60)
            except queue.Empty:
                problems.append("a client process did not report back")
                break
            part = Tally(codes, defaultdict(list, latencies), wrong, examples, calls)
            total.merge(part)
        for p in procs:
            p.join(30)

        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait(10)
                problems.append("the daemon did not drain within 60 s of SIGTERM")
            if code != 0:
                problems.append(f"the daemon exited with {code} after SIGTERM")
        verify = subprocess.run(
            [str(FACESEALD), "audit", "verify", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if verify.returncode != 0:
            problems.append(f"audit verify exited {verify.returncode}: {verify.stdout.strip()}")

        return report(args, total, samples, setup_seconds, verify.stdout.strip(), problems)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if args.keep:
            print(f"kept {work} (log: {log_path})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace,
    total: Tally,
    samples: list[tuple[float, dict[str, int]]],
    setup_seconds: float,
    audit: str,
    problems: list[str],
) -> int:
    seconds = args.seconds
    print(
        f"\nfaceseal soak: {args.clients} clients in {args.procs} processes, {args.warmup:g} s warm-up, "
        f"{seconds:g} s measured (setup {setup_seconds:.1f} s), loopback mTLS"
    )
    print(f"\n{'method':<10} {'code':<20} {'calls':>9} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for (method, code), n in sorted(total.codes.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        lat = total.latencies.get(method, []) if code == "OK" else []
        p50, p99 = percentile(lat, 0.50) * 1e3, percentile(lat, 0.99) * 1e3
        top = max(lat) * 1e3 if lat else float("nan")
        print(f"{method:<10} {code:<20} {n:>9} {n / seconds:>9.1f} {p50:>8.1f} {p99:>8.1f} {top:>8.1f}")
    print(f"{'all':<10} {'':<20} {total.calls:>9} {total.calls / seconds:>9.1f}")

    unexpected = sum(n for (_, code), n in total.codes.items() if code != "OK")
    wrong = sum(total.wrong.values())
    rss = [(t, s["VmRSS"]) for t, s in samples if "VmRSS" in s]
    growth = float("nan")
    if len(rss) >= 4:
        quarter = seconds / 4
        first = [kib for t, kib in rss if t <= quarter] or [rss[0][1]]
        last = [kib for t, kib in rss if t >= seconds - quarter] or [rss[-1][1]]
        growth = statistics.mean(last) / statistics.mean(first) - 1
        print(
            f"\ndaemon RSS (MiB): first quarter mean {statistics.mean(first) / 1024:.1f}, last quarter mean "
            f"{statistics.mean(last) / 1024:.1f}, min {min(k for _, k in rss) / 1024:.1f}, "
            f"max {max(k for _, k in rss) / 1024:.1f} ({len(rss)} samples): growth {growth * 100:+.1f} %"
        )
        tenths = [min(rss, key=lambda item: abs(item[0] - seconds * i / 10))[1] / 1024 for i in range(11)]
        print("daemon RSS every tenth of the window (MiB): " + " ".join(f"{m:.1f}" for m in tenths))
        live = [s for _, s in samples if s]
        ticks = (live[-1].get("cpu_ticks", 0) - live[0].get("cpu_ticks", 0)) / os.sysconf("SC_CLK_TCK")
        print(
            f"daemon threads {live[0].get('Threads')} -> {live[-1].get('Threads')}, open fds {live[0].get('fds')} -> "
            f"{live[-1].get('fds')}, CPU {ticks:.1f} s in {seconds:g} s ({ticks / seconds * 100:.0f} % of one core)"
        )
    else:
        problems.append(f"too few memory samples ({len(rss)})")
    print(f"audit: {audit}")
    print(f"unexpected status codes: {unexpected}; wrong answers: {wrong}")
    for example in total.examples:
        print(f"  {example}")

    if unexpected:
        problems.append(f"{unexpected} calls ended with a status other than OK")
    if wrong:
        problems.append(f"{wrong} calls answered wrongly")
    if not growth < args.max_growth:  # NaN fails too
        problems.append(f"resident memory grew {growth * 100:.1f} % (limit {args.max_growth * 100:.0f} %)")
    if total.calls == 0:
        problems.append("no calls were measured")
    if problems:
        print("\nFAIL:\n  " + "\n  ".join(problems))
        return 1
    print("\nPASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
