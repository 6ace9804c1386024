"""Sealed start: a daemon whose seal cannot answer yet listens, reports NOT_SERVING, answers
UNAVAILABLE ("sealed"), keeps retrying, and serves within seconds of the seal coming up, with
no restart.

* Transit: the OpenBao server is configured (port, key name, token file) but not started when
  the daemon starts; it is started later, which provisions the key and the token.
* PKCS#11: the token is there but the HSM key is not created yet. (A token that is absent at
  start cannot be tested with SoftHSM2: a running process never sees a token initialised after
  its C_Initialize, so there is no "plugging in" to wait for.)
* The retry schedule: however long the seal was down, the next attempt comes within a few
  seconds of it coming back.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import Dev, SubprocessDaemon, free_port, health, poll, random_encodings, rpc_error
from prometheus_client.parser import text_string_to_metric_families
from seals import pkcs11_table, transit_table

from faceseal.server.config import load_config
from faceseal.server.core import Core
from faceseal.server.daemon import Daemon
from faceseal.server.seal.base import SealUnreachable
from faceseal.v1 import faceseal_pb2 as pb

try:
    from tests.openbao import OpenBao, openbao_factory
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): only tests/ is on sys.path
    from openbao import OpenBao, openbao_factory  # type: ignore[no-redef] # noqa: F401

pytestmark = pytest.mark.slow

# The acceptance: serving "within a few seconds" of the seal coming up.
SERVE_DEADLINE = 10.0
ALICE, BOB = random_encodings(2, seed=700)


class SealedAtStart(SubprocessDaemon):
    """``faceseald serve`` whose ``start`` returns once it listens and reports NOT_SERVING (the
    base class's loop takes "SERVING" from ``_started`` to mean "up as expected")."""

    def _started(self) -> str | None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            return f"exit code {code}"
        return "SERVING" if health(self.dev, self.target, timeout=1.0) == "NOT_SERVING" else None


@pytest.fixture
def sealed_daemon(dev: Dev, tmp_path: Path) -> Iterator[SealedAtStart]:
    runner = SealedAtStart(dev, tmp_path / "faceseald.log")
    yield runner
    dev.close()
    runner.ensure_stopped()


def log_records(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a daemon log."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def use_table(dev: Dev, table: dict[str, Any]) -> None:
    dev.edit_config(lambda c: c.__setitem__("seal", table))
    (dev.dir / "seal.key").unlink(missing_ok=True)


def metrics_port(log: str) -> int:
    """The metrics port the daemon logged at its last start (the harness listens on port 0)."""
    ports = [r["port"] for r in log_records(log) if r.get("msg") == "metrics listening"]
    assert ports, "the daemon logged no metrics listener"
    port: int = ports[-1]
    return port


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of http://127.0.0.1:PORT/metrics, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def assert_sealed(daemon: SubprocessDaemon) -> None:
    """NOT_SERVING, and the four operations answer UNAVAILABLE saying the daemon is sealed."""
    dev, target = daemon.dev, daemon.target
    assert health(dev, target) == "NOT_SERVING"
    probe = list(map(float, ALICE))
    enroller, gateway = dev.stub(target, "enroller"), dev.stub(target, "gateway")
    calls: dict[str, Callable[[], object]] = {
        "Enroll": lambda: enroller.Enroll(pb.EnrollRequest(subject_id="alice", encoding=probe), timeout=5),
        "Delete": lambda: enroller.Delete(pb.DeleteRequest(subject_id="alice"), timeout=5),
        "Match": lambda: gateway.Match(pb.MatchRequest(subject_id="alice", probe=probe), timeout=5),
        "Identify": lambda: gateway.Identify(pb.IdentifyRequest(probe=probe, top_k=5), timeout=5),
    }
    for method, call in calls.items():
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, method
        assert "sealed" in (err.details() or ""), method


def wait_serving(daemon: SubprocessDaemon, since: float) -> float:
    """Poll health until SERVING; the seconds it took from ``since``.

    ``since`` is when the seal came up (its set-up returned), so the time is the daemon's: its
    retry backoff is capped at 5 s (``Core.unseal_until``), so the next attempt comes at most 5 s
    later; the rest of SERVE_DEADLINE is for that attempt and the health poll on a loaded machine.
    A daemon that stopped retrying, or waits far longer between attempts, fails here.
    """
    poll(
        f"SERVING within {SERVE_DEADLINE:g} s of the seal coming up",
        lambda: health(daemon.dev, daemon.target, timeout=1.0) == "SERVING" or None,
        deadline=SERVE_DEADLINE,
        every=0.1,
    )
    return time.monotonic() - since


def assert_serves(daemon: SubprocessDaemon) -> None:
    dev, target = daemon.dev, daemon.target
    enroller, gateway = dev.client(target, "enroller"), dev.client(target, "gateway")
    assert enroller.enroll("alice", ALICE).template_count == 1
    assert gateway.match("alice", ALICE).match is True
    assert gateway.match("alice", BOB).match is False


def retries(log: str) -> list[dict[str, Any]]:
    return [r for r in log_records(log) if r.get("msg") == "still sealed; retrying"]


def first_retries(daemon: SubprocessDaemon) -> list[dict[str, Any]]:
    """The retry lines logged so far, once there is at least one.

    NOT_SERVING is reported from the start, but the line is written only when the unseal
    thread's first attempt has failed, which takes a while (an HTTP connect, a PKCS#11 module
    load): hence a poll, not a read.
    """
    return poll("the daemon to log a failed unseal attempt", lambda: retries(daemon.log()) or None)


# ------------------------------------------------------------------------------------- Transit


def test_transit_down_at_start_then_serves_without_restart(
    sealed_daemon: SealedAtStart, openbao_factory: Callable[..., OpenBao]
) -> None:
    # A fixed port: if another process took it meanwhile, start() fails instead of moving away.
    bao = openbao_factory(port=free_port(), start=False)
    use_table(sealed_daemon.dev, transit_table(bao.address, bao.key_name, bao.token_file))

    sealed_daemon.start()
    pid = sealed_daemon.pid
    assert_sealed(sealed_daemon)
    first = first_retries(sealed_daemon)
    assert all("cannot reach the engine" in r["reason"] for r in first), first

    bao.start()  # returns once OpenBao is healthy, Transit enabled, the key and the token made
    took = wait_serving(sealed_daemon, time.monotonic())
    assert sealed_daemon.proc is not None
    assert sealed_daemon.proc.poll() is None
    assert sealed_daemon.pid == pid  # the same process: no restart
    assert took < SERVE_DEADLINE
    assert_serves(sealed_daemon)
    assert sealed_daemon.stop() == 0

    log = sealed_daemon.log()
    assert [r["seal"] for r in log_records(log) if r.get("msg") == "unsealed"] == [
        f"transit:{bao.address}/transit/keys/{bao.key_name}"
    ]
    for secret in (bao.seal_token, bao.root_token):
        assert secret not in log


def test_sealed_gauge_follows_the_seal(dev: Dev, openbao_factory: Callable[..., OpenBao]) -> None:
    """faceseal_sealed is 1 while sealed and 0 once unsealed (scraped from the metrics port)."""
    bao = openbao_factory(port=free_port(), start=False)
    use_table(dev, transit_table(bao.address, bao.key_name, bao.token_file))
    daemon = Daemon(load_config(dev.config_path))  # metrics listen on 127.0.0.1:0 (init_dev)
    try:
        daemon.start()
        target = f"127.0.0.1:{daemon.port}"
        assert daemon.metrics_port is not None
        poll("NOT_SERVING", lambda: health(dev, target) == "NOT_SERVING" or None)
        assert scrape(daemon.metrics_port)["faceseal_sealed"] == 1
        bao.start()
        poll("SERVING", lambda: health(dev, target, timeout=1.0) == "SERVING" or None, deadline=SERVE_DEADLINE)
        assert scrape(daemon.metrics_port)["faceseal_sealed"] == 0
    finally:
        dev.close()
        daemon.stop(0)


# ------------------------------------------------------------------------------------- PKCS#11


def test_pkcs11_key_created_after_start_then_serves_without_restart(
    sealed_daemon: SealedAtStart, request: pytest.FixtureRequest
) -> None:
    token = request.getfixturevalue("softhsm_token")
    label = token.new_label()  # no key under it yet
    use_table(sealed_daemon.dev, pkcs11_table(token, label))

    sealed_daemon.start()  # SOFTHSM2_CONF reaches the child through this process's environment
    pid = sealed_daemon.pid
    assert_sealed(sealed_daemon)
    first = first_retries(sealed_daemon)
    assert all("no secret key with this label" in r["reason"] for r in first), first

    from faceseal.server.seal.pkcs11 import create_kek

    create_kek(token.module, token.token_label, label, token.pin)  # the HSM admin's step
    took = wait_serving(sealed_daemon, time.monotonic())
    assert sealed_daemon.pid == pid
    assert took < SERVE_DEADLINE
    assert_serves(sealed_daemon)
    assert sealed_daemon.stop() == 0
    assert token.pin not in sealed_daemon.log()


# ------------------------------------------------------------------------------ retry schedule


class _Clock:
    """Stands in for the stop event: records each wait, sets itself after ``attempts`` waits."""

    def __init__(self, attempts: int) -> None:
        self.waits: list[float] = []
        self._attempts = attempts

    def is_set(self) -> bool:
        return len(self.waits) >= self._attempts

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return self.is_set()


class _DownSeal:
    """A core whose seal never answers."""

    def __init__(self) -> None:
        self.attempts = 0

    def unseal(self) -> None:
        self.attempts += 1
        raise SealUnreachable("the engine is down (test)")


def test_retry_interval_stays_short_however_long_the_seal_was_down() -> None:
    """After an hour of outage the next attempt still comes within a few seconds of recovery:
    the backoff must be capped at a few seconds, not tens of seconds."""
    clock, core = _Clock(attempts=60), _DownSeal()
    Core.unseal_until(core, clock)  # type: ignore[arg-type]
    assert core.attempts == 60
    assert clock.waits[0] <= 1.0  # the first retries are quick
    assert clock.waits == sorted(clock.waits)  # backing off, never faster
    assert max(clock.waits) <= 5.0, f"the retry interval grows to {max(clock.waits):g} s"
