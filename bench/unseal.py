"""Unseal at start: the time ``faceseald serve`` takes to open M sealed templates into memory,
against a raw SQLite scan of the same rows plus a raw AES-GCM decrypt loop over the same blobs
(cryptography's AESGCM, one key object, associated data computed beforehand), in the same run.
Also: the daemon's resident memory against the matrix it holds (M x dim x 4 bytes), and the
database's bytes against the blob bytes.

The store is filled in this process with the daemon's own barrier and store code (the same rows
BulkEnroll would write, sealed under the same data key, far faster than a million RPCs). Then:

* ours: ``faceseald serve`` on that store, from process start to health SERVING, minus the same
  start on the empty store measured first (process start, imports, TLS setup);
* the same steps in this process, one at a time (Core interleaves them): reading every row
  (``iter_templates``), ``Barrier.open_many`` per batch of 4,096, ``Gallery.add_many`` per batch;
* raw: one ``SELECT ... FROM templates ORDER BY seq`` (a rowid-order table scan, fetchall) and
  two ``AESGCM.decrypt`` per row into a preallocated float32 matrix.

    .venv/bin/python bench/unseal.py                   # 1,000,000 x 128-d
    .venv/bin/python bench/unseal.py --m 200000 --dim 512
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from import_rate import load, random_unit, setup_dev, start_daemon  # bench/ is sys.path[0]

from faceseal.server.config import load_config
from faceseal.server.crypto import blob, vault
from faceseal.server.crypto.barrier import Barrier
from faceseal.server.daemon import open_seal, open_store
from faceseal.server.gallery.memory import Gallery
from faceseal.server.store.base import TemplateRow

CHUNK = 10_000
BATCH = 4096  # as core._OPEN_BATCH
RATIO_TARGET = 1.5  # unseal <= 1.5 x raw


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def rss_target(matrix_bytes: int) -> float:
    """The issue's bound on the daemon's resident memory after unseal."""
    return 1.3 * matrix_bytes + 200 * 2**20


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def populate(config_path: Path, m: int, dim: int) -> tuple[Barrier, list[str], float]:
    """Seal and store ``m`` random templates as the daemon would; return the barrier, the subject
    ids (in row order) and the seconds it took."""
    config = load_config(config_path)
    store = open_store(config)
    gallery = f"d{dim}"
    try:
        barrier = Barrier(vault.load_or_create(store, open_seal(config)))
        ids = [f"subject-{i:09d}" for i in range(m)]
        start = time.perf_counter()
        for first in range(0, m, CHUNK):
            enc = random_unit(min(CHUNK, m - first), dim, seed=first)
            rows = []
            for i, vector in enumerate(enc):
                subject, template_id = ids[first + i], secrets.token_hex(16)
                sealed = barrier.seal(gallery, subject, template_id, vector)
                ref = barrier.subject_ref(gallery, subject)
                row = TemplateRow(
                    gallery, ref, template_id, sealed.key_version, sealed.subject_blob, sealed.template_blob
                )
                rows.append((row, False))
            store.put_templates(rows)
        return barrier, ids, time.perf_counter() - start
    finally:
        store.close()


def in_process_steps(config_path: Path, barrier: Barrier, dim: int) -> dict[str, float]:
    """Core._open_gallery's three steps, timed one at a time, batched as Core batches them."""
    config = load_config(config_path)
    store = open_store(config)
    name = f"d{dim}"
    try:
        t0 = time.perf_counter()
        rows = list(store.iter_templates(name))
        t1 = time.perf_counter()
        opened = [barrier.open_many(name, rows[i : i + BATCH], dim) for i in range(0, len(rows), BATCH)]
        t2 = time.perf_counter()
        gallery = Gallery(config.galleries[name], capacity=len(rows))
        for first, (ids, matrix) in zip(range(0, len(rows), BATCH), opened, strict=True):
            batch = rows[first : first + BATCH]
            entries = [(s, r.template_id, r.subject_ref) for s, r in zip(ids, batch, strict=True) if s is not None]
            gallery.add_many(entries, matrix)
        t3 = time.perf_counter()
        assert gallery.size()[1] == len(rows)
        return {"read rows": t1 - t0, "Barrier.open_many": t2 - t1, "Gallery.add_many": t3 - t2}
    finally:
        store.close()


def raw_baseline(db_path: Path, barrier: Barrier, ids: list[str], dim: int) -> tuple[float, float]:
    """(seconds for the SQLite scan, seconds for the decrypt loop) over the same rows."""
    name = f"d{dim}"
    start = time.perf_counter()
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        # The whole table in rowid order (every row is in this gallery): no index, no sort.
        rows = db.execute(
            "SELECT template_id, subject_ref, key_version, subject_blob, template_blob FROM templates ORDER BY seq"
        ).fetchall()
    scan = time.perf_counter() - start
    key = barrier.keyring.key(1)
    assert key is not None
    aead = AESGCM(key.reveal())
    h = blob.HEADER_BYTES
    aads = [
        (
            blob.subject_aad(name, ref, _text(template_id), version),
            blob.template_aad(name, subject, _text(template_id), version),
        )
        for (template_id, ref, version, _, _), subject in zip(rows, ids, strict=True)
    ]
    matrix = np.empty((len(rows), dim), dtype=np.float32)
    start = time.perf_counter()
    for i, ((_, _, _, s_blob, t_blob), (s_aad, t_aad)) in enumerate(zip(rows, aads, strict=True)):
        aead.decrypt(s_blob[5:h], s_blob[h:], s_aad)
        matrix[i] = np.frombuffer(aead.decrypt(t_blob[5:h], t_blob[h:], t_aad), dtype="<f4")
    return scan, time.perf_counter() - start


def _text(template_id: str | bytes) -> str:
    """A template id as the barrier binds it (the store may keep the 16 raw bytes)."""
    return template_id.hex() if isinstance(template_id, bytes) else template_id


def db_bytes(db_path: Path) -> tuple[int, int]:
    """(bytes of the database files, bytes of the blobs in it)."""
    files = sum(p.stat().st_size for p in db_path.parent.glob(db_path.name + "*"))
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        (blobs,) = db.execute("SELECT sum(length(subject_blob) + length(template_blob)) FROM templates").fetchone()
    return files, int(blobs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=1_000_000, help="templates (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=128, help="dimension (default 128)")
    parser.add_argument("--skip-steps", action="store_true", help="skip the in-process step-by-step timing")
    args = parser.parse_args(argv)
    m, dim = args.m, args.dim
    matrix_bytes = m * dim * 4
    print(f"unseal of {m:,} x {dim}-d templates (matrix {mib(matrix_bytes)}); {load()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="faceseal-bench-unseal-") as tmp:
        directory = Path(tmp) / "dev"
        setup_dev(directory, [dim])
        config_path = directory / "faceseal.toml"
        db_path = directory / "data" / "faceseal.db"

        empty, empty_start = start_daemon(directory)
        empty_rss = empty.rss_bytes()
        empty.stop()

        barrier, ids, fill = populate(config_path, m, dim)
        print(f"filled the store in this process in {fill:.1f} s ({m / fill:,.0f} rows/s)", flush=True)
        files, blobs = db_bytes(db_path)

        daemon, full_start = start_daemon(directory, deadline=1800.0)
        try:
            with daemon.admin() as admin:
                (gallery,) = [g for g in admin.status().galleries if g.name == f"d{dim}"]
            assert gallery.template_count == m, f"the daemon opened {gallery.template_count} of {m}"
            rss, peak = daemon.rss_bytes(), daemon.peak_rss_bytes()
        finally:
            daemon.stop()
        ours = full_start - empty_start

        scan, decrypt = raw_baseline(db_path, barrier, ids, dim)
        raw = scan + decrypt
        steps = {} if args.skip_steps else in_process_steps(config_path, barrier, dim)

    print(
        f"\nours: faceseald start to SERVING {full_start:.1f} s, on the empty store {empty_start:.1f} s -> "
        f"unseal {ours:.1f} s ({m / ours:,.0f} templates/s)"
    )
    if steps:
        print(
            "  in this process, step by step: "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())
            + f" (sum {sum(steps.values()):.1f} s)"
        )
    print(
        f"raw:  SQLite scan {scan:.1f} s + AES-GCM decrypt loop {decrypt:.1f} s = {raw:.1f} s "
        f"({m / raw:,.0f} templates/s)\n"
        f"ours / raw = {ours / raw:.2f}x (target <= {RATIO_TARGET}x: {_verdict(ours / raw <= RATIO_TARGET)})\n"
        f"\nmemory: daemon RSS {mib(rss)} after unseal (peak {mib(peak)}), {mib(empty_rss)} on the empty store; "
        f"matrix {mib(matrix_bytes)} -> RSS above empty / matrix = {(rss - empty_rss) / matrix_bytes:.2f}x, "
        f"peak / matrix = {peak / matrix_bytes:.2f}x\n"
        f"RSS target: 1.3 x matrix + 200 MiB = {mib(rss_target(matrix_bytes))}; RSS / target = "
        f"{rss / rss_target(matrix_bytes):.2f} ({_verdict(rss <= rss_target(matrix_bytes))})\n"
        f"disk: database {mib(files)} for {mib(blobs)} of blobs ({files / blobs:.2f}x) and "
        f"{mib(matrix_bytes)} of plain floats ({files / matrix_bytes:.2f}x); "
        f"{files / m:,.0f} bytes per template\n"
        f"end: {load()}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
