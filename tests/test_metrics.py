"""The daemon's /metrics, scraped over HTTP(S) and parsed like Prometheus would, without Prometheus.

Every metric DESIGN.md ("Observability") lists is exported with its labels; no label value ever
holds a subject id, a caller identity, a request-supplied string or a distance, whatever callers
send; the TLS option of the metrics listener works; the state gauges follow the seal, and the
integrity counter counts tampered rows. tests/test_prometheus.py runs a real Prometheus on top.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import secrets
import socket
import sqlite3
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from helpers import Dev, InProcessDaemon, db_execute, nearby, poll, random_encodings
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from faceseal.client import (
    DataLossError,
    FaceSealClientError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from faceseal.server.config import load_config
from faceseal.server.daemon import Daemon
from faceseal.server.metrics import DENIAL_REASONS, GUARD_SCOPES
from faceseal.v1 import admin_pb2, faceseal_pb2

DESIGN = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"

# What DESIGN.md documents, as exposed sample names -> the labels each must carry (at least).
# faceseal_audit_write_failures_total is not in the design's list, but the alert rules use it.
DOCUMENTED: dict[str, set[str]] = {
    "grpc_server_started_total": {"grpc_service", "grpc_method"},
    "grpc_server_handled_total": {"grpc_service", "grpc_method", "grpc_code"},
    "grpc_server_handling_seconds_bucket": {"grpc_service", "grpc_method", "le"},
    "grpc_server_handling_seconds_count": {"grpc_service", "grpc_method"},
    "grpc_server_handling_seconds_sum": {"grpc_service", "grpc_method"},
    "faceseal_match_decisions_total": {"gallery", "decision"},
    "faceseal_auth_denied_total": {"reason"},
    "faceseal_guard_rejections_total": {"scope"},
    "faceseal_integrity_failures_total": {"gallery"},
    "faceseal_templates": {"gallery"},
    "faceseal_sealed": set(),
    "faceseal_key_versions": set(),
    "faceseal_audit_records_total": set(),
    "faceseal_audit_write_failures_total": set(),
}
FAMILY_TYPES = {
    "grpc_server_started": "counter",
    "grpc_server_handled": "counter",
    "grpc_server_handling_seconds": "histogram",
    "faceseal_match_decisions": "counter",
    "faceseal_auth_denied": "counter",
    "faceseal_guard_rejections": "counter",
    "faceseal_integrity_failures": "counter",
    "faceseal_templates": "gauge",
    "faceseal_sealed": "gauge",
    "faceseal_key_versions": "gauge",
    "faceseal_audit_records": "counter",
    "faceseal_audit_write_failures": "counter",
}


# ----------------------------------------------------------------------------------- scraping


def metrics_url(daemon: Daemon, scheme: str = "http") -> str:
    assert daemon.metrics_port, "the metrics listener is not running"
    return f"{scheme}://127.0.0.1:{daemon.metrics_port}/metrics"


def scrape(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:  # noqa: S310  # our URL
        assert response.status == 200
        assert response.headers.get_content_type() == "text/plain"
        text: str = response.read().decode("utf-8")
        return text


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels``."""
    found = [s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{len(found)} samples of {name}{labels}"
    return float(found[0])


def _in_process(harness: InProcessDaemon) -> Daemon:
    assert harness.daemon is not None
    return harness.daemon


# ------------------------------------------------------------------------- documented metrics


def _design_metrics() -> dict[str, set[str]]:
    """Metric names and label names in DESIGN.md's Observability section (empty without the doc)."""
    if not DESIGN.is_file():
        return {}
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Observability", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str]] = {}
    for name, labels in re.findall(r"`((?:grpc_server|faceseal)_\w+)(?:\{([^}]*)\})?`", section):
        found[name] = {label.strip() for label in labels.split(",") if label.strip()}
    return found


def test_every_documented_metric_is_exported(daemon: InProcessDaemon) -> None:
    text = scrape(metrics_url(_in_process(daemon)))
    exposed: dict[str, set[str]] = {}
    for s in samples(text):
        exposed.setdefault(s.name, set()).update(s.labels)
    families = {f.name: f.type for f in text_string_to_metric_families(text)}

    design = _design_metrics()
    if DESIGN.is_file():
        assert len(design) >= 10, f"could not read the metric list of {DESIGN}: {design}"
    wanted = dict(DOCUMENTED)
    for name, labels in design.items():
        # The design names the histogram by its family name; its samples carry the suffixes.
        key = f"{name}_count" if families.get(name) == "histogram" else name
        wanted[key] = wanted.get(key, set()) | labels
    for name, labels in wanted.items():
        assert name in exposed, f"{name} is documented but not exported"
        assert labels <= exposed[name], f"{name} lacks labels {labels - exposed[name]}"
    for family, kind in FAMILY_TYPES.items():
        assert families.get(family) == kind, f"{family}: type {families.get(family)}, expected {kind}"
    # Bounded series start at zero, so rate() and increase() work from the first scrape.
    assert value(text, "faceseal_auth_denied_total", reason="no_permission") == 0
    assert value(text, "faceseal_guard_rejections_total", scope="subject") == 0
    assert value(text, "faceseal_integrity_failures_total", gallery="faces") == 0
    assert value(text, "faceseal_match_decisions_total", gallery="faces", decision="no_match") == 0
    assert value(text, "grpc_server_handled_total", grpc_method="Match", grpc_code="OK") == 0


# ------------------------------------------------------------------------ labels never hold ids

SUBJECTS = ("subject-zebra-1234", "subject-ibex-5678", "subject-tapir-9012")
UNKNOWN_SUBJECT = "subject-ghost-4321"
BAD_SUBJECT = "subject bad!#"
UNKNOWN_GALLERY = "gallery-nope-777"
PROFILES = ("auditor-okapi", "kiosk-heron", "stranger-lynx")
ZEBRA, IBEX, TAPIR = random_encodings(3, seed=1700)


def _allowed_label_values() -> dict[str, set[str] | None]:
    """Every label name the daemon may use, with its closed set of values (None: a number)."""
    services: dict[str, list[str]] = {}
    for module in (faceseal_pb2, admin_pb2, health_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            services[service.full_name] = [m.name for m in service.methods]
    services["grpc.reflection.v1alpha.ServerReflection"] = ["ServerReflectionInfo"]
    return {
        "grpc_type": {"unary", "server_stream", "client_stream", "bidi_stream"},
        "grpc_service": set(services),
        "grpc_method": {m for methods in services.values() for m in methods},
        "grpc_code": {code.name for code in grpc.StatusCode},
        "gallery": {"faces", "visitors"},
        "decision": {"match", "no_match"},
        "reason": set(DENIAL_REASONS),
        "scope": set(GUARD_SCOPES),
        "le": None,
    }


def _refused(call: Callable[[], object]) -> type[FaceSealClientError]:
    try:
        call()
    except FaceSealClientError as err:
        return type(err)
    raise AssertionError("the call succeeded; it should have been refused")


def test_labels_never_hold_ids_callers_or_distances(harness: InProcessDaemon) -> None:
    dev = harness.dev
    dev.add_gallery("visitors")
    dev.add_caller("auditor-okapi", ["match", "identify"], disclosure="distance")
    dev.add_caller("kiosk-heron", ["match"], galleries=("visitors",))
    dev.issue_client("stranger-lynx")  # a certificate from our CA, but no policy entry
    harness.start()
    enroller, gateway = harness.client("enroller"), harness.client("gateway")
    auditor, kiosk = harness.client("auditor-okapi"), harness.client("kiosk-heron")

    enroller.enroll(SUBJECTS[0], ZEBRA)
    enroller.enroll(SUBJECTS[1], IBEX)
    enroller.enroll(SUBJECTS[2], TAPIR, gallery="visitors")
    distances: list[float] = []
    close = auditor.match(SUBJECTS[0], nearby(ZEBRA, 0.317, seed=1701))
    far = auditor.match(SUBJECTS[0], IBEX)
    assert close.match is True
    assert far.match is False
    distances += [d for d in (close.distance, far.distance) if d is not None]
    distances += [c.distance for c in auditor.identify(nearby(IBEX, 0.283, seed=1702)) if c.distance]
    assert len(distances) == 3, "the auditor's policy discloses distances"
    assert kiosk.match(SUBJECTS[2], TAPIR, gallery="visitors").match is True

    assert _refused(lambda: gateway.match(UNKNOWN_SUBJECT, ZEBRA)) is NotFoundError
    assert _refused(lambda: gateway.match(BAD_SUBJECT, ZEBRA)) is InvalidArgumentError
    assert _refused(lambda: gateway.match(SUBJECTS[0], ZEBRA, gallery=UNKNOWN_GALLERY)) is NotFoundError
    assert _refused(lambda: enroller.match(SUBJECTS[0], ZEBRA)) is PermissionDeniedError
    assert _refused(lambda: kiosk.match(SUBJECTS[0], ZEBRA)) is PermissionDeniedError  # not its gallery
    assert _refused(lambda: harness.client("stranger-lynx").match(SUBJECTS[0], ZEBRA)) is (UnauthenticatedError)
    assert enroller.delete(SUBJECTS[1]) == 1
    # A method nobody implements, named after a subject: UNIMPLEMENTED, and no label minted.
    unknown = dev.channel(harness.target, "gateway").unary_unary(f"/faceseal.v1.FaceSealService/{SUBJECTS[0]}")
    with pytest.raises(grpc.RpcError) as raised:
        unknown(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED

    text = scrape(metrics_url(_in_process(harness)))
    forbidden = [*SUBJECTS, UNKNOWN_SUBJECT, BAD_SUBJECT, UNKNOWN_GALLERY, *PROFILES, "spiffe:", "faceseal.dev/"]
    forbidden += [f"{d:.3f}" for d in distances] + [repr(d) for d in distances]
    for s in samples(text):
        assert not any(f in s.name for f in forbidden), s.name
        for label, label_value in s.labels.items():
            assert not any(f in label_value for f in forbidden), f"{s.name}: {label}={label_value!r}"
            with contextlib.suppress(ValueError):
                assert all(abs(float(label_value) - d) > 5e-4 for d in distances), (s.name, label)
    # And positively: every label is a known one, holding a value from its closed set.
    allowed = _allowed_label_values()
    for s in samples(text):
        for label, label_value in s.labels.items():
            assert label in allowed, f"{s.name} has an unvetted label {label!r}"
            values = allowed[label]
            if values is None:
                float(label_value)
            else:
                assert label_value in values, f"{s.name}: {label}={label_value!r} is not a known value"
    # The refusals were counted, under their fixed reasons.
    for reason in ("unknown_identity", "no_permission", "gallery_not_allowed"):
        assert value(text, "faceseal_auth_denied_total", reason=reason) == 1, reason
    assert value(text, "faceseal_match_decisions_total", gallery="faces", decision="match") == 1
    assert value(text, "faceseal_match_decisions_total", gallery="faces", decision="no_match") == 1
    assert value(text, "faceseal_match_decisions_total", gallery="visitors", decision="match") == 1


# ----------------------------------------------------------------------------------------- TLS


def test_metrics_listener_serves_https_only_when_configured(harness: InProcessDaemon) -> None:
    dev = harness.dev
    dev.edit_config(lambda c: c["metrics"].update(tls_cert="server.crt", tls_key="server.key"))
    harness.start()
    daemon = _in_process(harness)

    trusting = ssl.create_default_context(cafile=str(dev.dir / "ca.crt"))
    text = scrape(metrics_url(daemon, "https"), trusting)
    assert value(text, "faceseal_sealed") == 0
    assert any(s.name == "grpc_server_handled_total" for s in samples(text))
    # The certificate names localhost too; hostname checking stays on.
    assert "faceseal_sealed" in scrape(f"https://localhost:{daemon.metrics_port}/metrics", trusting)

    # Plain HTTP gets no metrics, and neither does a client that does not trust the dev CA.
    with pytest.raises((OSError, http.client.HTTPException)):
        scrape(metrics_url(daemon, "http"))
    with pytest.raises(urllib.error.URLError) as untrusted:
        scrape(metrics_url(daemon, "https"), ssl.create_default_context())
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
    # The listener survived both refusals.
    assert "faceseal_sealed" in scrape(metrics_url(daemon, "https"), trusting)

    # An idle TCP connection that never starts its handshake does not stall other scrapes.
    assert daemon.metrics_port is not None
    with socket.create_connection(("127.0.0.1", daemon.metrics_port)):
        assert "faceseal_sealed" in scrape(metrics_url(daemon, "https"), trusting)


# ---------------------------------------------------------------------- state and integrity


def _flip_template_byte(db: Path, gallery: str) -> None:
    """Flip one ciphertext bit of the first template of ``gallery`` (the daemon is stopped)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT template_id, template_blob FROM templates WHERE gallery = ? LIMIT 1", (gallery,)
        ).fetchone()
    assert row is not None, "nothing enrolled"
    blob = bytearray(row[1])
    blob[40] ^= 0x01
    changed = db_execute(db, "UPDATE templates SET template_blob = ? WHERE template_id = ?", [bytes(blob), row[0]])
    assert changed == 1


def test_integrity_failures_count_tampered_rows(harness: InProcessDaemon) -> None:
    harness.start()
    enroller = harness.client("enroller")
    enroller.enroll(SUBJECTS[0], ZEBRA)
    harness.stop()
    _flip_template_byte(harness.dev.db_path, "faces")

    harness.start()
    url = metrics_url(_in_process(harness))
    assert value(scrape(url), "faceseal_integrity_failures_total", gallery="faces") == 1
    assert _refused(lambda: harness.client("gateway").match(SUBJECTS[0], ZEBRA)) is DataLossError
    assert value(scrape(url), "faceseal_integrity_failures_total", gallery="faces") >= 1
    # Re-enrolling with replace clears the subject; the counter, being a counter, stays.
    enroller = harness.client("enroller")
    enroller.enroll(SUBJECTS[0], ZEBRA, replace=True)
    assert harness.client("gateway").match(SUBJECTS[0], ZEBRA).match is True
    assert value(scrape(url), "faceseal_integrity_failures_total", gallery="faces") >= 1


@contextlib.contextmanager
def _wrong_seal_key(dev: Dev) -> Iterator[None]:
    """Replace the file seal's key by another one (the keyring then cannot be unwrapped)."""
    path = dev.dir / "seal.key"
    original = path.read_bytes()
    path.write_bytes(secrets.token_bytes(32))  # the file keeps its 0600 mode
    try:
        yield
    finally:
        path.write_bytes(original)


def test_state_gauges_follow_the_seal_and_the_store(harness: InProcessDaemon) -> None:
    harness.start()
    enroller = harness.client("enroller")
    for i, encoding in enumerate(random_encodings(3, seed=1703)):
        enroller.enroll(f"subject-gauge-{i}", encoding)
    harness.stop()

    with _wrong_seal_key(harness.dev):
        sealed = Daemon(load_config(harness.dev.config_path))
        sealed.start()
        try:
            url = metrics_url(sealed)
            # The daemon keeps retrying; the gauge must say sealed the whole time.
            text = poll("a scrape of the sealed daemon", lambda: scrape(url))
            assert sealed.core.sealed
            assert value(text, "faceseal_sealed") == 1
        finally:
            sealed.stop(0)

    harness.start()
    text = scrape(metrics_url(_in_process(harness)))
    assert value(text, "faceseal_sealed") == 0
    assert value(text, "faceseal_key_versions") == 1
    # The templates opened at unseal are counted before anyone enrolls again.
    assert value(text, "faceseal_templates", gallery="faces") == 3
