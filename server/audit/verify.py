"""``faceseald audit verify``: walk the chain and name the first broken record. Pure."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from faceseal.server.audit.log import GENESIS, line_hash, record_mac


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    records: int
    problem: str = ""


def verify(paths: Iterable[Path], audit_key: bytes | None) -> Verdict:
    """Check sequence numbers, the hash chain and (with ``audit_key``) every record's HMAC.

    Without the key only the chain is checked, which an attacker could recompute after an edit:
    the HMAC is what makes an edit detectable, so the CLI says loudly when it was not checked.
    """
    prev, seq, count = GENESIS, 0, 0
    for path in paths:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                if not raw.endswith(b"\n"):
                    return Verdict(False, count, f"{where}: torn record (no line end)")
                line = raw[:-1]
                try:
                    record = json.loads(line)
                except ValueError:
                    return Verdict(False, count, f"{where}: not a JSON record")
                if not isinstance(record, dict):
                    return Verdict(False, count, f"{where}: not a JSON record")
                if record.get("prev") != prev:
                    return Verdict(False, count, f"{where}: chain broken (a record before it was removed or changed)")
                if record.get("seq") != seq + 1:
                    return Verdict(False, count, f"{where}: sequence number {record.get('seq')}, expected {seq + 1}")
                if audit_key is not None and record.get("mac") != record_mac(audit_key, record):
                    return Verdict(False, count, f"{where}: HMAC does not verify (the record was edited or forged)")
                prev, seq, count = line_hash(line), seq + 1, count + 1
    return Verdict(True, count)
