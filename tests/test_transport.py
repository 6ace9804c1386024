"""Transport limits of the gRPC listener ([server] in faceseal.toml, docs/configuration.md), each
made observable: message size, calls queued or running, reflection streams, streams per
connection, client pings, idle and aged connections, connections at once, the handshake timeout,
per-call deadlines, and that hundreds of idle connections do not stop a normal client.

Some tests speak HTTP/2 by hand over a mutual-TLS socket (``RawH2``): that is the only way to
send pings at a chosen rate, or to open a call and never send its request, as a hostile client
holding a certificate from our CA could."""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import Dev, InProcessDaemon, health, poll, random_encodings, rpc_code, rpc_error

from faceseal.server.config import load_config
from faceseal.server.daemon import server_options
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc

ALICE = random_encodings(1, seed=800)[0]
MATCH_PATH = "/faceseal.v1.FaceSealService/Match"

# ------------------------------------------------------------------------ HTTP/2 by hand

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
ACK, END_HEADERS = 0x1, 0x4
ENHANCE_YOUR_CALM, REFUSED_STREAM = 0xB, 0x7


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _header(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name (RFC 7541 6.2.2), short strings."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127  # noqa: PT018
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _tls_context(dev: Dev, profile: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(dev.dir / "ca.crt")
    context.load_cert_chain(dev.dir / "clients" / f"{profile}.crt", dev.dir / "clients" / f"{profile}.key")
    context.set_alpn_protocols(["h2"])
    return context


class RawH2:
    """One mutual-TLS HTTP/2 connection, driven frame by frame."""

    def __init__(self, dev: Dev, port: int, *, profile: str = "gateway", context: ssl.SSLContext | None = None):
        context = context or _tls_context(dev, profile)
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            self.sock = context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        assert self.sock.selected_alpn_protocol() == "h2"
        self.sock.sendall(PREFACE + _frame(SETTINGS, 0, 0))
        self._buffer = b""

    def read(self, timeout: float = 5.0) -> tuple[int, int, int, bytes] | None:
        """The next frame (type, flags, stream, payload), or None once the server closed."""
        self.sock.settimeout(timeout)
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    head, self._buffer = self._buffer[: 9 + length], self._buffer[9 + length :]
                    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, head[9:]
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def settle(self) -> None:
        """Acknowledge the server's SETTINGS, as a well-behaved client does."""
        while True:
            frame = self.read()
            assert frame is not None, "the server closed the connection during setup"
            if frame[0] == SETTINGS and not frame[1] & ACK:
                self.sock.sendall(_frame(SETTINGS, ACK, 0))
                return

    def ping(self, payload: bytes = b"pingpong") -> None:
        self.sock.sendall(_frame(PING, 0, 0, payload))

    def open_call(self, stream: int, path: str, *, grpc_timeout: str | None = None) -> None:
        """Send a call's headers and never its request message."""
        block = b"".join(
            _header(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "https"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        if grpc_timeout is not None:
            block += _header("grpc-timeout", grpc_timeout)
        self.sock.sendall(_frame(HEADERS, END_HEADERS, stream, block))

    def goaway(self, timeout: float) -> tuple[int, bytes] | None:
        """Read until a GOAWAY (error code, debug text) or ``timeout``; None if none came."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                frame = self.read(left)
            except TimeoutError:
                return None
            if frame is None:
                return None
            if frame[0] == GOAWAY:
                return int.from_bytes(frame[3][4:8], "big"), frame[3][8:]
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def raw_connections(dev: Dev, port: int, count: int, **kwargs: Any) -> Iterator[list[RawH2]]:
    opened: list[RawH2] = []
    try:
        for _ in range(count):
            opened.append(RawH2(dev, port, **kwargs))
        yield opened
    finally:
        for conn in opened:
            conn.close()


# ------------------------------------------------------------------------------- utilities


def _own_channel(daemon: InProcessDaemon, profile: str = "gateway") -> grpc.Channel:
    """A channel with its own connection (grpc would otherwise share one between channels)."""
    channel = grpc.secure_channel(
        daemon.target, daemon.dev.credentials(profile), options=[("grpc.use_local_subchannel_pool", 1)]
    )
    daemon.dev._closers.append(channel.close)
    return channel


def _match_request() -> pb.MatchRequest:
    return pb.MatchRequest(subject_id="alice", probe=list(map(float, ALICE)))


def _served(daemon: InProcessDaemon, *, timeout: float = 5.0) -> bool:
    stub = faceseal_pb2_grpc.FaceSealServiceStub(_own_channel(daemon))
    return bool(stub.Match(_match_request(), timeout=timeout).match)


def _served_or_refused(
    daemon: InProcessDaemon, *, timeout: float = 2.0, refused: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
) -> bool:
    """Whether a new connection is served; False while the server still counts closed ones (it
    learns of a client's close asynchronously, so a connection right after may still be refused)."""
    try:
        return _served(daemon, timeout=timeout)
    except grpc.RpcError as err:
        if err.code() is not refused:
            raise
        return False


def _started(daemon: InProcessDaemon, method: str) -> float:
    assert daemon.daemon is not None
    labels = {"grpc_type": "unary", "grpc_service": "faceseal.v1.FaceSealService", "grpc_method": method}
    return daemon.daemon.registry.get_sample_value("grpc_server_started_total", labels) or 0.0


class ReflectionStream:
    """A server-reflection stream kept open by the client: it holds one worker thread meanwhile."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        self._call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(self._requests.get, None), timeout=30
        )

    def ask(self) -> list[str]:
        self._requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = next(self._call)
        return [s.name for s in response.list_services_response.service]

    def close(self) -> None:
        self._requests.put(None)
        with contextlib.suppress(StopIteration, grpc.RpcError):
            next(self._call)


def _hold_the_only_worker(daemon: InProcessDaemon, *, grpc_timeout: str | None = None) -> RawH2:
    """Open a call and never send its request: grpc's worker waits for it (max_workers = 1).
    Returns once the worker is seen busy (a health check queued behind it times out)."""
    assert daemon.daemon is not None
    hog = RawH2(daemon.dev, daemon.daemon.port)
    try:
        hog.settle()
        hog.open_call(1, MATCH_PATH, grpc_timeout=grpc_timeout)
        poll(
            "the call to hold the worker",
            lambda: health(daemon.dev, daemon.target, timeout=0.2) == "DEADLINE_EXCEEDED" or None,
        )
    except BaseException:
        hog.close()
        raise
    return hog


def _start(harness: InProcessDaemon, **server: Any) -> InProcessDaemon:
    if server:
        harness.dev.set_server(**server)
    harness.start()
    harness.client("enroller").enroll("alice", ALICE)
    return harness


# ------------------------------------------------------------------------------------ tests


def test_every_limit_reaches_grpc(dev: Dev) -> None:
    dev.set_server(
        max_message_bytes=65536,
        max_concurrent_streams=7,
        max_connections=77,
        handshake_timeout_seconds=2.5,
        max_connection_idle_seconds=30,
        max_connection_age_seconds=600,
        max_connection_age_grace_seconds=5,
        keepalive_time_seconds=120,
        keepalive_timeout_seconds=10,
        min_ping_interval_seconds=15,
        max_ping_strikes=3,
        permit_keepalive_without_calls=True,
    )
    options = dict(server_options(load_config(dev.config_path).server))
    assert options == {
        "grpc.max_receive_message_length": 65536,
        "grpc.max_send_message_length": 65536,
        "grpc.so_reuseport": 0,
        "grpc.max_concurrent_streams": 7,
        "grpc.max_allowed_incoming_connections": 77,
        "grpc.server_handshake_timeout_ms": 2500,
        "grpc.max_connection_idle_ms": 30_000,
        "grpc.max_connection_age_ms": 600_000,
        "grpc.max_connection_age_grace_ms": 5000,
        "grpc.keepalive_time_ms": 120_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.http2.min_ping_interval_without_data_ms": 15_000,
        "grpc.http2.max_ping_strikes": 3,
        "grpc.keepalive_permit_without_calls": 1,
    }
    # 0 turns the idle and age limits off (grpc's own default: none).
    dev.set_server(max_connection_idle_seconds=0, max_connection_age_seconds=0)
    options = dict(server_options(load_config(dev.config_path).server))
    assert not {"grpc.max_connection_idle_ms", "grpc.max_connection_age_ms"} & set(options)


def test_a_message_over_max_message_bytes_is_refused(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_message_bytes=4096)
    stub = faceseal_pb2_grpc.FaceSealServiceStub(_own_channel(daemon))
    big = pb.MatchRequest(subject_id="alice", probe=[0.5] * 2048)  # 8 KiB of floats
    assert rpc_code(lambda: stub.Match(big, timeout=5)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _started(daemon, "Match") == 0  # refused before any handler ran
    assert _served(daemon)


def test_calls_beyond_max_concurrent_rpcs_are_refused(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_workers=2, max_reflection_streams=1, max_concurrent_rpcs=1)
    stream = ReflectionStream(_own_channel(daemon))
    assert "faceseal.v1.FaceSealService" in stream.ask()  # one call is now running

    stub = faceseal_pb2_grpc.FaceSealServiceStub(_own_channel(daemon))
    err = rpc_error(lambda: stub.Match(_match_request(), timeout=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _started(daemon, "Match") == 0

    stream.close()
    # grpc counts the stream as ended in a callback after its status went out, so a Match sent
    # at once may still find the one place taken.
    assert poll(
        "a Match to be served once the stream ended",
        lambda: _served_or_refused(daemon, refused=grpc.StatusCode.RESOURCE_EXHAUSTED) or None,
    )


def test_reflection_streams_are_capped_and_leave_workers_for_real_calls(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_workers=3, max_reflection_streams=2)
    streams = [ReflectionStream(_own_channel(daemon)) for _ in range(2)]
    for s in streams:
        s.ask()
    third = ReflectionStream(_own_channel(daemon))
    with pytest.raises(grpc.RpcError) as caught:
        third.ask()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _served(daemon)  # the third worker is still free

    streams[0].close()
    again = poll("a reflection slot to free up", lambda: _try_reflection(daemon))
    again.close()
    streams[1].close()


def _try_reflection(daemon: InProcessDaemon) -> ReflectionStream | None:
    stream = ReflectionStream(_own_channel(daemon))
    try:
        stream.ask()
    except grpc.RpcError:
        return None
    return stream


def test_health_watchers_hold_no_worker(harness: InProcessDaemon) -> None:
    # A load balancer (or every client with grpc's client-side health checking) keeps a Watch
    # open per connection: that must not take a worker thread each.
    daemon = _start(harness, max_workers=2)
    channel = _own_channel(daemon)
    watches = [
        health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        for _ in range(8)
    ]
    try:
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert _served(daemon, timeout=3)
        assert daemon.client("enroller").enroll("bob", ALICE * -1.0).template_count == 1
    finally:
        for watch in watches:
            watch.cancel()


def test_a_health_watch_closing_during_a_status_change_does_not_stop_the_server(harness: InProcessDaemon) -> None:
    # grpcio-health sends a status change to every watcher while holding its lock, and waited
    # on grpc's serving thread for the same lock when a watcher closed: both threads stopped
    # for good (a SIGTERM that never finished, in CI). Hold the lock as a status change does,
    # close a watch, then make a call: grpc's serving thread must get to it.
    daemon = harness.start()
    assert daemon.daemon is not None
    channel = _own_channel(daemon)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    with daemon.daemon.health._lock:
        watch.cancel()  # its close reaches the serving thread before the call below does
        code = rpc_code(lambda: faceseal_pb2_grpc.FaceSealServiceStub(channel).Match(_match_request(), timeout=5))
    assert code is grpc.StatusCode.NOT_FOUND  # answered, not DEADLINE_EXCEEDED
    assert health(daemon.dev, daemon.target) == "SERVING"


def test_streams_per_connection_are_capped(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_concurrent_streams=2)
    channel = _own_channel(daemon)
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(2)]
    for watch in watches:
        next(watch)
    # A third call on the same connection waits for a free stream...
    check = stub.Check.future(health_pb2.HealthCheckRequest(), timeout=10)
    time.sleep(0.5)
    assert not check.done()
    # ...while other connections are served as usual.
    assert _served(daemon)
    watches[0].cancel()
    assert check.result().status == health_pb2.HealthCheckResponse.SERVING
    watches[1].cancel()


def test_a_client_ignoring_the_stream_limit_has_its_extra_streams_refused(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_concurrent_streams=2)
    assert daemon.daemon is not None
    conn = RawH2(daemon.dev, daemon.daemon.port)
    try:
        conn.settle()
        for stream in (1, 3, 5, 7):  # four calls at once, headers only
            conn.open_call(stream, MATCH_PATH)
        refused: set[int] = set()
        end = time.monotonic() + 5
        while refused != {5, 7} and time.monotonic() < end:
            frame = conn.read(max(0.01, end - time.monotonic()))
            assert frame is not None, "the server closed the connection"
            if frame[0] == RST_STREAM:
                assert int.from_bytes(frame[3], "big") == REFUSED_STREAM
                refused.add(frame[2])
        assert refused == {5, 7}
    finally:
        conn.close()
    assert _served(daemon)


def _ping_goaway(daemon: InProcessDaemon, pings: int, gap: float, window: float = 5.0) -> tuple[int, bytes] | None:
    """Send ``pings`` PINGs ``gap`` apart; the GOAWAY that arrives within ``window`` seconds after."""
    assert daemon.daemon is not None
    conn = RawH2(daemon.dev, daemon.daemon.port)
    try:
        conn.settle()
        for i in range(pings):
            if i:
                time.sleep(gap)
            conn.ping()
        return conn.goaway(window)
    finally:
        conn.close()


def test_a_client_pinging_too_often_is_sent_away(harness: InProcessDaemon) -> None:
    daemon = _start(harness, min_ping_interval_seconds=0.5, max_ping_strikes=2, permit_keepalive_without_calls=True)
    # Pings spaced by more than the minimum interval are answered and nothing else happens.
    assert _ping_goaway(daemon, pings=4, gap=0.6, window=1.0) is None
    # Four back to back: the first is fine, then three strikes > max_ping_strikes = 2.
    goaway = _ping_goaway(daemon, pings=4, gap=0)
    assert goaway == (ENHANCE_YOUR_CALM, b"too_many_pings")
    assert _served(daemon)


def test_pings_without_calls_are_strikes_unless_permitted(harness: InProcessDaemon) -> None:
    # The default: a connection with no call open has no business pinging (grpc then allows
    # one ping per two hours), however slowly it does so.
    daemon = _start(harness, min_ping_interval_seconds=0.5)
    assert _ping_goaway(daemon, pings=4, gap=0.6) == (ENHANCE_YOUR_CALM, b"too_many_pings")


def test_idle_connections_are_closed_and_clients_reconnect(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_connection_idle_seconds=0.5)
    channel = _own_channel(daemon)
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append, try_to_connect=True)
    try:
        stub = faceseal_pb2_grpc.FaceSealServiceStub(channel)
        assert stub.Match(_match_request(), timeout=5).match
        poll("the connection to be READY", lambda: grpc.ChannelConnectivity.READY in states or None)
        ready = states.index(grpc.ChannelConnectivity.READY)
        poll("the idle connection to be closed", lambda: grpc.ChannelConnectivity.IDLE in states[ready:] or None)
        # grpc clients reconnect on the next call, transparently.
        assert stub.Match(_match_request(), timeout=5).match
    finally:
        channel.unsubscribe(states.append)


def test_connections_beyond_max_connections_are_refused(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_connections=4)
    assert daemon.daemon is not None
    sockets = [socket.create_connection(("127.0.0.1", daemon.daemon.port)) for _ in range(4)]
    try:
        # Counted from accept on, before any handshake: the fifth connection is closed at once.
        assert health(daemon.dev, daemon.target, timeout=2) == "UNAVAILABLE"
    finally:
        for s in sockets:
            s.close()
    assert poll("a client to be served once they closed", lambda: _served_or_refused(daemon) or None)


def test_a_connection_that_does_not_handshake_is_closed(harness: InProcessDaemon) -> None:
    daemon = _start(harness, handshake_timeout_seconds=0.5)
    assert daemon.daemon is not None
    started = time.monotonic()  # before the connect: the server's clock starts at its accept
    with socket.create_connection(("127.0.0.1", daemon.daemon.port)) as silent:
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by the server, not by our timeout
        assert 0.3 < time.monotonic() - started < 4


def test_a_client_deadline_shorter_than_the_wait_is_honoured(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_workers=1)
    stub = faceseal_pb2_grpc.FaceSealServiceStub(_own_channel(daemon))
    hog = _hold_the_only_worker(daemon)
    try:
        started = time.monotonic()
        assert rpc_code(lambda: stub.Match(_match_request(), timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
    finally:
        hog.close()  # its call is cancelled and the worker comes free
    assert stub.Match(_match_request(), timeout=5).match  # the daemon is fine afterwards
    # The queued Match whose caller had given up was never run: only the last one counts.
    assert _started(daemon, "Match") == 1


def test_the_server_ends_a_call_at_its_deadline_even_if_the_request_never_came(harness: InProcessDaemon) -> None:
    daemon = _start(harness, max_workers=1)
    opened = time.monotonic()
    hog = _hold_the_only_worker(daemon, grpc_timeout="1S")
    try:
        assert _served(daemon, timeout=5)  # served as soon as the hog's deadline freed the worker
        assert 0.8 < time.monotonic() - opened < 4
    finally:
        hog.close()


def test_max_connection_age_bounds_how_long_a_call_can_hold_a_worker(harness: InProcessDaemon) -> None:
    # Without a deadline, a call whose request never arrives holds its worker until the
    # connection closes; max_connection_age (+ grace) closes every connection in bounded time.
    daemon = _start(harness, max_workers=1, max_connection_age_seconds=1, max_connection_age_grace_seconds=0.5)
    hog = _hold_the_only_worker(daemon)
    try:
        started = time.monotonic()
        # The Match's own connection ages out too (1 s, +-10% jitter, + 0.5 s grace) and may be
        # cut before the freed worker reaches it: a new connection then gets the call served.
        assert poll("a Match to be served", lambda: _served_or_refused(daemon, timeout=10) or None, deadline=10)
        assert time.monotonic() - started < 5
        assert hog.goaway(2.0) is not None
    finally:
        hog.close()


def test_hundreds_of_idle_connections_do_not_stop_a_normal_client(harness: InProcessDaemon) -> None:
    daemon = _start(harness)
    assert daemon.daemon is not None
    port = daemon.daemon.port
    context = _tls_context(daemon.dev, "gateway")
    with (
        raw_connections(daemon.dev, port, 300, context=context) as idle_tls,
        contextlib.ExitStack() as stack,
    ):
        for conn in idle_tls:
            conn.settle()  # handshaked, HTTP/2 set up, and then silent
        for _ in range(100):  # and some that never even start TLS
            stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        started = time.monotonic()
        assert _served(daemon, timeout=5)
        assert time.monotonic() - started < 5
        assert daemon.client("enroller").enroll("bob", ALICE * -1.0).template_count == 1
