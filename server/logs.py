"""Structured logs: one JSON object per line, on stderr.

Only fields our own code put in ``extra=`` are written, and that code never passes a template,
probe, distance, key or subject id; the formatter does not print exception text either, since a
library's exception message can quote the data it choked on.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from faceseal.server.request import current

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        info = current()
        if info is not None:  # every line logged while handling a call names the call and caller
            entry["request_id"] = info.request_id
            entry["caller"] = info.identity or None
            entry["method"] = info.method
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception_type"] = record.exc_info[0].__name__
        return json.dumps(entry, separators=(",", ":"))


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
