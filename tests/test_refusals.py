"""Who is refused, and how: no certificate, a foreign CA, plaintext, an unknown identity, a role
without the permission, a caller outside its galleries; and who sees distances."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    TRUST_DOMAIN,
    InProcessDaemon,
    euclidean,
    health,
    nearby,
    random_encodings,
    rpc_code,
    rpc_error,
)
from seals import EACH_SEAL

from faceseal.client import NotFoundError
from faceseal.server import pki
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc

# Once per seal: file, PKCS#11 (SoftHSM2), Transit (OpenBao).
pytestmark = EACH_SEAL

ALICE, BOB, STRANGER = random_encodings(3, seed=100)


def _calls(stub: faceseal_pb2_grpc.FaceSealServiceStub) -> dict[str, Callable[[], object]]:
    """One call of each method, on subjects the tests enroll."""
    probe = list(map(float, ALICE))
    return {
        "Enroll": lambda: stub.Enroll(pb.EnrollRequest(subject_id="mallory", encoding=probe), timeout=5),
        "Match": lambda: stub.Match(pb.MatchRequest(subject_id="alice", probe=probe), timeout=5),
        "Identify": lambda: stub.Identify(pb.IdentifyRequest(probe=probe, top_k=5), timeout=5),
        "Delete": lambda: stub.Delete(pb.DeleteRequest(subject_id="alice"), timeout=5),
    }


def _assert_untouched(daemon: InProcessDaemon) -> None:
    """Alice is still enrolled and nothing was enrolled as 'mallory'."""
    gateway = daemon.client("gateway")
    assert gateway.match("alice", ALICE).match is True
    with pytest.raises(NotFoundError):
        gateway.match("mallory", ALICE)


@pytest.fixture
def enrolled(daemon: InProcessDaemon) -> InProcessDaemon:
    daemon.client("enroller").enroll("alice", ALICE)
    daemon.client("enroller").enroll("bob", BOB)
    return daemon


# ---------------------------------------------------------------------- the TLS handshake refuses


def _foreign_credentials(daemon: InProcessDaemon, issued: pki.Issued) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(daemon.dev.dir / "ca.crt").read_bytes(),
        private_key=issued.key_pem(),
        certificate_chain=issued.cert_pem(),
    )


def _refused_at_handshake(daemon: InProcessDaemon, channel: grpc.Channel) -> None:
    stub = faceseal_pb2_grpc.FaceSealServiceStub(channel)
    for method, call in _calls(stub).items():
        assert rpc_code(call) == grpc.StatusCode.UNAVAILABLE, method
    # Not even health, which any certificate from our CA may read.
    health_stub = health_pb2_grpc.HealthStub(channel)
    code = rpc_code(lambda: health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    _assert_untouched(daemon)


def test_no_client_certificate_is_refused(enrolled: InProcessDaemon) -> None:
    _refused_at_handshake(enrolled, enrolled.dev.channel(enrolled.target, None))


def test_certificate_from_another_ca_is_refused(enrolled: InProcessDaemon) -> None:
    # Same identity as the real enroller, same shape of certificate: only the issuer differs.
    rogue_ca = pki.make_ca("faceseal dev CA")
    rogue = pki.issue_client(rogue_ca, "enroller", spiffe_id=f"{TRUST_DOMAIN}/enroller")
    with grpc.secure_channel(enrolled.target, _foreign_credentials(enrolled, rogue)) as channel:
        _refused_at_handshake(enrolled, channel)


def test_expired_certificate_from_our_ca_is_refused(enrolled: InProcessDaemon) -> None:
    now = datetime.now(UTC)
    expired = pki.issue_client(
        enrolled.dev.ca(),
        "enroller",
        spiffe_id=f"{TRUST_DOMAIN}/enroller",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    with grpc.secure_channel(enrolled.target, _foreign_credentials(enrolled, expired)) as channel:
        _refused_at_handshake(enrolled, channel)


def test_plaintext_client_is_refused(enrolled: InProcessDaemon) -> None:
    with grpc.insecure_channel(enrolled.target) as channel:
        _refused_at_handshake(enrolled, channel)


# ------------------------------------------------------------------------ the policy refuses


def test_certificate_of_our_ca_unknown_to_the_policy_is_unauthenticated(enrolled: InProcessDaemon) -> None:
    enrolled.dev.issue_client("stranger")
    stub = enrolled.stub("stranger")
    for method, call in _calls(stub).items():
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, method
        assert "policy" in (err.details() or "")
    # It did complete the handshake: the open health service answers it.
    assert health(enrolled.dev, enrolled.target) == "SERVING"
    _assert_untouched(enrolled)


@pytest.mark.parametrize(
    ("profile", "methods"),
    [
        ("gateway", ["Enroll", "Delete"]),
        ("enroller", ["Match", "Identify"]),
        ("admin", ["Enroll", "Match", "Identify", "Delete"]),
    ],
)
def test_roles_are_per_method(enrolled: InProcessDaemon, profile: str, methods: list[str]) -> None:
    calls = _calls(enrolled.stub(profile))
    for method in methods:
        assert rpc_code(calls[method]) == grpc.StatusCode.PERMISSION_DENIED, method
    _assert_untouched(enrolled)


def test_caller_limited_to_one_gallery(harness: InProcessDaemon) -> None:
    dev = harness.dev
    dev.add_gallery("vault")
    dev.add_caller("lobby", ["match", "identify"], galleries=("faces",))
    dev.add_caller("vault-enroller", ["enroll"], galleries=("vault",))
    harness.start()
    enroller = harness.client("enroller")
    enroller.enroll("alice", ALICE)  # the default gallery, "faces"
    enroller.enroll("alice", ALICE, gallery="vault")

    lobby = harness.client("lobby")
    assert lobby.match("alice", ALICE).match is True
    assert lobby.match("alice", ALICE, gallery="faces").match is True
    assert [c.subject_id for c in lobby.identify(ALICE, gallery="faces")] == ["alice"]
    stub = harness.stub("lobby")
    probe = list(map(float, ALICE))
    req = pb.MatchRequest(gallery="vault", subject_id="alice", probe=probe)
    assert rpc_code(lambda: stub.Match(req, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    ident = pb.IdentifyRequest(gallery="vault", probe=probe, top_k=5)
    assert rpc_code(lambda: stub.Identify(ident, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED

    # An enroller for "vault" only cannot enroll into the default gallery (empty name).
    v_stub = harness.stub("vault-enroller")
    ok = v_stub.Enroll(pb.EnrollRequest(gallery="vault", subject_id="bob", encoding=probe), timeout=5)
    assert ok.template_count == 1
    for gallery in ("", "faces"):
        enroll = pb.EnrollRequest(gallery=gallery, subject_id="bob", encoding=probe)
        assert rpc_code(partial(v_stub.Enroll, enroll, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(NotFoundError):
        harness.client("gateway").match("bob", ALICE)


# ------------------------------------------------------------------------- score disclosure


def test_decision_only_caller_never_receives_a_distance(enrolled: InProcessDaemon) -> None:
    stub = enrolled.stub("gateway")
    for subject, probe in (("alice", ALICE), ("alice", nearby(ALICE, 0.3, seed=101)), ("bob", ALICE)):
        response = stub.Match(pb.MatchRequest(subject_id=subject, probe=list(map(float, probe))), timeout=5)
        assert not response.HasField("distance")
    assert stub.Match(pb.MatchRequest(subject_id="alice", probe=list(map(float, ALICE))), timeout=5).match

    enrolled.client("enroller").enroll("alicia", nearby(ALICE, 0.3, seed=102))
    found = stub.Identify(pb.IdentifyRequest(probe=list(map(float, ALICE)), top_k=10), timeout=5)
    assert [c.subject_id for c in found.candidates] == ["alice", "alicia"]
    assert not any(c.HasField("distance") for c in found.candidates)


def test_distance_caller_receives_distances_rounded_to_3_decimals(harness: InProcessDaemon) -> None:
    harness.dev.add_caller("auditor", ["match", "identify"], disclosure="distance")
    harness.start()
    harness.client("enroller").enroll("alice", ALICE)
    harness.client("enroller").enroll("bob", BOB)
    stub = harness.stub("auditor")
    probe = nearby(ALICE, 0.3456, seed=103)
    for subject, enrolled_as in (("alice", ALICE), ("bob", BOB)):
        response = stub.Match(pb.MatchRequest(subject_id=subject, probe=list(map(float, probe))), timeout=5)
        assert response.HasField("distance")
        want = round(euclidean(enrolled_as, probe), 3)
        # A float on the wire: exactly the float32 nearest to the 3-decimal value, nothing finer.
        assert response.distance == float(np.float32(want))
        assert response.match is (euclidean(enrolled_as, probe) <= 0.6)

    found = stub.Identify(pb.IdentifyRequest(probe=list(map(float, probe)), top_k=10), timeout=5)
    assert [c.subject_id for c in found.candidates] == ["alice"]
    (candidate,) = found.candidates
    assert candidate.HasField("distance")
    assert candidate.distance == float(np.float32(round(euclidean(ALICE, probe), 3)))
