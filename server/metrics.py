"""Every Prometheus metric the daemon exports, declared once, here.

Names follow the Prometheus guide (base units, ``_total`` counters) and the gRPC ecosystem's
``grpc_server_*`` names so stock dashboards work. Label values come only from bounded sets the
daemon defines (method names, status codes, configured gallery names, fixed reasons): never a
subject id, a caller identity, a request-supplied string or a distance. Each daemon owns its
registry, so tests and several in-process daemons never share series.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 250 µs to 10 s: a Match is sub-millisecond, a Rewrap stream can take seconds.
_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

DENIAL_REASONS = ("unknown_identity", "no_permission", "gallery_not_allowed", "revoked", "expired")
GUARD_SCOPES = ("subject", "caller_rate", "caller_failures", "identify", "probe_similarity", "in_flight")


class Metrics:
    def __init__(
        self, registry: CollectorRegistry, galleries: Iterable[str], methods: Iterable[tuple[str, str]]
    ) -> None:
        self.registry = registry
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", labels, registry=registry)
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving a request to sending its response.",
            labels,
            buckets=_BUCKETS,
            registry=registry,
        )
        self.match_decisions = Counter(
            "faceseal_match_decisions",
            "Match decisions per gallery.",
            ("gallery", "decision"),
            registry=registry,
        )
        self.auth_denied = Counter(
            "faceseal_auth_denied",
            "Calls refused by authentication or policy.",
            ("reason",),
            registry=registry,
        )
        self.guard_rejections = Counter(
            "faceseal_guard_rejections", "Calls refused by the abuse guard.", ("scope",), registry=registry
        )
        self.integrity_failures = Counter(
            "faceseal_integrity_failures",
            "Stored blobs that failed to open (tampered, moved, or key retired).",
            ("gallery",),
            registry=registry,
        )
        self.templates = Gauge("faceseal_templates", "Templates opened in memory.", ("gallery",), registry=registry)
        self.sealed = Gauge("faceseal_sealed", "1 while the keyring is not unwrapped.", registry=registry)
        self.key_versions = Gauge("faceseal_key_versions", "Data-key versions in the keyring.", registry=registry)
        self.audit_records = Counter("faceseal_audit_records", "Audit records written.", registry=registry)
        self.audit_failures = Counter(
            "faceseal_audit_write_failures", "Audit records that could not be written.", registry=registry
        )
        # Start every bounded series at zero so rate() and absent() behave from the first scrape.
        for gallery in galleries:
            for decision in ("match", "no_match"):
                self.match_decisions.labels(gallery, decision)
            self.integrity_failures.labels(gallery)
            self.templates.labels(gallery)
        for reason in DENIAL_REASONS:
            self.auth_denied.labels(reason)
        for scope in GUARD_SCOPES:
            self.guard_rejections.labels(scope)
        for method, kind in methods:
            service, name = method.strip("/").split("/")
            self.started.labels(kind, service, name)
            self.handled.labels(kind, service, name, grpc.StatusCode.OK.name)
            self.handling.labels(kind, service, name)
