"""The audit log: one JSON line per deciding or state-changing call, HMAC-chained, fail-closed.

Each record carries the SHA-256 of the previous record's line and an HMAC of itself under the
audit key, so editing, deleting, reordering or inserting a line breaks the chain at that line
(``faceseald audit verify``). Subject ids appear only as an HMAC under the same key: an
investigator asks the daemon for the HMAC of a subject (``faceseal admin audit-hash``) and
searches for it; the log alone names nobody.

Fail closed (after Vault's audit devices): the core writes the record *before* it commits a
change or returns a decision, and a record that cannot be written fails the call UNAVAILABLE
with nothing changed. Records are written with one ``write`` on an O_APPEND descriptor, so a
kill -9 never leaves half of an acknowledged record; a torn tail from a crash mid-write (a call
that was never acknowledged) is cut off at the next start.

The audit key is derived from the keyring's index key, not from the newest data key: the index
key never rotates, so a subject's audit HMAC stays the same across key rotations and old
segments stay verifiable after the data keys that existed then were retired.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from faceseal.server.errors import Unavailable
from faceseal.server.metrics import Metrics
from faceseal.server.request import current

log = logging.getLogger("faceseal.audit")

GENESIS = "0" * 64
SEGMENT = re.compile(r"audit-(\d{8})\.jsonl")
_SUBJECT_CONTEXT = b"faceseal/audit/subject\0"


def derive_audit_key(index_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"faceseal/audit").derive(index_key)


def subject_hmac(audit_key: bytes, gallery: str, subject_id: str) -> str:
    msg = _SUBJECT_CONTEXT + gallery.encode() + b"\0" + subject_id.encode()
    return hmac.digest(audit_key, msg, "sha256").hex()


# One encoder for every record: json.dumps with options builds a new encoder per call.
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def canonical(record: dict[str, Any]) -> bytes:
    return _ENCODE(record).encode()


_stamp_cache: tuple[int, str] = (-1, "")


def _stamp() -> str:
    """The record's UTC time to the second, formatted once per second rather than per record."""
    global _stamp_cache
    now = int(time.time())
    second, text = _stamp_cache
    if second != now:
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        _stamp_cache = (now, text)
    return text


def record_mac(audit_key: bytes, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(audit_key, canonical(body), hashlib.sha256).hexdigest()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if SEGMENT.fullmatch(p.name))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What the core knows about a call; the caller, method and request id come from the request."""

    outcome: str
    gallery: str | None = None
    subject_id: str | None = None
    decision: str | None = None
    candidates: int | None = None


class AuditLog:
    """Appends chained records to numbered segment files in one directory."""

    def __init__(self, directory: Path, max_bytes: int, metrics: Metrics, key: Callable[[], bytes | None]) -> None:
        self._dir = directory
        self._max = max_bytes
        self._metrics = metrics
        self._key = key
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = segments(directory)
        self._number = int(SEGMENT.fullmatch(existing[-1].name).group(1)) if existing else 1  # type: ignore[union-attr]
        self._seq, self._prev = 0, GENESIS
        for path in reversed(existing):
            tail = _recover_tail(path)
            if tail is not None:
                self._seq, self._prev = tail
                break
        self._fd = self._open(self._number)
        self._size = os.fstat(self._fd).st_size  # tracked from here on: no fstat per record
        self._torn = False  # a short write whose cut failed: bytes past _size to cut first

    def _path(self, number: int) -> Path:
        return self._dir / f"audit-{number:08d}.jsonl"

    def _open(self, number: int) -> int:
        return os.open(self._path(number), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def subject_hmac(self, gallery: str, subject_id: str) -> str | None:
        key = self._key()
        return None if key is None else subject_hmac(key, gallery, subject_id)

    def record(self, entry: AuditEntry) -> None:
        """Write one record for the current call; raise Unavailable if it cannot be written."""
        self.record_many((entry,))

    def record_many(self, entries: Sequence[AuditEntry]) -> None:
        """Write one record per entry for the current call with a single ``write``, in order.

        All or none: a failed or short write is cut back off the segment, so the chain never
        holds a record the caller was refused for; if that cut fails, every later record is
        refused until it succeeds. Raises Unavailable if they cannot be written.
        """
        if not entries:
            return  # nothing to record: an empty write would put a blank line in the chain
        info = current()
        key = self._key()
        if key is None:
            raise Unavailable("the daemon is sealed: its audit key is not available; retry later")
        # Everything that does not depend on the chain is prepared outside the lock.
        common = (
            _stamp(),
            info.request_id if info else None,
            info.identity if info else None,
            info.method if info else None,
        )
        bodies = [
            (
                entry.gallery,
                None
                if entry.subject_id is None or entry.gallery is None
                else subject_hmac(key, entry.gallery, entry.subject_id),
                entry.outcome,
                entry.decision,
                entry.candidates,
            )
            for entry in entries
        ]
        with self._lock:
            seq, prev = self._seq, self._prev
            lines = []
            for gallery, subject, outcome, decision, candidates in bodies:
                seq += 1
                body = _ENCODE(
                    {
                        "time": common[0],
                        "seq": seq,
                        "request_id": common[1],
                        "caller": common[2],
                        "method": common[3],
                        "gallery": gallery,
                        "subject": subject,
                        "outcome": outcome,
                        "decision": decision,
                        "candidates": candidates,
                        "prev": prev,
                    }
                ).encode()
                # The MAC covers the canonical body; the line is that body with the MAC appended
                # (any key order parses the same, and verify recomputes the MAC from the parsed record).
                mac = hmac.digest(key, body, "sha256").hex()
                line = body[:-1] + b',"mac":"' + mac.encode() + b'"}'
                prev = line_hash(line)
                lines.append(line)
            data = b"\n".join(lines) + b"\n"
            try:
                self._cut_torn_tail()
                if self._size + len(data) > self._max and self._seq > 0:
                    self._rotate()
                self._write_all_or_nothing(data)
            except OSError as exc:
                self._metrics.audit_failures.inc()
                log.error("audit record not written; refusing the call", extra={"reason": exc.strerror or str(exc)})
                raise Unavailable("the audit log cannot be written; the call was refused and changed nothing") from None
            self._seq, self._prev = seq, prev
        if info is not None:
            info.audited = True
        self._metrics.audit_records.inc(len(lines))

    def _write_all_or_nothing(self, data: bytes) -> None:
        written = os.write(self._fd, data)  # raising, it wrote nothing
        if written != len(data):
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                # The part written stays for now; the next record must not follow it on its line.
                self._torn = True
            raise OSError(errno.ENOSPC, "short write")
        self._size += written

    def _cut_torn_tail(self) -> None:
        """Cut what a short write left, before anything else is written; raise while it cannot be."""
        if self._torn:
            os.ftruncate(self._fd, self._size)
            self._torn = False

    def _rotate(self) -> None:
        # The new segment is opened before the old one is closed: if the open fails, this log
        # still holds a valid descriptor (never a closed number the process may reuse).
        fd = self._open(self._number + 1)
        try:
            os.fsync(self._fd)
        except OSError:
            os.close(fd)
            raise
        os.close(self._fd)
        self._number, self._fd = self._number + 1, fd
        self._size = os.fstat(fd).st_size

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


def _recover_tail(path: Path) -> tuple[int, str] | None:
    """(seq, hash) of the last whole record in ``path``; cut off a torn last line."""
    if not path.is_file():  # e.g. a device an operator pointed the segment at: nothing to resume
        return None
    data = path.read_bytes()
    if not data:
        return None
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("cutting a torn audit record left by a crash", extra={"segment": path.name})
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
        if not data:
            return None
    last = data[:-1].rsplit(b"\n", 1)[-1]
    return int(json.loads(last)["seq"]), line_hash(last)
