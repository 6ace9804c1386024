"""The edge's caches must not outlive what they cache: a certificate parsed once is still checked
against the policy in force at every call, so a reload that revokes it, or that drops or narrows
its caller's rule, applies to the very next call on a connection that is already open."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import TRUST_DOMAIN, Dev, InProcessDaemon, dump_policy, random_encodings, rpc_error, write_atomically

from faceseal.server import pki
from faceseal.server.auth.interceptor import Authenticator, Peer, PeerCache
from faceseal.server.daemon import Daemon
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc

(ALICE,) = random_encodings(1, seed=4242)


def _authenticator(daemon: InProcessDaemon) -> Authenticator:
    assert daemon.daemon is not None
    return daemon.daemon.authenticator


def _running(daemon: InProcessDaemon) -> Daemon:
    assert daemon.daemon is not None
    return daemon.daemon


def _match_call(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[pb.MatchRequest, pb.MatchResponse]:
    return faceseal_pb2_grpc.FaceSealServiceStub(channel).Match


MATCH = pb.MatchRequest(subject_id="alice", probe=list(map(float, ALICE)))


@pytest.fixture
def kiosk(harness: InProcessDaemon) -> tuple[InProcessDaemon, grpc.Channel]:
    """A running daemon, alice enrolled, and an open kiosk connection whose certificate is cached."""
    harness.dev.add_caller("kiosk", ["match"])
    harness.start()
    harness.client("enroller").enroll("alice", ALICE)
    channel = harness.dev.channel(harness.target, "kiosk")
    assert _match_call(channel)(MATCH, timeout=5).match is True
    return harness, channel


def _serial(dev: Dev, profile: str) -> int:
    return x509.load_pem_x509_certificate((dev.dir / "clients" / f"{profile}.crt").read_bytes()).serial_number


def test_a_revocation_applies_to_a_cached_certificate_at_its_next_call(
    kiosk: tuple[InProcessDaemon, grpc.Channel],
) -> None:
    daemon, channel = kiosk
    pem = (daemon.dev.dir / "clients" / "kiosk.crt").read_bytes()
    assert pem in _authenticator(daemon).peers  # parsed once, kept

    text = dump_policy(daemon.dev.policy()) + f'[revoked]\nserials = ["{_serial(daemon.dev, "kiosk"):x}"]\n'
    write_atomically(daemon.dev.policy_path, text)
    _running(daemon).reload()

    # The same connection, the same cached certificate: refused, on both kinds of service.
    err = rpc_error(lambda: _match_call(channel)(MATCH, timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.details() or "")
    health = health_pb2_grpc.HealthStub(channel)
    assert rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert daemon.client("gateway").match("alice", ALICE).match is True


def test_a_policy_change_applies_to_a_cached_caller_at_its_next_call(
    kiosk: tuple[InProcessDaemon, grpc.Channel],
) -> None:
    daemon, channel = kiosk
    match = _match_call(channel)

    daemon.dev.edit_caller("kiosk", permissions=["identify"])  # match taken away
    _running(daemon).reload()
    assert rpc_error(lambda: match(MATCH, timeout=5)).code() == grpc.StatusCode.PERMISSION_DENIED

    callers = daemon.dev.policy()
    (entry,) = [c for c in callers if c["identity"] == f"{TRUST_DOMAIN}/kiosk"]
    daemon.dev.write_policy([c for c in callers if c is not entry])  # the kiosk is no caller at all
    _running(daemon).reload()
    assert rpc_error(lambda: match(MATCH, timeout=5)).code() == grpc.StatusCode.UNAUTHENTICATED

    daemon.dev.write_policy([*daemon.dev.policy(), {**entry, "permissions": ["match"]}])
    _running(daemon).reload()
    assert match(MATCH, timeout=5).match is True


def test_every_call_gets_its_own_request_id(kiosk: tuple[InProcessDaemon, grpc.Channel]) -> None:
    _daemon, channel = kiosk
    ids = []
    for _ in range(3):
        _response, call = _match_call(channel).with_call(MATCH, timeout=5)
        (request_id,) = [v for k, v in call.trailing_metadata() or () if k == "x-request-id"]
        assert isinstance(request_id, str)
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        ids.append(request_id)
    assert len(set(ids)) == 3


def test_the_peer_cache_is_bounded_and_keyed_by_the_whole_certificate(dev: Dev) -> None:
    ca = dev.ca()
    now = datetime.now(UTC)
    # Three certificates for one identity: same name, different serials and fingerprints.
    pems = [
        pki.issue_client(
            ca, "kiosk", spiffe_id=f"{TRUST_DOMAIN}/kiosk", not_before=now - timedelta(minutes=1), not_after=now
        ).cert_pem()
        for _ in range(3)
    ]
    cache = PeerCache(size=2)
    first = cache.get(pems[0])
    assert cache.get(pems[0]) is first  # parsed once
    assert first == Peer.parse(pems[0])
    assert first.identity == f"{TRUST_DOMAIN}/kiosk"
    assert first.not_after == pytest.approx(now.replace(microsecond=0).timestamp(), abs=1)
    second, third = cache.get(pems[1]), cache.get(pems[2])
    assert len({first.serial, second.serial, third.serial}) == 3
    assert len({first.sha256, second.sha256, third.sha256}) == 3
    assert len(cache) == 2  # the oldest went
    assert cache.get(pems[0]) is not first  # so it is parsed again
    assert len(cache) == 2
