"""SIGHUP reloads the TLS files as well as the policy, without restarting the daemon or dropping
a connection: a rotated server certificate is offered to new connections, a CA added to the
client-CA bundle is trusted (and one removed is not) for new connections, and a half-finished
rotation (a key that does not belong to the certificate) is refused with the old files kept."""

from __future__ import annotations

import os
import signal
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from helpers import TRUST_DOMAIN, Dev, SubprocessDaemon, poll, random_encodings, rpc_code

from faceseal.server import pki
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc

pytestmark = pytest.mark.slow

ALICE = random_encodings(1, seed=900)[0]
REFUSED = "reload refused"


def _server_certificate(dev: Dev, port: int) -> x509.Certificate:
    """The certificate a new mutual-TLS connection is offered (ALPN h2, as a gRPC client)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(dev.dir / "ca.crt")
    context.load_cert_chain(dev.dir / "clients" / "gateway.crt", dev.dir / "clients" / "gateway.key")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _replace(path: Path, data: bytes, *, private: bool = False) -> None:
    """Swap a file's content in one step, as a careful deployment tool does."""
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    if private:
        pki.write_private_file(tmp, data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _sighup(daemon: SubprocessDaemon, *, refused: bool = False) -> None:
    """Send SIGHUP and wait for the daemon to log that it applied (or refused) the reload."""
    marker = REFUSED if refused else "policy and certificates reloaded"
    before = daemon.log().count(marker)
    daemon.send(signal.SIGHUP)
    poll(f"the daemon to log {marker!r}", lambda: daemon.log().count(marker) > before or None)


def _match(channel: grpc.Channel) -> bool:
    stub = faceseal_pb2_grpc.FaceSealServiceStub(channel)
    request = pb.MatchRequest(subject_id="alice", probe=list(map(float, ALICE)))
    return bool(stub.Match(request, timeout=5).match)


def _started(daemon: SubprocessDaemon) -> SubprocessDaemon:
    daemon.start()
    daemon.dev.client(daemon.target, "enroller").enroll("alice", ALICE)
    return daemon


def test_sighup_offers_a_new_server_certificate_and_keeps_connections(subprocess_daemon: SubprocessDaemon) -> None:
    daemon = _started(subprocess_daemon)
    dev = daemon.dev
    old_serial = _server_certificate(dev, daemon.port).serial_number

    channel = dev.channel(daemon.target, "gateway")
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append, try_to_connect=True)
    try:
        assert _match(channel)
        poll("the channel to be READY", lambda: states[-1:] == [grpc.ChannelConnectivity.READY] or None)
        ready_at = len(states)

        new = pki.issue_server(dev.ca(), dns_names=["localhost", "faceseal.internal"], ips=["127.0.0.1", "::1"])
        _replace(dev.dir / "server.key", new.key_pem(), private=True)
        _replace(dev.dir / "server.crt", new.cert_pem())
        _sighup(daemon)

        seen = poll(
            "a new connection to be offered the new certificate",
            lambda: _server_certificate(dev, daemon.port).serial_number == new.cert.serial_number or None,
        )
        assert seen
        assert new.cert.serial_number != old_serial
        # The connection made before the reload carries on, on the same transport.
        assert _match(channel)
        assert states[ready_at:] == [], f"the connection changed state: {states[ready_at:]}"
    finally:
        channel.unsubscribe(states.append)
    # And new clients are served under the new certificate.
    assert dev.client(daemon.target, "gateway").match("alice", ALICE).match is True


def test_a_key_that_does_not_match_the_certificate_is_refused_and_the_old_pair_stays(
    subprocess_daemon: SubprocessDaemon,
) -> None:
    daemon = _started(subprocess_daemon)
    dev = daemon.dev
    old_serial = _server_certificate(dev, daemon.port).serial_number

    # A rotation caught half-way: the new key is in place, its certificate not yet.
    half = pki.issue_server(dev.ca(), dns_names=["localhost"], ips=["127.0.0.1"])
    _replace(dev.dir / "server.key", half.key_pem(), private=True)
    _sighup(daemon, refused=True)
    assert "does not belong to the certificate" in daemon.log()
    assert _server_certificate(dev, daemon.port).serial_number == old_serial
    assert dev.client(daemon.target, "gateway").match("alice", ALICE).match is True

    # Completing the rotation and sending SIGHUP again applies it.
    _replace(dev.dir / "server.crt", half.cert_pem())
    _sighup(daemon)
    poll(
        "the completed rotation to be offered",
        lambda: _server_certificate(dev, daemon.port).serial_number == half.cert.serial_number or None,
    )
    assert dev.client(daemon.target, "gateway").match("alice", ALICE).match is True


def test_a_client_ca_added_to_the_bundle_is_trusted_after_sighup(subprocess_daemon: SubprocessDaemon) -> None:
    daemon = _started(subprocess_daemon)
    dev = daemon.dev
    bundle = dev.dir / "ca.crt"
    original = bundle.read_bytes()

    # A caller the policy knows, whose certificate comes from a second CA (a CA rotation).
    dev.add_caller("kiosk", ["match"])
    new_ca = pki.make_ca("faceseal second CA")
    kiosk = pki.issue_client(new_ca, "kiosk", spiffe_id=f"{TRUST_DOMAIN}/kiosk")
    for path in (dev.dir / "clients" / "kiosk.crt", dev.dir / "clients" / "kiosk.key"):
        path.unlink()
    kiosk.write(dev.dir / "clients" / "kiosk.crt", dev.dir / "clients" / "kiosk.key")
    _sighup(daemon)  # the policy now names the kiosk, but its CA is not trusted yet

    def kiosk_code() -> grpc.StatusCode:
        with grpc.secure_channel(daemon.target, dev.credentials("kiosk")) as channel:
            stub = faceseal_pb2_grpc.FaceSealServiceStub(channel)
            request = pb.MatchRequest(subject_id="alice", probe=list(map(float, ALICE)))
            try:
                stub.Match(request, timeout=5)
            except grpc.RpcError as err:
                code: grpc.StatusCode = err.code()
                return code
            return grpc.StatusCode.OK

    assert kiosk_code() == grpc.StatusCode.UNAVAILABLE  # refused at the handshake

    gateway = dev.channel(daemon.target, "gateway")
    assert _match(gateway)
    _replace(bundle, original + new_ca.cert_pem())
    _sighup(daemon)
    poll("the second CA's client to be served", lambda: kiosk_code() == grpc.StatusCode.OK or None)
    assert _match(gateway)  # the first CA's clients, on their existing connection
    assert dev.client(daemon.target, "enroller").enroll("bob", ALICE * -1.0).template_count == 1  # and new ones

    # Taking the CA out of the bundle again stops new connections from its clients.
    _replace(bundle, original)
    _sighup(daemon)
    poll("the second CA to be refused again", lambda: kiosk_code() == grpc.StatusCode.UNAVAILABLE or None)
    assert rpc_code(lambda: _match_with(dev, daemon, "kiosk")) == grpc.StatusCode.UNAVAILABLE
    assert _match(gateway)


def _match_with(dev: Dev, daemon: SubprocessDaemon, profile: str) -> bool:
    with grpc.secure_channel(daemon.target, dev.credentials(profile)) as channel:
        return _match(channel)
