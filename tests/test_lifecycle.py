"""The daemon as a process: SIGTERM drains and exits 0, SIGHUP reloads the policy without dropping
connections, and a broken policy on SIGHUP is refused while the old one stays in force."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import Dev, SubprocessDaemon, health, poll, random_encodings, rpc_code

from faceseal.client import PermissionDeniedError
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc

pytestmark = pytest.mark.slow

GRACE = 3.0
ALICE, BOB = random_encodings(2, seed=400)
REFUSED = "reload refused"


def _serving(status: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status.status))


def test_sigterm_exits_0_and_the_port_closes(subprocess_daemon: SubprocessDaemon) -> None:
    subprocess_daemon.dev.set_server(grace_seconds=GRACE)
    subprocess_daemon.start()
    target = subprocess_daemon.target
    with subprocess_daemon.dev.client(target, "enroller") as enroller:
        enroller.enroll("alice", ALICE)

    started = time.monotonic()
    assert subprocess_daemon.stop(timeout=GRACE + 10) == 0
    assert time.monotonic() - started < GRACE + 5
    assert health(subprocess_daemon.dev, target) == "UNAVAILABLE"  # nobody listens any more
    assert '"msg":"stopped"' in subprocess_daemon.log()

    # What was acknowledged before the signal is there after a restart.
    subprocess_daemon.start()
    with subprocess_daemon.dev.client(subprocess_daemon.target, "gateway") as gateway:
        assert gateway.match("alice", ALICE).match is True


@contextlib.contextmanager
def _held_while_building(subprocess_daemon: SubprocessDaemon) -> Iterator[None]:
    """Start the daemon with its policy file replaced by a FIFO and hold it there: inside the
    block the daemon is building itself, blocked reading its policy, so a signal sent there
    lands mid-build every time.

    On leaving, a regular file takes the FIFO's place (for any later read, e.g. a reload) and
    the policy is written into the FIFO, which lets the build go on.
    """
    dev = subprocess_daemon.dev
    policy = dev.config_path.parent / dev.config()["server"]["policy"]
    text = policy.read_bytes()
    fifo = policy.with_name("policy-fifo.toml")
    os.mkfifo(fifo, 0o600)
    dev.set_server(policy=str(fifo))
    subprocess_daemon.launch()

    def reader_waiting() -> int | None:
        assert subprocess_daemon.proc is not None
        assert subprocess_daemon.proc.poll() is None, f"faceseald exited:\n{subprocess_daemon.log()}"
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: nobody has it open for reading yet
                raise
            return None

    writer = poll("the daemon to open its policy", reader_waiting)
    os.set_blocking(writer, True)
    try:
        yield
    finally:
        regular = fifo.with_suffix(".new")
        regular.write_bytes(text)
        os.replace(regular, fifo)
        with os.fdopen(writer, "wb") as w:
            w.write(text)


def test_sigterm_while_starting_exits_0(subprocess_daemon: SubprocessDaemon) -> None:
    """A stop during start-up (store, keys, TLS still loading) is a clean stop, not a kill."""
    with _held_while_building(subprocess_daemon):
        subprocess_daemon.send(signal.SIGTERM)
    code = subprocess_daemon.wait(timeout=15)
    log = subprocess_daemon.log()
    assert code == 0, f"exit code {code}; the log:\n{log}"
    assert '"msg":"signal received; draining"' in log
    assert '"msg":"listening"' not in log  # it stopped without ever serving


def test_sighup_while_starting_is_applied_once_started_not_fatal(subprocess_daemon: SubprocessDaemon) -> None:
    """SIGHUP's default action ends a process; one sent during start-up (a reload hook firing
    early) must not take the daemon down, and is carried out once the daemon exists."""
    with _held_while_building(subprocess_daemon):
        subprocess_daemon.send(signal.SIGHUP)
    dev, target = subprocess_daemon.dev, subprocess_daemon.target
    poll("the daemon to serve", lambda: health(dev, target, timeout=1.0) == "SERVING" or None)
    log = subprocess_daemon.log()
    # The reload runs before the daemon listens: the files may have changed during the build.
    assert log.index('"msg":"policy and certificates reloaded"') < log.index('"msg":"listening"')
    assert subprocess_daemon.stop() == 0


def test_sigterm_reports_not_serving_then_ends_in_flight_calls_within_grace(
    subprocess_daemon: SubprocessDaemon,
) -> None:
    dev: Dev = subprocess_daemon.dev
    dev.set_server(grace_seconds=GRACE)
    subprocess_daemon.start()
    target = subprocess_daemon.target
    watch = health_pb2_grpc.HealthStub(dev.channel(target, "gateway")).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=GRACE + 20
    )
    assert _serving(next(watch)) == "SERVING"

    started = time.monotonic()
    subprocess_daemon.send(signal.SIGTERM)
    # A load balancer watching health learns first that the daemon is going away...
    assert _serving(next(watch)) == "NOT_SERVING"
    # ...then the stream, still in flight, is ended when the grace period runs out, and the
    # process exits cleanly.
    with pytest.raises(grpc.RpcError):
        next(watch)
    assert subprocess_daemon.wait(GRACE + 10) == 0
    assert time.monotonic() - started < GRACE + 5
    assert health(dev, target) == "UNAVAILABLE"


def test_sighup_reloads_the_policy_without_dropping_connections(
    subprocess_daemon: SubprocessDaemon,
) -> None:
    dev = subprocess_daemon.dev
    subprocess_daemon.start()
    target = subprocess_daemon.target
    dev.client(target, "enroller").enroll("alice", ALICE)

    channel = dev.channel(target, "gateway")
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append, try_to_connect=True)
    try:
        stub = faceseal_pb2_grpc.FaceSealServiceStub(channel)
        probe = list(map(float, ALICE))
        match = pb.MatchRequest(subject_id="alice", probe=probe)
        identify = pb.IdentifyRequest(probe=probe, top_k=5)
        assert stub.Match(match, timeout=5).match is True
        poll("the channel to be READY", lambda: states[-1:] == [grpc.ChannelConnectivity.READY] or None)
        ready_at = len(states)

        dev.edit_caller("gateway", permissions=["identify"])
        subprocess_daemon.send(signal.SIGHUP)

        def refused() -> grpc.StatusCode | None:
            try:
                stub.Match(match, timeout=5)
            except grpc.RpcError as err:
                code: grpc.StatusCode = err.code()
                return code
            return None

        assert poll("Match to be refused after SIGHUP", refused) == grpc.StatusCode.PERMISSION_DENIED
        # Other calls go on over the very same connection.
        assert [c.subject_id for c in stub.Identify(identify, timeout=5).candidates] == ["alice"]
        assert states[ready_at:] == [], f"the connection changed state: {states[ready_at:]}"
    finally:
        channel.unsubscribe(states.append)

    # The enroller's rights were not touched by the reload.
    dev.client(target, "enroller").enroll("bob", BOB)
    # The reload thread logs just after the new policy takes effect: wait for the line.
    poll("the reload's log line", lambda: "policy and certificates reloaded" in subprocess_daemon.log() or None)


def _not_toml(dev: Dev) -> None:
    dev.policy_path.write_text("[[callers]\nidentity = ", encoding="utf-8")


def _unknown_permission(dev: Dev) -> None:
    # Would also take the gateway's match right away, if it were (wrongly) half applied.
    dev.edit_caller("gateway", permissions=["identify", "fly"])


def _bad_disclosure(dev: Dev) -> None:
    dev.edit_caller("gateway", permissions=["identify"], disclosure="everything")


def _removed(dev: Dev) -> None:
    dev.policy_path.unlink()


BROKEN = {
    "not-toml": _not_toml,
    "unknown-permission": _unknown_permission,
    "bad-disclosure": _bad_disclosure,
    "file-removed": _removed,
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_broken_policy_on_sighup_is_refused_and_the_old_one_stays(
    subprocess_daemon: SubprocessDaemon, breakage: str
) -> None:
    dev = subprocess_daemon.dev
    subprocess_daemon.start()
    target = subprocess_daemon.target
    gateway, enroller = dev.client(target, "gateway"), dev.client(target, "enroller")
    enroller.enroll("alice", ALICE)
    good_policy = dev.policy()

    BROKEN[breakage](dev)
    refusals = subprocess_daemon.log().count(REFUSED)
    subprocess_daemon.send(signal.SIGHUP)
    poll("the reload to be refused", lambda: subprocess_daemon.log().count(REFUSED) > refusals or None)

    # The running policy is the old one: every role keeps exactly its rights.
    assert gateway.match("alice", ALICE).match is True
    assert [c.subject_id for c in gateway.identify(ALICE)] == ["alice"]
    assert gateway.match("alice", BOB).distance is None
    with pytest.raises(PermissionDeniedError):
        gateway.enroll("bob", BOB)
    enroller.enroll("bob", BOB)
    assert health(dev, target) == "SERVING"

    # Once the file is fixed, the next SIGHUP applies it.
    dev.write_policy(good_policy)
    dev.edit_caller("gateway", permissions=["identify"])
    subprocess_daemon.send(signal.SIGHUP)
    stub = dev.stub(target, "gateway")
    request = pb.MatchRequest(subject_id="alice", probe=list(map(float, ALICE)))

    def denied() -> bool | None:
        try:
            stub.Match(request, timeout=5)
        except grpc.RpcError:
            return True
        return None

    poll("the fixed policy to be applied", denied)
    assert rpc_code(lambda: stub.Match(request, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    assert [c.subject_id for c in gateway.identify(ALICE)] == ["alice"]
