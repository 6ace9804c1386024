"""A store belongs to its KEK, on each seal: a daemon pointed at another KEK of the same kind
(another key file, another HSM key, another Transit key) stays sealed, answers UNAVAILABLE and
says why; pointed back at its own KEK, it serves every template again. Nothing is re-created
or overwritten under the wrong key.

(The core end-to-end modules, test_e2e, test_refusals, test_tamper, test_real_encodings and
test_no_leaks_on_disk, also run on each seal: see tests/seals.py.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import Dev, InProcessDaemon, health, poll, random_encodings, rpc_error
from seals import EACH_SEAL, SealSetup, provision_transit_key

from faceseal.server.config import load_config
from faceseal.server.daemon import Daemon
from faceseal.v1 import faceseal_pb2 as pb

pytestmark = EACH_SEAL

PEOPLE = dict(zip(("ana", "ben", "cleo"), random_encodings(3, seed=950), strict=True))


def _other_kek(dev: Dev, setup: SealSetup, directory: Path) -> dict[str, Any]:
    """The dev config's [seal] table, pointed at a fresh KEK of the same kind."""
    table: dict[str, Any] = dict(dev.config()["seal"])
    if setup.kind == "file":
        path = directory / "other-seal.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        table["key_file"] = str(path)
    elif setup.kind == "pkcs11":
        assert setup.token is not None
        table["key_label"] = setup.token.new_kek("other")
    else:
        assert setup.bao is not None
        table["key_name"], token_file, _ = provision_transit_key(setup.bao, directory)
        table["token_file"] = str(token_file)
    return table


def _wrapped_keys(dev: Dev) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{dev.db_path}?mode=ro", uri=True)) as db:
        return sorted(db.execute("SELECT * FROM wrapped_keys").fetchall())


def test_another_kek_of_the_same_kind_leaves_the_daemon_sealed(
    harness: InProcessDaemon, seal_setup: SealSetup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dev = harness.dev
    harness.start()
    for name, encoding in PEOPLE.items():
        harness.client("enroller").enroll(name, encoding)
    harness.stop()
    own, wrapped = dev.config()["seal"], _wrapped_keys(dev)

    dev.edit_config(lambda c: c.__setitem__("seal", _other_kek(dev, seal_setup, tmp_path)))
    daemon = Daemon(load_config(dev.config_path))
    try:
        with caplog.at_level(logging.WARNING, logger="faceseal.core"):
            daemon.start()
            target = f"127.0.0.1:{daemon.port}"
            poll("a failed unseal", lambda: any("still sealed" in r.message for r in caplog.records) or None)
        assert health(dev, target) == "NOT_SERVING"
        stub = dev.stub(target, "gateway")
        request = pb.MatchRequest(subject_id="ana", probe=list(map(float, PEOPLE["ana"])))
        err = rpc_error(lambda: stub.Match(request, timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "sealed" in (err.details() or "")
        reasons = [str(getattr(r, "reason", "")) for r in caplog.records if "still sealed" in r.message]
        # The seal says the key does not fit; it does not say "unreachable" (nothing to wait for).
        assert reasons
        assert all(
            any(words in reason for words in ("does not open", "does not hold", "authentication failed"))
            for reason in reasons
        ), reasons
    finally:
        dev.close()
        daemon.stop(0)
    assert _wrapped_keys(dev) == wrapped  # nothing re-created or re-wrapped under the wrong key

    dev.edit_config(lambda c: c.__setitem__("seal", own))
    harness.start()
    gateway = harness.client("gateway")
    for name, encoding in PEOPLE.items():
        assert gateway.match(name, encoding).match is True
