"""Assembling the daemon: store, seal, core, policy, gRPC server with mutual TLS; signals.

``Daemon(config)`` builds everything and binds the port (port 0 picks a free one, for tests);
``serve(path)`` is the ``faceseald serve`` entry point. There is no plaintext port: the only
listener is created with client-certificate authentication required.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from faceseal.server import hygiene, logs, workers
from faceseal.server.api import admin
from faceseal.server.api.edge import Edge
from faceseal.server.api.health import HealthServicer
from faceseal.server.api.service import PERMISSIONS, FaceSealServicer
from faceseal.server.audit.log import AuditEntry
from faceseal.server.auth.interceptor import Authenticator, PolicyHolder
from faceseal.server.auth.policy import load_policy
from faceseal.server.config import Config, ServerConfig, for_worker, load_config, split_address
from faceseal.server.core import Core
from faceseal.server.errors import ConfigError
from faceseal.server.metrics import Metrics
from faceseal.server.metrics_http import MetricsServer
from faceseal.server.seal import seal_from_config
from faceseal.server.seal.base import Seal
from faceseal.server.signals import HANDLED_SIGNALS, SignalFlag
from faceseal.server.store.base import Store, StoreError
from faceseal.server.store.sqlite import SQLiteStore
from faceseal.v1 import admin_pb2, admin_pb2_grpc, faceseal_pb2, faceseal_pb2_grpc

log = logging.getLogger("faceseal.daemon")

SERVICE_NAME = faceseal_pb2.DESCRIPTOR.services_by_name["FaceSealService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["FaceSealAdminService"].full_name


def open_store(config: Config) -> Store:
    if config.store.is_postgres:
        from faceseal.server.store.postgres import PostgresStore

        return PostgresStore(config.store.url, pool_size=config.store.pool_size)
    return SQLiteStore(config.store.sqlite_path(config.base_dir))


def open_seal(config: Config) -> Seal:
    return seal_from_config(config.seal, config.path)


class _Certificates:
    """Server certificate and client CA, re-read on reload and offered to new handshakes."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        s = self._config.server
        try:
            key, cert, ca = s.tls_key.read_bytes(), s.tls_cert.read_bytes(), s.client_ca.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self._config.path}: cannot read a TLS file: {exc.filename}: {exc.strerror}") from None
        _check_tls_files(s, key, cert, ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self) -> None:
        self._pending = self._load()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        pending, self._pending = self._pending, None
        return pending


def _check_tls_files(s: ServerConfig, key: bytes, cert: bytes, ca: bytes) -> None:
    """Refuse TLS files grpc would only fail on at the next handshake: unparsable ones, or a key
    and certificate that do not belong together (a rotation caught half-way through copying)."""
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise ConfigError(f"{s.tls_cert}: not a PEM certificate (key 'server.tls_cert')") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{s.tls_key}: not an unencrypted PEM private key (key 'server.tls_key')") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ConfigError(f"{s.tls_key}: this private key does not belong to the certificate in {s.tls_cert}")
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        raise ConfigError(f"{s.client_ca}: not a PEM certificate bundle (key 'server.client_ca')") from None


class Daemon:
    """One faceseal daemon: build, ``start``, ``reload``, ``stop``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.policies = PolicyHolder(load_policy(config.server.policy))
        self._certs = _Certificates(config)
        self.store = open_store(config)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, config.galleries, _methods())
        self.core = Core(config, self.store, open_seal(config), self.metrics, config.audit.dir)
        self.metrics_port: int | None = None
        self._metrics_server: MetricsServer | None = None
        self._stop_unsealing = threading.Event()
        self._reload_lock = threading.Lock()
        self._follower: threading.Thread | None = None
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=config.server.max_workers, thread_name_prefix="rpc"),
            options=server_options(config.server),
            # Calls queued for or running on a worker; beyond it grpc answers RESOURCE_EXHAUSTED.
            maximum_concurrent_rpcs=config.server.max_concurrent_rpcs,
        )
        # No grpc interceptors (they run per call): every handler is wrapped once, here.
        self.authenticator = Authenticator(
            self.policies,
            PERMISSIONS | admin.PERMISSIONS,
            self.metrics,
            self._audit_failure,
            reflection_streams=config.server.max_reflection_streams,
        )
        edge = Edge(self.metrics, self.authenticator)
        faceseal_pb2_grpc.add_FaceSealServiceServicer_to_server(FaceSealServicer(self.core), edge.server)
        admin_pb2_grpc.add_FaceSealAdminServiceServicer_to_server(admin.FaceSealAdminServicer(self.core), edge.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, edge.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), edge.server
        )
        edge.register(self.server)
        credentials = grpc.dynamic_ssl_server_credentials(
            self._certs.initial,
            self._certs.fetch,  # type: ignore[arg-type]  # grpc accepts None: "no change"
            require_client_authentication=True,
        )
        try:
            self.port = self.server.add_secure_port(config.server.listen, credentials)
        except RuntimeError:  # grpc >= 1.5x raises on a failed bind (port taken) instead of returning 0
            self.port = 0
        if self.port == 0:
            self.store.close()
            raise ConfigError(f"{config.path}: key 'server.listen': cannot listen on {config.server.listen}")
        self.core.on_seal_change(self._set_health)

    def _audit_failure(self, request: Any, code: grpc.StatusCode) -> None:
        """Record a call that failed before the core recorded it. Only a configured gallery name
        is written; a malformed or unknown one is recorded as null, never echoed."""
        gallery = self.core.resolve_gallery(getattr(request, "gallery", "") or "")
        subject = getattr(request, "subject_id", None) or None
        self.core.audit.record(AuditEntry(code.name, gallery, subject if gallery else None))

    def _set_health(self, sealed: bool) -> None:
        status = health_pb2.HealthCheckResponse.NOT_SERVING if sealed else health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        self._start_metrics()
        self.server.start()
        threading.Thread(
            target=self.core.unseal_until, args=(self._stop_unsealing,), name="unseal", daemon=True
        ).start()
        # Other replicas (or worker processes) on the same store: apply what they commit.
        self._follower = threading.Thread(
            target=self.core.follow_until, args=(self._stop_unsealing,), name="follow", daemon=True
        )
        self._follower.start()
        log.info("listening", extra={"address": self.config.server.listen, "port": self.port})

    def _start_metrics(self) -> None:
        m = self.config.metrics
        if not m.listen:
            return
        host, port = split_address(m.listen)
        try:
            self._metrics_server = MetricsServer(host, port, self.registry, m.tls_cert, m.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{self.config.path}: key 'metrics.listen': cannot serve metrics on {m.listen}: {exc}"
            ) from None
        self.metrics_port = self._metrics_server.port
        log.info("metrics listening", extra={"address": m.listen, "port": self.metrics_port})

    def reload(self) -> None:
        """Re-read the policy and the TLS files; keep the old ones if the new ones are invalid."""
        # One at a time: two overlapping reloads could otherwise apply the older read last and
        # bring back a policy (say, before a revocation) the newer one had replaced.
        with self._reload_lock:
            try:
                policy = load_policy(self.config.server.policy)
                self._certs.reload()
            except ConfigError as exc:
                log.error("reload refused; keeping the running policy and certificates", extra={"reason": str(exc)})
                return
            self.policies.replace(policy)
            log.info(
                "policy and certificates reloaded", extra={"callers": len(policy.rules), "revoked": len(policy.revoked)}
            )

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period, then close."""
        self._stop_unsealing.set()
        if self._follower is not None:
            self._follower.join(timeout=10)
        self.health.enter_graceful_shutdown()
        grace = self.config.server.grace_seconds if grace is None else grace
        # Bounded: a stop must end even if grpc never reports its last call done.
        if not self.server.stop(grace).wait(grace + 10.0):
            log.warning("calls still open after the grace period; closing anyway", extra={"grace_seconds": grace})
        self.store.close()
        self.core.audit.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        log.info("stopped")


def server_options(s: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC core channel arguments for the [server] transport limits (docs/configuration.md)."""

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    options = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        # Several worker processes share the port only when server.workers asks for it; otherwise a
        # second daemon on the same port is an error, not a silent split of the traffic.
        ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls open at once on one connection.
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        # Connections accepted at once (counted from accept, before the TLS handshake) ...
        ("grpc.max_allowed_incoming_connections", s.max_connections),
        # ... and how long one may take to finish its handshake.
        ("grpc.server_handshake_timeout_ms", ms(s.handshake_timeout_seconds)),
        # Server-to-client pings that find dead peers.
        ("grpc.keepalive_time_ms", ms(s.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(s.keepalive_timeout_seconds)),
        # Client pings: more often than this (or at all with no call open, unless permitted) is a
        # strike; past max_ping_strikes the connection gets GOAWAY "too_many_pings".
        ("grpc.http2.min_ping_interval_without_data_ms", ms(s.min_ping_interval_seconds)),
        ("grpc.http2.max_ping_strikes", s.max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(s.permit_keepalive_without_calls)),
    ]
    if s.max_connection_idle_seconds > 0:
        options.append(("grpc.max_connection_idle_ms", ms(s.max_connection_idle_seconds)))
    if s.max_connection_age_seconds > 0:
        options.append(("grpc.max_connection_age_ms", ms(s.max_connection_age_seconds)))
        options.append(("grpc.max_connection_age_grace_ms", ms(s.max_connection_age_grace_seconds)))
    return options


def _methods() -> list[tuple[str, str]]:
    """Every method of our two services with its gRPC type, for zero-initialised series."""
    out = []
    for module in (faceseal_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                kind = "server_stream" if method.server_streaming else "unary"
                if method.client_streaming:
                    kind = "client_stream"
                out.append((f"/{service.full_name}/{method.name}", kind))
    return out


def serve(config_path: Path) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the policy and certificates.

    Once the daemon has stopped, the three signals are ignored: a second SIGTERM (systemd signals
    every process of the unit, a supervisor passes it on too) arriving while the interpreter
    shuts down would otherwise meet the default action, which Python restores for signals it
    handled, and turn a clean exit into death by signal.
    """
    try:
        return _serve(config_path)
    finally:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def _serve(config_path: Path) -> int:
    """The daemon's life, with its signal handlers.

    The handlers go in before anything slow (config, store, key material): a SIGTERM that
    arrives while the daemon is still building itself, as when a supervisor stops a worker it
    has just started, must end it cleanly with 0, not kill it with the default action. The
    handlers only set flags (see ``signals``); this thread does the work.
    """
    os.umask(0o077)
    logs.configure()
    stopping = SignalFlag()
    reload_asked = SignalFlag()

    def on_term(signum: int, _frame: FrameType | None) -> None:
        stopping.set(signum)  # logged by this thread once it notices: a handler must not log

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        reload_asked.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    # A worker's supervisor starts it with these blocked, so that none is lost or fatal before now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    hardening = hygiene.apply()
    log.info(
        "process hardened",
        extra={"not_dumpable": hardening.not_dumpable, "memory_locked": hardening.memory_locked},
    )
    try:
        config = load_config(config_path)
        index = workers.worker_index()
        if config.server.workers > 1 and index is None:
            return workers.supervise(config_path, config.server.workers, config.server.grace_seconds, stopping)
        if stopping.is_set():
            log.info("signal received before the daemon was built; stopping", extra={"signal": stopping.name()})
            return 0
        if index is not None:
            config = for_worker(config, index)
            if config.server.pin_workers:
                log.info("worker pinned", extra={"worker": index, "cpu": workers.pin(index)})
        daemon = Daemon(config)
    except (ConfigError, StoreError) as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        raise ConfigError(str(exc)) from None
    # A SIGHUP during the build may have come after the files were read: read them again.
    if reload_asked.is_set() and not stopping.is_set():
        reload_asked.clear()
        daemon.reload()
    if not stopping.is_set():
        daemon.start()
        while not stopping.wait(0.1):  # a reload asked meanwhile starts within 0.1 s
            if reload_asked.is_set():
                reload_asked.clear()
                threading.Thread(target=daemon.reload, name="reload").start()
    log.info("signal received; draining", extra={"signal": stopping.name()})
    daemon.stop()
    return 0
