"""Bulk import rate: BulkEnroll (``faceseal import`` and the client's ``bulk_enroll``) against
serial unary Enroll through the same client, and against raw SQLite inserts of blobs of the
same sizes, all in the same run on the same disk.

The daemon runs as its own process (``faceseald serve`` on a scratch dev setup with a 128-d and a
512-d gallery), so client and server do not share an interpreter; the per-caller request rate of
the abuse guard is lifted, since this measures the mechanism, not the policy. Every store commit
is synchronous (WAL, synchronous=FULL) in the daemon, and so it is in the SQLite baseline.

    .venv/bin/python bench/import_rate.py                  # 20,000 items per dimension
    .venv/bin/python bench/import_rate.py --n 5000 --dims 128

Targets (issue "Scale"): bulk / unary >= 10x. ours / raw SQLite says how much of the raw insert
rate the daemon keeps after sealing, auditing, validating and serving over gRPC + TLS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from faceseal.client import AdminClient, FaceSealClient

F32 = npt.NDArray[np.float32]
FACESEALD = Path(sys.executable).parent / "faceseald"
FACESEAL = Path(sys.executable).parent / "faceseal"
DIMS = (128, 512)
BATCH = 500


# ---------------------------------------------------------------------------- a scratch daemon


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ScratchDaemon:
    """``faceseald serve`` as a child process on a fresh dev setup in ``directory``."""

    directory: Path
    proc: subprocess.Popen[bytes]
    target: str

    @property
    def db_path(self) -> Path:
        return self.directory / "data" / "faceseal.db"

    def client(self, profile: str = "enroller", timeout: float = 600.0) -> FaceSealClient:
        return FaceSealClient.from_profile(profile, dev_dir=self.directory, target=self.target, timeout=timeout)

    def admin(self) -> AdminClient:
        return AdminClient.from_profile("admin", dev_dir=self.directory, target=self.target, timeout=600.0)

    def rss_bytes(self) -> int:
        """Resident memory of the daemon process now (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def wait_serving(self, deadline: float) -> float:
        """Poll health until SERVING; return the seconds it took."""
        start = time.monotonic()
        with self.admin() as admin:
            while True:
                if self.proc.poll() is not None:
                    log = (self.directory / "faceseald.log").read_text(errors="replace")
                    raise RuntimeError(f"faceseald exited with {self.proc.returncode}:\n{log[-2000:]}")
                with contextlib.suppress(Exception):
                    if admin.health(timeout=2) == "SERVING":
                        return time.monotonic() - start
                if time.monotonic() - start > deadline:
                    raise RuntimeError(f"the daemon did not unseal within {deadline:g} s")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def setup_dev(directory: Path, dims: Sequence[int]) -> None:
    """``init --dev`` plus one euclidean gallery ``dNNN`` per dimension, and the guard's request
    rate and Identify budget lifted out of the way (a benchmark measures the mechanism)."""
    from faceseal.server.devinit import init_dev

    init_dev(directory, listen="127.0.0.1:0")
    config = directory / "faceseal.toml"
    text = config.read_text(encoding="utf-8")
    for dim in dims:
        text += f'\n[galleries.d{dim}]\ndimension = {dim}\nmetric = "euclidean"\nthreshold = 0.6\n'
    text += "\n[guard]\ncaller_rate = 1000000.0\nidentify_per_hour = 1000000000\n"
    config.write_text(text, encoding="utf-8")


def start_daemon(directory: Path, *, deadline: float = 600.0) -> tuple[ScratchDaemon, float]:
    """Start ``faceseald serve`` on a free port; return it and the seconds until SERVING."""
    config = directory / "faceseal.toml"
    text = config.read_text(encoding="utf-8")
    lines = []
    section = ""
    port = free_port()
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip()
        if line.startswith("listen ="):
            line = f'listen = "127.0.0.1:{port}"' if section == "[server]" else 'listen = "127.0.0.1:0"'
        lines.append(line)
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = (directory / "faceseald.log").open("ab")
    proc = subprocess.Popen(
        [str(FACESEALD), "serve", "--config", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    log.close()
    daemon = ScratchDaemon(directory, proc, f"127.0.0.1:{port}")
    try:
        return daemon, daemon.wait_serving(deadline)
    except BaseException:
        daemon.stop()
        raise


@contextlib.contextmanager
def scratch_daemon(dims: Sequence[int], workdir: Path | None = None) -> Iterator[ScratchDaemon]:
    with tempfile.TemporaryDirectory(prefix="faceseal-bench-", dir=workdir) as tmp:
        directory = Path(tmp) / "dev"
        setup_dev(directory, dims)
        daemon, _ = start_daemon(directory)
        try:
            yield daemon
        finally:
            daemon.stop()


def random_unit(n: int, dim: int, seed: int) -> F32:
    """``n`` random unit vectors, generated in chunks to keep float64 temporaries small."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        v = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[start : start + len(v)] = v
    return out


def ids_for(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:08d}" for i in range(n)]


# --------------------------------------------------------------------------------- measurements


def bench_bulk_client(client: FaceSealClient, gallery: str, enc: F32, ids: list[str], batch: int) -> float:
    """Seconds to send ``ids`` in BulkEnroll streams of ``batch`` items, each answered before the next."""
    start = time.perf_counter()
    for first in range(0, len(ids), batch):
        results = client.bulk_enroll(
            zip(ids[first : first + batch], enc[first : first + batch], strict=True), gallery=gallery
        )
        if not all(r.ok for r in results):
            raise RuntimeError("an item was refused")
    return time.perf_counter() - start


def bench_bulk_cli(daemon: ScratchDaemon, gallery: str, enc: F32, ids: list[str], batch: int, work: Path) -> float:
    """Seconds for ``faceseal import`` of an .npz, from process start (file reading included)."""
    path = work / f"import-{gallery}-{ids[0]}.npz"
    np.savez(path, encodings=enc, ids=np.asarray(ids))
    argv = [
        str(FACESEAL),
        "--profile",
        "enroller",
        "--dev-dir",
        str(daemon.directory),
        "--target",
        daemon.target,
        "--timeout",
        "600",
        "import",
        str(path),
        "--gallery",
        gallery,
        "--batch",
        str(batch),
    ]
    start = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"faceseal import exited {run.returncode}: {run.stderr}")
    return elapsed


def bench_unary(client: FaceSealClient, gallery: str, enc: F32, ids: list[str], seconds: float) -> tuple[float, int]:
    """Serial Enroll calls until ``seconds`` have passed or the items run out: (seconds, items)."""
    start = time.perf_counter()
    n = 0
    for subject, encoding in zip(ids, enc, strict=True):
        client.enroll(subject, encoding, gallery=gallery)
        n += 1
        if time.perf_counter() - start > seconds:
            break
    return time.perf_counter() - start, n


def blob_sizes(db_path: Path, gallery: str) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        row = db.execute(
            "SELECT avg(length(subject_blob)), avg(length(template_blob)) FROM templates WHERE gallery = ?",
            (gallery,),
        ).fetchone()
    return round(row[0]), round(row[1])


def bench_raw_sqlite(n: int, subject_bytes: int, template_bytes: int, work: Path, per_tx: int) -> float:
    """Seconds to insert ``n`` random blobs of the daemon's sizes, ``per_tx`` rows per transaction,
    with the daemon's schema and pragmas. Generating the blobs is not timed."""
    path = work / f"raw-{per_tx}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    rows = [
        (f"{i:032x}", "g", os.urandom(32), 1, os.urandom(subject_bytes), os.urandom(template_bytes)) for i in range(n)
    ]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE templates (seq INTEGER PRIMARY KEY AUTOINCREMENT, template_id TEXT NOT NULL UNIQUE,"
            " gallery TEXT NOT NULL, subject_ref BLOB NOT NULL, key_version INTEGER NOT NULL,"
            " subject_blob BLOB NOT NULL, template_blob BLOB NOT NULL) STRICT"
        )
        db.execute("CREATE INDEX templates_subject ON templates (gallery, subject_ref)")
        db.execute("CREATE INDEX templates_key_version ON templates (key_version)")
        start = time.perf_counter()
        for first in range(0, n, per_tx):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO templates (template_id, gallery, subject_ref, key_version, subject_blob,"
                " template_blob) VALUES (?, ?, ?, ?, ?, ?)",
                rows[first : first + per_tx],
            )
            db.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        db.close()


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="items per dimension and bulk path (default 20,000)")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="dimensions (default 128 512)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"items per BulkEnroll stream (default {BATCH})")
    parser.add_argument("--unary-seconds", type=float, default=16.0, help="time spent on serial Enroll per dim")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of each path (default 4)")
    args = parser.parse_args(argv)

    print(f"bulk import rate: {args.n} items per dimension and path, batches of {args.batch}")
    print(f"{os.cpu_count()} CPUs; daemon: faceseald serve (own process), SQLite WAL synchronous=FULL; {load()}")
    print(
        f"each path runs in {args.rounds} interleaved rounds (bulk, CLI, unary, raw, bulk, ...), so a change "
        "of load on the machine hits every path alike; rates are items / summed seconds"
    )
    per_round = args.n // args.rounds
    with tempfile.TemporaryDirectory(prefix="faceseal-bench-work-") as tmp:
        work = Path(tmp)
        with scratch_daemon(args.dims) as daemon, daemon.client() as client:
            for dim in args.dims:
                gallery = f"d{dim}"
                enc = random_unit(3 * args.n, dim, seed=dim)
                ids = {p: ids_for(p, args.n) for p in ("bulk-", "cli-", "unary-")}
                seconds = {"bulk": 0.0, "cli": 0.0, "unary": 0.0, "raw_one": 0.0, "raw_batched": 0.0}
                unary_n = 0
                for r in range(args.rounds):
                    part = slice(r * per_round, (r + 1) * per_round)
                    seconds["bulk"] += bench_bulk_client(client, gallery, enc[part], ids["bulk-"][part], args.batch)
                    shifted = slice(args.n + part.start, args.n + part.stop)
                    seconds["cli"] += bench_bulk_cli(daemon, gallery, enc[shifted], ids["cli-"][part], args.batch, work)
                    unary = slice(2 * args.n + part.start, 2 * args.n + part.stop)
                    t, k = bench_unary(
                        client, gallery, enc[unary], ids["unary-"][part], args.unary_seconds / args.rounds
                    )
                    seconds["unary"] += t
                    unary_n += k
                    if r == 0:
                        subject_bytes, template_bytes = blob_sizes(daemon.db_path, gallery)
                    seconds["raw_one"] += bench_raw_sqlite(per_round, subject_bytes, template_bytes, work, per_round)
                    seconds["raw_batched"] += bench_raw_sqlite(
                        per_round, subject_bytes, template_bytes, work, args.batch
                    )
                n = per_round * args.rounds
                bulk, cli = n / seconds["bulk"], n / seconds["cli"]
                unary_rate = unary_n / seconds["unary"]
                raw_one, raw_batched = n / seconds["raw_one"], n / seconds["raw_batched"]
                print(
                    f"\n{dim}-d (template blob {template_bytes} B, subject blob {subject_bytes} B), {load()}:\n"
                    f"  ours, client bulk_enroll       {bulk:10,.0f} items/s   ({n} items)\n"
                    f"  ours, faceseal import (CLI)    {cli:10,.0f} items/s   ({n} items; process start, "
                    ".npz read and state-file fsync included)\n"
                    f"  baseline, serial unary Enroll  {unary_rate:10,.0f} items/s   ({unary_n} calls)\n"
                    f"  baseline, raw SQLite, 1 tx     {raw_one:10,.0f} items/s   (executemany, one tx per round)\n"
                    f"  baseline, raw SQLite, tx/{args.batch:<5} {raw_batched:10,.0f} items/s\n"
                    f"  bulk / unary = {bulk / unary_rate:5.1f}x  (target >= 10x: "
                    f"{'met' if bulk / unary_rate >= 10 else 'NOT met'});  CLI / unary = {cli / unary_rate:5.1f}x\n"
                    f"  ours / raw SQLite (1 tx) = {bulk / raw_one:6.3f};  ours / raw SQLite (tx per batch) = "
                    f"{bulk / raw_batched:6.3f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
