"""Certificates that must not get in: revoked ones (the policy's ``[revoked]`` list, by serial or
by SHA-256 fingerprint, applied per call and on SIGHUP), expired, not yet valid, or from another
CA (all three refused by the TLS handshake itself), and one that expires while its connection is
open (refused at its next call). A certificate that is not listed keeps working throughout."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    TRUST_DOMAIN,
    Dev,
    InProcessDaemon,
    SubprocessDaemon,
    dump_policy,
    poll,
    random_encodings,
    rpc_code,
    rpc_error,
    write_atomically,
)

from faceseal.server import pki
from faceseal.server.auth.policy import parse_policy
from faceseal.server.errors import ConfigError
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc

ALICE, BOB = random_encodings(2, seed=700)
SOURCE = "/etc/faceseal/policy-under-test.toml"


# ------------------------------------------------------------------------------------ helpers


def _cert(dev: Dev, profile: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((dev.dir / "clients" / f"{profile}.crt").read_bytes())


def _serial_hex(dev: Dev, profile: str) -> str:
    return hex(_cert(dev, profile).serial_number)


def _fingerprint(dev: Dev, profile: str) -> bytes:
    return _cert(dev, profile).fingerprint(hashes.SHA256())


def _revoke(dev: Dev, *, serials: tuple[str, ...] = (), sha256: tuple[str, ...] = ()) -> None:
    """Rewrite the policy with the same callers and this ``[revoked]`` table."""
    text = dump_policy(dev.policy()) + "[revoked]\n"
    text += f"serials = [{', '.join(repr(s) for s in serials)}]\n"
    text += f"sha256 = [{', '.join(repr(s) for s in sha256)}]\n"
    write_atomically(dev.policy_path, text)


def _add_kiosk(dev: Dev) -> None:
    """A second gateway-like caller, the one the tests revoke; ``gateway`` stays untouched."""
    dev.add_caller("kiosk", ["match", "identify"])


def _match(stub: faceseal_pb2_grpc.FaceSealServiceStub) -> Callable[[], object]:
    request = pb.MatchRequest(subject_id="alice", probe=list(map(float, ALICE)))
    return lambda: stub.Match(request, timeout=5)


def _health_check(channel: grpc.Channel) -> Callable[[], object]:
    stub = health_pb2_grpc.HealthStub(channel)
    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


def _denied(daemon: InProcessDaemon, reason: str) -> float:
    assert daemon.daemon is not None
    value = daemon.daemon.registry.get_sample_value("faceseal_auth_denied_total", {"reason": reason})
    return value or 0.0


def _assert_revoked_refused(daemon: InProcessDaemon, profile: str) -> None:
    before = _denied(daemon, "revoked")
    channel = daemon.dev.channel(daemon.target, profile)
    err = rpc_error(_match(faceseal_pb2_grpc.FaceSealServiceStub(channel)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.details() or "")
    # Not even the open services answer a revoked certificate.
    assert rpc_code(_health_check(channel)) == grpc.StatusCode.UNAUTHENTICATED
    assert _denied(daemon, "revoked") == before + 2


def _assert_gateway_served(daemon: InProcessDaemon) -> None:
    assert daemon.client("gateway").match("alice", ALICE).match is True


# --------------------------------------------------------------------------- the policy file


@pytest.mark.parametrize(
    ("serial", "expected"),
    [
        ("0x1a2B", 0x1A2B),
        ("1A2B", 0x1A2B),
        ("1a:2b", 0x1A2B),
        ("0X" + "f" * 40, int("f" * 40, 16)),
    ],
)
def test_revoked_serials_accept_the_usual_spellings(serial: str, expected: int) -> None:
    policy = parse_policy(f"[revoked]\nserials = [{serial!r}]\n", SOURCE)
    assert policy.revoked.serials == {expected}
    assert policy.revoked.revokes(expected, b"")


def test_revoked_fingerprints_accept_colons_or_plain_hex() -> None:
    digest = bytes(range(32))
    colons = ":".join(f"{b:02X}" for b in digest)
    policy = parse_policy(f"[revoked]\nsha256 = [{colons!r}, {digest.hex()!r}]\n", SOURCE)
    assert policy.revoked.sha256 == {digest}
    assert policy.revoked.revokes(1, digest)
    assert not policy.revoked.revokes(1, bytes(32))


def test_no_revoked_table_revokes_nothing() -> None:
    policy = parse_policy('[[callers]]\nidentity = "a"\npermissions = ["match"]\ngalleries = ["*"]\n', SOURCE)
    assert len(policy.revoked) == 0
    assert not policy.revoked.revokes(0x1A2B, bytes(32))


@pytest.mark.parametrize(
    ("table", "names"),
    [
        ('serials = ["0x1a2b", "xyz"]', "revoked.serials[1]"),
        ('serials = ["0x"]', "revoked.serials[0]"),
        ('serials = ["' + "a" * 41 + '"]', "revoked.serials[0]"),
        ('serials = ["1a:2b:"]', "revoked.serials[0]"),
        ('serials = [" 1a2b"]', "revoked.serials[0]"),
        ("serials = [6699]", "'serials' must be a list of strings"),
        ('serials = "0x1a2b"', "'serials' must be a list of strings"),
        ('sha256 = ["ab:cd"]', "revoked.sha256[0]"),
        ('sha256 = ["' + "g" * 64 + '"]', "revoked.sha256[0]"),
        ('sha256 = ["' + "a" * 63 + '"]', "revoked.sha256[0]"),
        ('sha256 = ["sha256:' + "a" * 64 + '"]', "revoked.sha256[0]"),
        ('serial = ["0x1a2b"]', "'revoked.serial' is not a known setting"),
    ],
)
def test_a_bad_revoked_entry_is_refused_naming_it(table: str, names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(f"[revoked]\n{table}\n", SOURCE)
    assert SOURCE in str(caught.value)
    assert names in str(caught.value)


def test_revoked_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="'revoked' must be a table"):
        parse_policy('revoked = ["0x1a2b"]\n', SOURCE)


# ------------------------------------------------------------------------ a running daemon


def test_certificate_revoked_by_serial_is_refused(harness: InProcessDaemon, caplog: pytest.LogCaptureFixture) -> None:
    dev = harness.dev
    _add_kiosk(dev)
    _revoke(dev, serials=(_serial_hex(dev, "kiosk"),))
    harness.start()
    dev.client(harness.target, "enroller").enroll("alice", ALICE)

    with caplog.at_level(logging.WARNING, logger="faceseal.auth"):
        _assert_revoked_refused(harness, "kiosk")
    # The log says which certificate (by fingerprint) was refused, and why.
    records = [r for r in caplog.records if r.getMessage() == "revoked certificate refused"]
    assert records
    assert {getattr(r, "sha256", None) for r in records} == {_fingerprint(dev, "kiosk").hex()}
    _assert_gateway_served(harness)


def test_certificate_revoked_by_fingerprint_is_refused(harness: InProcessDaemon) -> None:
    dev = harness.dev
    _add_kiosk(dev)
    digest = _fingerprint(dev, "kiosk")
    _revoke(dev, sha256=(":".join(f"{b:02X}" for b in digest),))  # as openssl -fingerprint prints it
    harness.start()
    dev.client(harness.target, "enroller").enroll("alice", ALICE)
    _assert_revoked_refused(harness, "kiosk")
    _assert_gateway_served(harness)


def test_a_certificate_not_on_the_list_still_works(harness: InProcessDaemon) -> None:
    dev = harness.dev
    _add_kiosk(dev)
    # Another certificate for the very same identity is revoked; the kiosk's own one is not.
    old = pki.issue_client(dev.ca(), "kiosk", spiffe_id=f"{TRUST_DOMAIN}/kiosk")
    _revoke(dev, serials=(hex(old.cert.serial_number),), sha256=(old.cert.fingerprint(hashes.SHA256()).hex(),))
    harness.start()
    dev.client(harness.target, "enroller").enroll("alice", ALICE)
    assert harness.client("kiosk").match("alice", ALICE).match is True
    assert _denied(harness, "revoked") == 0
    _assert_gateway_served(harness)


@pytest.mark.slow
def test_revocation_applies_on_sighup_to_an_open_connection(subprocess_daemon: SubprocessDaemon) -> None:
    dev = subprocess_daemon.dev
    _add_kiosk(dev)
    subprocess_daemon.start()
    target = subprocess_daemon.target
    dev.client(target, "enroller").enroll("alice", ALICE)

    channel = dev.channel(target, "kiosk")
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append, try_to_connect=True)
    try:
        match = _match(faceseal_pb2_grpc.FaceSealServiceStub(channel))
        match()
        poll("the kiosk's channel to be READY", lambda: states[-1:] == [grpc.ChannelConnectivity.READY] or None)
        ready_at = len(states)

        _revoke(dev, serials=(_serial_hex(dev, "kiosk"),))
        subprocess_daemon.send(signal.SIGHUP)

        def refused() -> grpc.StatusCode | None:
            try:
                match()
            except grpc.RpcError as err:
                code: grpc.StatusCode = err.code()
                return code
            return None

        # The daemon was not restarted and the connection was not dropped: the check is per call.
        assert poll("the kiosk to be refused after SIGHUP", refused) == grpc.StatusCode.UNAUTHENTICATED
        assert states[ready_at:] == [], f"the connection changed state: {states[ready_at:]}"
    finally:
        channel.unsubscribe(states.append)
    assert subprocess_daemon.proc is not None
    assert subprocess_daemon.proc.poll() is None, "the daemon must not have restarted or exited"

    # Everyone else goes on as before.
    assert dev.client(target, "gateway").match("alice", ALICE).match is True
    dev.client(target, "enroller").enroll("bob", BOB)
    log = subprocess_daemon.log()
    assert '"revoked":1' in log  # the reload line counts the entries it applied
    assert _fingerprint(dev, "kiosk").hex() in log


# -------------------------------------------------------- refused by the TLS handshake itself


def _refused_at_handshake(daemon: InProcessDaemon, issued: pki.Issued) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(daemon.dev.dir / "ca.crt").read_bytes(),
        private_key=issued.key_pem(),
        certificate_chain=issued.cert_pem(),
    )
    with grpc.secure_channel(daemon.target, credentials) as channel:
        assert rpc_code(_match(faceseal_pb2_grpc.FaceSealServiceStub(channel))) == grpc.StatusCode.UNAVAILABLE
        assert rpc_code(_health_check(channel)) == grpc.StatusCode.UNAVAILABLE
    # Nothing got as far as the policy: no denial was counted, and others are served.
    for reason in ("revoked", "expired", "unknown_identity"):
        assert _denied(daemon, reason) == 0, reason
    _assert_gateway_served(daemon)


@pytest.fixture
def serving(daemon: InProcessDaemon) -> InProcessDaemon:
    daemon.client("enroller").enroll("alice", ALICE)
    return daemon


def test_expired_certificate_is_refused(serving: InProcessDaemon) -> None:
    now = datetime.now(UTC)
    expired = pki.issue_client(
        serving.dev.ca(),
        "gateway",
        spiffe_id=f"{TRUST_DOMAIN}/gateway",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(minutes=1),
    )
    _refused_at_handshake(serving, expired)


def test_not_yet_valid_certificate_is_refused(serving: InProcessDaemon) -> None:
    now = datetime.now(UTC)
    early = pki.issue_client(
        serving.dev.ca(),
        "gateway",
        spiffe_id=f"{TRUST_DOMAIN}/gateway",
        not_before=now + timedelta(hours=1),
        not_after=now + timedelta(days=30),
    )
    _refused_at_handshake(serving, early)


def test_certificate_from_another_ca_is_refused(serving: InProcessDaemon) -> None:
    # Same CA name, same identity, same shape: only the signing key differs.
    rogue_ca = pki.make_ca("faceseal dev CA")
    rogue = pki.issue_client(rogue_ca, "gateway", spiffe_id=f"{TRUST_DOMAIN}/gateway")
    _refused_at_handshake(serving, rogue)


def test_certificate_expiring_on_an_open_connection_is_refused_at_its_next_call(harness: InProcessDaemon) -> None:
    dev = harness.dev
    _add_kiosk(dev)
    harness.start()
    dev.client(harness.target, "enroller").enroll("alice", ALICE)

    # Issued only now, so that its short life is spent on the connection under test rather than
    # on the daemon's start. X.509 keeps whole seconds, so it has 4 to 5 s left: enough for one
    # handshake and call on a loaded machine, short enough to wait for.
    now = datetime.now(UTC)
    short = pki.issue_client(
        dev.ca(),
        "kiosk",
        spiffe_id=f"{TRUST_DOMAIN}/kiosk",
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(seconds=5),
    )
    for name, data in (("kiosk-short.crt", short.cert_pem()), ("kiosk-short.key", short.key_pem())):
        path: Path = dev.dir / "clients" / name
        path.write_bytes(data)
    expires = short.cert.not_valid_after_utc.timestamp()

    channel = dev.channel(harness.target, "kiosk-short")
    match = _match(faceseal_pb2_grpc.FaceSealServiceStub(channel))
    match()  # handshake and call while the certificate is valid

    def refused() -> grpc.RpcError | None:
        """Call again on the same connection: None while served, the error once refused."""
        before = time.time()
        try:
            match()
        except grpc.RpcError as err:
            # The daemon (in this process, on this clock) decided after ``before`` and before
            # now: a refusal while the certificate was still valid would show here.
            assert time.time() > expires, "refused before the certificate expired"
            return err
        assert before <= expires, "served after the certificate expired"
        return None

    # Called again and again until the daemon refuses: every call it serves must have started
    # before the expiry, the refusal must come after it, and it must come (poll's deadline).
    wait = expires - time.time() + 10
    err = poll("the kiosk to be refused once its certificate expired", refused, deadline=wait, every=0.1)
    # The same connection: a new one would fail at the handshake (UNAVAILABLE), as TLS checks the
    # dates only there; this refusal comes from the daemon's own per-call check.
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "validity" in (err.details() or "")
    assert _denied(harness, "expired") == 1
    _assert_gateway_served(harness)
