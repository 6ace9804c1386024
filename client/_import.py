"""Bulk import for ``faceseal import``: read a file of encodings, send it in BulkEnroll batches,
and keep a state file so an interrupted import resumes where it stopped.

Input formats, all read without pickle (an encoding file may come from anywhere):

* ``.npz`` with arrays ``encodings`` (N x dim) and ``ids`` (N), or ``encodings`` and ``labels``;
* ``.npy`` (N x dim) with the subject ids in a text file, one per line (``--ids``);
* ``.jsonl`` / ``.ndjson``: one ``{"subject_id": "...", "encoding": [...]}`` object per line.

An item's index is its position in the file, from 0 (blank JSON lines do not count).

Resuming: the daemon stores a BulkEnroll stream all or nothing, so after each answered batch the
number of items done is written to the state file (atomically: a temporary file, fsync, rename).
A rerun of the same command skips those items; a batch that was cut off mid-stream stored nothing
and is simply sent again. The state records the input's sha256: a changed file is refused, since
its items no longer line up with the count (``--restart`` starts over).

A client killed after the daemon committed a batch but before the state was written (kill -9,
power loss) does not store that batch twice either: the state names the batch before it is sent
(``sending``), every batch goes with an idempotency key made of the import's random run id and
its item range, and the rerun resends exactly that range under the same key, so the daemon
answers it from its record of the first commit (kept 7 days). A new import of the same file (no
state file, or ``--restart``) gets a new run id: importing a file again is never mistaken for a
resend. SIGINT and SIGTERM still only stop the import between batches, never inside one.

Nothing here prints or records an encoding; error messages name the file, a line or an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from faceseal.client._client import FaceSealClient
from faceseal.client._errors import FaceSealClientError

STATE_FORMAT = "faceseal-import-state/2"
# Whole-stream failures that mean the daemon stored nothing, *for a batch sent for the first
# time*: each is raised before a commit. Not RESOURCE_EXHAUSTED (gRPC also raises it for an
# answer too large to send, after the commit), and nothing at all for a resend: a rate refusal,
# a lowered max_batch or FAILED_PRECONDITION may come after an earlier send was committed.
_REFUSED_UNSTORED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND,
    }
)
_OLD_STATE_FORMATS = ("faceseal-import-state/1",)  # no run id, no batch in flight: read as such
STATE_SUFFIX = ".import-state"
DEFAULT_BATCH = 500
IMPORT_SUFFIXES = (".npz", ".npy", ".jsonl", ".ndjson")

F32 = npt.NDArray[np.float32]


class ImportStateError(ValueError):
    """The state file does not belong to this import (changed input, other options, not a state)."""


@dataclass(frozen=True, slots=True)
class ImportSource:
    """The items of an import file: ``ids[i]`` and ``encodings[i]`` form item ``i``."""

    path: Path
    ids: list[str]
    encodings: F32 | list[F32]  # an N x dim array, or (JSON lines) a list of 1-D arrays
    sha256: str
    ids_path: Path | None = None
    ids_sha256: str | None = None

    def __len__(self) -> int:
        return len(self.ids)


# ------------------------------------------------------------------------------------- reading


def read_import_file(path: Path | str, ids_path: Path | str | None = None) -> ImportSource:
    """Read and check the whole file before anything is sent, so a malformed file imports nothing."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMPORT_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported import file type {suffix or '(none)'!r}; use .npz, .npy (with --ids) "
            "or .jsonl (one JSON object per line)"
        )
    if ids_path is not None and suffix != ".npy":
        raise ValueError(f"{path}: --ids goes with a .npy file only (a {suffix} file carries its own ids)")
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".npy":
        if ids_path is None:
            raise ValueError(f"{path}: a .npy file holds no subject ids; pass --ids FILE (one id per line)")
        return _read_npy(path, Path(ids_path))
    return _read_jsonl(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _matrix(path: Path, array: npt.NDArray[Any], what: str) -> F32:
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{path}: {what} must be a numeric array, got dtype {array.dtype}")
    if array.ndim == 1:  # a single encoding
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{path}: {what} must be a 2-D array (one encoding per row), got shape {array.shape}")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range: the daemon refuses that item
        matrix: F32 = np.ascontiguousarray(array, dtype=np.float32)
    return matrix


def _id_list(path: Path, array: npt.NDArray[Any], what: str) -> list[str]:
    if array.ndim != 1:
        raise ValueError(f"{path}: {what} must be a 1-D array, got shape {array.shape}")
    if array.dtype.kind == "U":
        return [str(x) for x in array.tolist()]
    if array.dtype.kind == "S":
        return [bytes(x).decode("utf-8", "replace") for x in array.tolist()]
    if array.dtype.kind in "iu":
        return [str(int(x)) for x in array.tolist()]
    raise ValueError(f"{path}: {what} must hold strings or integers, got dtype {array.dtype}")


def _read_npz(path: Path) -> ImportSource:
    sha256 = file_sha256(path)
    try:
        # allow_pickle=False: an object array inside could run code when unpickled.
        archive: object = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a plain .npz archive (pickled data is refused)") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive")
    with archive:
        names = list(archive.files)
        id_name = "ids" if "ids" in names else "labels" if "labels" in names else None
        if "encodings" not in names or id_name is None:
            raise ValueError(
                f"{path}: expected arrays 'encodings' and 'ids' (or 'labels'); it holds {', '.join(names) or 'none'}"
            )
        try:
            encodings = _matrix(path, archive["encodings"], "'encodings'")
            ids = _id_list(path, archive[id_name], f"'{id_name}'")
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise ValueError(f"{path}: object arrays are refused (they would need pickle)") from exc
            if str(exc).startswith(str(path)):
                raise
            raise ValueError(f"{path}: an array in the archive cannot be read") from exc
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise ValueError(f"{path}: an array in the archive cannot be read (truncated or corrupt)") from exc
    if len(ids) != encodings.shape[0]:
        raise ValueError(f"{path}: {encodings.shape[0]} encodings but {len(ids)} {id_name}")
    return ImportSource(path, ids, encodings, sha256)


def _read_npy(path: Path, ids_path: Path) -> ImportSource:
    sha256 = file_sha256(path)
    try:
        loaded: object = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a plain numeric .npy file (pickled data is refused)") from exc
    if not isinstance(loaded, np.ndarray):
        raise ValueError(f"{path}: expected a single array, not an .npz archive")
    encodings = _matrix(path, loaded, "the array")
    raw = ids_path.read_bytes()
    try:
        ids = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{ids_path}: not UTF-8 text") from exc
    ids = [line.strip() for line in ids]
    if len(ids) != encodings.shape[0]:
        raise ValueError(f"{path}: {encodings.shape[0]} encodings but {ids_path} has {len(ids)} lines")
    return ImportSource(path, ids, encodings, sha256, ids_path, hashlib.sha256(raw).hexdigest())


def _read_jsonl(path: Path) -> ImportSource:
    digest = hashlib.sha256()
    ids: list[str] = []
    encodings: list[F32] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            digest.update(line)
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                item: object = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{where}: not valid JSON") from exc
            if not isinstance(item, dict) or not isinstance(item.get("subject_id"), str):
                raise ValueError(f'{where}: expected an object {{"subject_id": "...", "encoding": [...]}}')
            values = item.get("encoding")
            if not isinstance(values, list) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in values
            ):
                raise ValueError(f"{where}: 'encoding' must be a list of numbers")
            with np.errstate(over="ignore"):
                encodings.append(np.asarray(values, dtype=np.float32))
            ids.append(item["subject_id"])
    return ImportSource(path, ids, encodings, digest.hexdigest())


# --------------------------------------------------------------------------------------- state


@dataclass(slots=True)
class ImportState:
    """What the state file holds: which input, with which options, and how far it got."""

    file: str
    sha256: str
    ids_sha256: str | None
    gallery: str
    replace: bool
    batch: int
    total: int
    done: int = 0
    imported: int = 0
    refused: list[tuple[int, str, str]] = field(default_factory=list)  # (index, code name, message)
    # This import's random id (a new one per fresh import or --restart): with an item range, the
    # idempotency key of a batch.
    run: str = field(default_factory=lambda: secrets.token_hex(8))
    # The item range of a batch sent but not yet answered, or None.
    sending: tuple[int, int] | None = None

    def batch_key(self, first: int, end: int) -> str:
        return f"import-{self.run}-{first}-{end}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "file": self.file,
            "sha256": self.sha256,
            "ids_sha256": self.ids_sha256,
            "gallery": self.gallery,
            "replace": self.replace,
            "batch": self.batch,
            "total": self.total,
            "done": self.done,
            "imported": self.imported,
            "refused": [list(r) for r in self.refused],
            "run": self.run,
            "sending": None if self.sending is None else list(self.sending),
        }

    @classmethod
    def from_json(cls, document: object, where: Path) -> ImportState:
        if not isinstance(document, dict) or document.get("format") not in (STATE_FORMAT, *_OLD_STATE_FORMATS):
            raise ImportStateError(f"{where}: not a faceseal import state file")
        try:
            state = cls(
                file=str(document["file"]),
                sha256=str(document["sha256"]),
                ids_sha256=None if document["ids_sha256"] is None else str(document["ids_sha256"]),
                gallery=str(document["gallery"]),
                replace=bool(document["replace"]),
                batch=int(document["batch"]),
                total=int(document["total"]),
                done=int(document["done"]),
                imported=int(document["imported"]),
                refused=[(int(i), str(c), str(m)) for i, c, m in document["refused"]],
            )
            if document["format"] == STATE_FORMAT:
                state.run = str(document["run"])
                sending = document["sending"]
                state.sending = None if sending is None else (int(sending[0]), int(sending[1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ImportStateError(f"{where}: a damaged import state file; delete it or pass --restart") from exc
        valid_run = len(state.run) == 16 and all(c in "0123456789abcdef" for c in state.run)
        in_flight = state.sending is None or state.done == state.sending[0] < state.sending[1] <= state.total
        if not (0 <= state.done <= state.total and valid_run and in_flight):
            raise ImportStateError(f"{where}: a damaged import state file; delete it or pass --restart")
        return state


def default_state_path(path: Path) -> Path:
    return path.with_name(path.name + STATE_SUFFIX)


def load_state(path: Path) -> ImportState | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        document: object = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportStateError(f"{path}: not a faceseal import state file") from exc
    return ImportState.from_json(document, path)


def save_state(path: Path, state: ImportState) -> None:
    """Replace the state file in one step: a reader (or a crash) sees the old or the new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable once this returns
    finally:
        os.close(dir_fd)


def resume_state(
    source: ImportSource, state_path: Path, *, gallery: str, replace: bool, batch: int, restart: bool
) -> tuple[ImportState, int]:
    """The state to continue (a fresh one with ``restart`` or without a file) and the items already done."""
    fresh = ImportState(
        file=str(source.path.resolve()),
        sha256=source.sha256,
        ids_sha256=source.ids_sha256,
        gallery=gallery,
        replace=replace,
        batch=batch,
        total=len(source),
    )
    previous = None if restart else load_state(state_path)
    if previous is None:
        return fresh, 0
    if previous.sha256 != source.sha256 or previous.ids_sha256 != source.ids_sha256:
        changed = source.path if previous.sha256 != source.sha256 else source.ids_path
        raise ImportStateError(
            f"{changed} changed since the import recorded in {state_path} began (its sha256 differs): resuming "
            "could skip or repeat items; pass --restart to import the file from its first item"
        )
    if (previous.gallery, previous.replace) != (gallery, replace):
        raise ImportStateError(
            f"{state_path} records an import with --gallery {previous.gallery!r}"
            f"{' --replace' if previous.replace else ''}; rerun with the same options, or pass --restart"
        )
    if previous.total != len(source):
        raise ImportStateError(f"{state_path}: records {previous.total} items, the file holds {len(source)}")
    previous.batch = batch  # done counts items, so a different batch size resumes just as well
    return previous, previous.done


# -------------------------------------------------------------------------------------- running


@dataclass(frozen=True, slots=True)
class ImportReport:
    """The whole import so far (earlier runs included), and whether it reached the end."""

    total: int
    imported: int
    refused: list[tuple[int, str, str]]
    resumed_from: int  # items an earlier run had done
    done: int
    stopped_by: str | None  # None: complete; else "SIGINT", "SIGTERM" or "--stop-after-batches"

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def refusal_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, code, _ in self.refused:
            counts[code] = counts.get(code, 0) + 1
        return dict(sorted(counts.items()))


Progress = Callable[[int, int, int], None]  # (done, total, refused)


class _StopSignals:
    """Turn SIGINT / SIGTERM into "stop after this batch": a batch the daemon may have committed is
    always recorded before the import stops. A second signal interrupts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python; the default is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def run_import(
    client: FaceSealClient,
    source: ImportSource,
    state: ImportState,
    state_path: Path,
    *,
    start: int,
    batch: int,
    timeout: float | None = None,
    progress: Progress | None = None,
    stop_after_batches: int | None = None,
) -> ImportReport:
    """Send items ``start..`` in batches of ``batch``, recording the state after each answered batch.

    A batch that fails as a whole raises (a FaceSealClientError); the state then says how far the
    import got, and rerunning resumes there.
    """
    save_state(state_path, state)
    sent_batches = 0
    stopped_by: str | None = None
    with _StopSignals() as signals:
        if progress is not None:
            progress(state.done, state.total, len(state.refused))
        while state.done < state.total:
            if signals.received is not None:
                stopped_by = signals.received
                break
            if stop_after_batches is not None and sent_batches >= stop_after_batches:
                stopped_by = "--stop-after-batches"
                break
            # A batch the previous run sent without recording its answer goes again exactly as it
            # was (same range, same key), whatever --batch says now: the daemon may have stored it.
            resend = state.sending is not None
            first, end = state.sending or (state.done, min(state.total, state.done + batch))
            state.sending = (first, end)
            save_state(state_path, state)
            try:
                results = client.bulk_enroll(
                    _items(source, first, end),
                    gallery=state.gallery,
                    replace=state.replace,
                    timeout=timeout,
                    idempotency_key=state.batch_key(first, end),
                )
            except Exception as exc:
                # A first send refused before any commit (or whose items could not be read)
                # stored nothing: a rerun may choose another --batch (e.g. over max_batch).
                # Otherwise the batch may have been committed, by this send or an earlier one,
                # and stays named: the rerun resends exactly it, under its key (--restart is
                # the way out, as a new import).
                unstored = not isinstance(exc, FaceSealClientError) or exc.code in _REFUSED_UNSTORED
                if unstored and not resend:
                    state.sending = None
                    save_state(state_path, state)
                raise
            for r in results:
                if r.code is grpc.StatusCode.OK:
                    state.imported += 1
                else:
                    state.refused.append((first + r.index, r.code.name, r.message))
            state.done, state.sending = end, None
            save_state(state_path, state)
            sent_batches += 1
            if progress is not None:
                progress(state.done, state.total, len(state.refused))
    return ImportReport(state.total, state.imported, list(state.refused), start, state.done, stopped_by)


def _items(source: ImportSource, first: int, end: int) -> Iterator[tuple[str, F32]]:
    for i in range(first, end):
        yield source.ids[i], source.encodings[i]


class Rate:
    """Items per second since construction, for the progress bar."""

    def __init__(self, start: int) -> None:
        self._t0 = time.monotonic()
        self._start = start

    def per_second(self, done: int) -> float:
        elapsed = time.monotonic() - self._t0
        return (done - self._start) / elapsed if elapsed > 0 else 0.0
