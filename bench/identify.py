"""Identify (1:N) over N random float32 encodings: ours against raw numpy on the same data and
against the memory-bandwidth floor, single queries and a batch of queries, in the same run.

* ours, in-process: ``faceseal.server.gallery.memory.Gallery.identify`` on a gallery holding the
  N rows (filled with ``Gallery.add``, as unseal does), one call per query; for a batch,
  ``Gallery.identify_many`` (what IdentifyBatch runs), and one ``identify`` per query beside it;
* ours, through the daemon: Identify and IdentifyBatch over gRPC + mutual TLS to ``faceseald
  serve``, on a smaller gallery (``--daemon-n``, enrolled with BulkEnroll: a million would take
  the import minutes);
* raw numpy on an identical matrix: ``sq_norms - 2 * (M @ p)`` and ``argpartition`` for one
  query, ``P @ M.T`` and ``argpartition`` per query row for a batch;
* the floor: the matrix's bytes divided by a streaming-read bandwidth measured here (the best of
  ``np.sum`` on one and on two threads): no exact 1:N search can read less. A batch reads the
  matrix once, so its floor is the slower of that and the multiply at the measured sgemm rate.

    .venv/bin/python bench/identify.py                       # N = 1,000,000, 512-d and 128-d
    .venv/bin/python bench/identify.py --n 100000 --dims 128 # a quick run

Random unit vectors are ~1.41 apart, beyond the 0.6 threshold, so each probe is a noisy copy of
one enrolled row (one genuine candidate), as a real search would be. Each time is shown as the
median and the best of repeated runs taken in turns; the ratios use the best runs, the estimate
least disturbed by other load on the machine (the medians show how much there was).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from import_rate import ScratchDaemon, ids_for, load, random_unit, scratch_daemon  # bench/ is sys.path[0]

from faceseal.client import Candidate
from faceseal.server.config import GalleryConfig
from faceseal.server.gallery.memory import Gallery

F32 = npt.NDArray[np.float32]
TOP_K = 5
MAX_IDENTIFY_BATCH = 64  # the daemon's default server.max_identify_batch


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    min_runs: int = 5,
    max_runs: int = 25,
    budget: float = 15.0,
    warm_up: bool = True,
) -> dict[str, tuple[float, float]]:
    """(median, best) wall time of each function, run in turns (a, b, a, b, ...) so that a change
    of load on the machine hits all of them alike; one warm-up call each first (unless
    ``warm_up`` is false); at least ``min_runs`` turns, then more until ``budget`` seconds have
    passed or ``max_runs``."""
    for fn in fns.values() if warm_up else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        runs = len(times[next(iter(fns))])
        if runs >= max_runs or (runs >= min_runs and time.perf_counter() - start > budget):
            return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def read_bandwidth(nbytes: int = 1 << 30) -> tuple[float, dict[str, float]]:
    """Streaming-read bandwidth in bytes/s: the best of the ways that only read (np.sum on one
    thread, on two threads over halves); a copy's read + write rate is shown for comparison."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    half = len(a) // 2
    out = np.empty_like(a)

    def two_threads() -> None:
        threads = [threading.Thread(target=np.sum, args=(part,)) for part in (a[:half], a[half:])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    timed = interleaved(
        {"np.sum, 1 thread": lambda: np.sum(a), "np.sum, 2 threads": two_threads, "copy": lambda: np.copyto(out, a)},
        budget=5.0,
    )
    rates = {name: nbytes / best for name, (_, best) in timed.items()}
    rates["copy"] *= 2  # it reads and writes every byte
    return max(rates["np.sum, 1 thread"], rates["np.sum, 2 threads"]), rates


def blas_info() -> str:
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS") if k in os.environ}
    try:
        from threadpoolctl import threadpool_info  # optional: not a dependency of the project
    except ImportError:
        pools = "threadpoolctl not installed"
    else:
        pools = "; ".join(
            f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} x{p.get('num_threads')}"
            for p in threadpool_info()
        )
    return f"numpy {np.__version__}; BLAS: {pools}; env: {env or 'no OPENBLAS_* set'}"


def probes_near(matrix: F32, count: int, seed: int) -> tuple[F32, npt.NDArray[np.intp]]:
    """``count`` probes, each a copy of a random row moved 0.3 away (within the 0.6 threshold)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, matrix.shape[0], count)
    step = rng.standard_normal((count, matrix.shape[1])).astype(np.float32)
    step *= 0.3 / np.linalg.norm(step, axis=1, keepdims=True)
    probes: F32 = (matrix[rows] + step).astype(np.float32)
    return probes, rows


def fill_gallery(matrix: F32, dim: int) -> tuple[Gallery, float]:
    gallery = Gallery(GalleryConfig(f"d{dim}", dim, "euclidean", 0.6))
    ref = b"\0" * 32
    start = time.perf_counter()
    for i in range(matrix.shape[0]):
        gallery.add(f"s{i:08d}", f"t{i:08d}", matrix[i], subject_ref=ref + i.to_bytes(8, "big"))
    return gallery, time.perf_counter() - start


def numpy_single(matrix: F32, sq_norms: F32, probe: F32) -> npt.NDArray[np.intp]:
    scores = sq_norms - 2.0 * (matrix @ probe)
    return np.argpartition(scores, TOP_K)[:TOP_K]


def numpy_batch(matrix: F32, sq_norms: F32, probes: F32) -> npt.NDArray[np.intp]:
    """One matrix product for every query; scores laid out one query per row, so each top-k
    selection runs over contiguous memory."""
    scores = probes @ matrix.T
    scores *= -2.0
    scores += sq_norms
    return np.argpartition(scores, TOP_K, axis=1)[:, :TOP_K]


def gemm_flops(size: int = 2048) -> float:
    """Single-precision matrix-multiply throughput here (flop/s), for the compute floor of a batch."""
    a = np.ones((size, size), dtype=np.float32)
    timed = interleaved({"sgemm": lambda: a @ a}, min_runs=5, budget=3.0)
    return 2.0 * size**3 / timed["sgemm"][1]


def ms(seconds: tuple[float, float], per: int = 1) -> str:
    median, best = seconds
    return f"{median / per * 1e3:8.2f} ms (best {best / per * 1e3:7.2f})"


def bench_in_process(n: int, dim: int, batch: int, bandwidth: float, flops: float) -> None:
    matrix = random_unit(n, dim, seed=dim)
    sq_norms = np.einsum("ij,ij->i", matrix, matrix).astype(np.float32)
    gallery, fill = fill_gallery(matrix, dim)
    probes, rows = probes_near(matrix, batch, seed=1)
    hits = gallery.identify(probes[0], TOP_K)
    assert [h.subject_id for h in hits] == [f"s{rows[0]:08d}"], "Gallery.identify missed the genuine subject"
    assert rows[0] in numpy_single(matrix, sq_norms, probes[0]), "numpy missed the genuine row"

    turn = iter(range(10**9))
    single = interleaved(
        {
            "ours": lambda: gallery.identify(probes[next(turn) % batch], TOP_K),
            "numpy": lambda: numpy_single(matrix, sq_norms, probes[next(turn) % batch]),
        }
    )
    assert gallery.identify_many(probes[:2], TOP_K) == [gallery.identify(p, TOP_K) for p in probes[:2]]
    many = interleaved(
        {
            "ours": lambda: gallery.identify_many(probes, TOP_K),
            "ours, one call per query": lambda: [gallery.identify(p, TOP_K) for p in probes],
            "numpy": lambda: numpy_batch(matrix, sq_norms, probes),
        },
        min_runs=2,
        max_runs=3,
        budget=0.0,
        warm_up=False,  # the single queries just ran the same code
    )
    floor = matrix.nbytes / bandwidth
    batch_floor = max(floor, 2.0 * n * dim * batch / flops)  # read M once, or the multiply, whichever is slower
    print(
        f"\n{n:,} x {dim}-d in-process ({matrix.nbytes / 2**30:.2f} GiB; Gallery.add of every row took {fill:.1f} s)\n"
        f"  single query: ours Gallery.identify {ms(single['ours'])}   numpy {ms(single['numpy'])}   "
        f"floor {floor * 1e3:8.2f} ms\n"
        f"                ours/numpy {single['ours'][1] / single['numpy'][1]:5.2f}x   "
        f"ours/floor {single['ours'][1] / floor:5.2f}x   numpy/floor {single['numpy'][1] / floor:5.2f}x\n"
        f"  batch of {batch}: ours Gallery.identify_many {ms(many['ours'], batch)} per query   "
        f"ours one call per query {ms(many['ours, one call per query'], batch)} per query\n"
        f"                numpy (one P @ M.T) {ms(many['numpy'], batch)} per query   "
        f"floor {batch_floor / batch * 1e3:7.2f} ms per query\n"
        f"                ours/numpy {many['ours'][1] / many['numpy'][1]:5.2f}x   "
        f"ours/floor {many['ours'][1] / batch_floor:5.2f}x   numpy/floor {many['numpy'][1] / batch_floor:5.2f}x",
        flush=True,
    )


def bench_daemon(daemon: ScratchDaemon, n: int, dim: int, batch: int, bandwidth: float) -> None:
    matrix = random_unit(n, dim, seed=1000 + dim)
    ids = ids_for("s", n)
    gallery = f"d{dim}"
    start = time.perf_counter()
    with daemon.client("enroller") as enroller:
        for first in range(0, n, 1000):
            results = enroller.bulk_enroll(
                zip(ids[first : first + 1000], matrix[first : first + 1000], strict=True), gallery=gallery
            )
            assert all(r.ok for r in results), "an item was refused"
    enroll_s = time.perf_counter() - start
    sq_norms = np.einsum("ij,ij->i", matrix, matrix).astype(np.float32)
    local, _ = fill_gallery(matrix, dim)
    probes, rows = probes_near(matrix, batch, seed=2)
    turn = iter(range(10**9))
    with daemon.client("gateway") as gateway:
        got = gateway.identify(probes[0], top_k=TOP_K, gallery=gallery)
        assert [c.subject_id for c in got] == [ids[rows[0]]], "the daemon missed the genuine subject"
        single = interleaved(
            {
                "rpc": lambda: gateway.identify(probes[next(turn) % batch], top_k=TOP_K, gallery=gallery),
                "local": lambda: local.identify(probes[next(turn) % batch], TOP_K),
                "numpy": lambda: numpy_single(matrix, sq_norms, probes[next(turn) % batch]),
            },
            min_runs=20,
            max_runs=200,
            budget=10.0,
        )

        def identify_batches() -> list[list[Candidate]]:
            # At most the daemon's default max_identify_batch per call, as a client would send them.
            return [
                found
                for first in range(0, batch, MAX_IDENTIFY_BATCH)
                for found in gateway.identify_batch(
                    probes[first : first + MAX_IDENTIFY_BATCH], top_k=TOP_K, gallery=gallery
                )
            ]

        got_many = identify_batches()
        assert [[c.subject_id for c in found][:1] for found in got_many] == [[ids[r]] for r in rows]
        many = interleaved(
            {
                "rpc": identify_batches,
                "rpcs": lambda: [gateway.identify(p, top_k=TOP_K, gallery=gallery) for p in probes],
                "numpy": lambda: numpy_batch(matrix, sq_norms, probes),
            },
            min_runs=3,
            max_runs=10,
            budget=5.0,
        )
    floor = matrix.nbytes / bandwidth
    print(
        f"\n{n:,} x {dim}-d through the daemon ({matrix.nbytes / 2**20:.1f} MiB; enrolled by BulkEnroll in "
        f"{enroll_s:.1f} s)\n"
        f"  single query: ours Identify RPC {ms(single['rpc'])}   ours in-process {ms(single['local'])}   "
        f"numpy {ms(single['numpy'])}   floor {floor * 1e3:6.3f} ms\n"
        f"                RPC/numpy {single['rpc'][1] / single['numpy'][1]:5.1f}x   "
        f"in-process/numpy {single['local'][1] / single['numpy'][1]:5.2f}x\n"
        f"  batch of {batch}: ours one IdentifyBatch RPC {ms(many['rpc'], batch)} per query   "
        f"ours {batch} Identify RPCs {ms(many['rpcs'], batch)} per query\n"
        f"                numpy {ms(many['numpy'], batch)} per query   "
        f"IdentifyBatch/numpy {many['rpc'][1] / many['numpy'][1]:5.1f}x   "
        f"Identify RPCs/numpy {many['rpcs'][1] / many['numpy'][1]:5.1f}x",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size in-process (default 1,000,000)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 128], help="dimensions (default 512 128)")
    parser.add_argument("--batch", type=int, default=64, help="queries in a batch (default 64)")
    parser.add_argument(
        "--daemon-n", type=int, default=20_000, help="gallery size through the daemon (default 20,000; 0 skips)"
    )
    args = parser.parse_args(argv)

    print(f"Identify, top_k={TOP_K}; {os.cpu_count()} CPUs; {load()}\n{blas_info()}")
    bandwidth, ways = read_bandwidth()
    print(
        "streaming read bandwidth: "
        + ", ".join(f"{name} {rate / 1e9:.1f} GB/s" for name, rate in ways.items())
        + f"; the floor uses {bandwidth / 1e9:.1f} GB/s"
    )
    flops = gemm_flops()
    print(
        f"float32 matrix multiply: {flops / 1e9:.0f} GFLOP/s (a batch's floor is the slower of reading M once and this)"
    )
    for dim in args.dims:
        bench_in_process(args.n, dim, args.batch, bandwidth, flops)
    if args.daemon_n > 0:
        with scratch_daemon(args.dims) as daemon:
            for dim in args.dims:
                bench_daemon(daemon, args.daemon_n, dim, args.batch, bandwidth)
    print(f"\nend: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
