"""Interoperability: a Node.js client (grpc-js, .proto files loaded at run time, no generated code)
talks to faceseald over mutual TLS with the dev PKI: Enroll, Match, Identify, Delete and refusals.

interop/node/client.mjs prints one JSON object; these tests run it against an in-process daemon
and check every answer and status code. Its dependencies come from interop/node/package-lock.json
(`npm ci`, run here once when node_modules is missing or older than the lock file).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import InProcessDaemon
from requirements import missing

ROOT = Path(__file__).resolve().parents[1]
INTEROP = ROOT / "interop" / "node"
PROTOS = ROOT / "protos"
INSTALL = "apt-get install nodejs npm"

# grpc status codes (numbers are the same in every gRPC implementation)
NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED = 5, 3, 7


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing("Node.js", INSTALL)
        raise AssertionError("unreachable")
    return path


@pytest.fixture(scope="module")
def node() -> str:
    node = _tool("node")
    npm = _tool("npm")
    lock = INTEROP / "package-lock.json"
    installed = INTEROP / "node_modules" / ".package-lock.json"  # npm writes it on every install
    if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=INTEROP,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"npm ci in {INTEROP} failed:\n{result.stdout}\n{result.stderr}"
    return node


def run_client(node: str, daemon: InProcessDaemon) -> dict[str, Any]:
    # The dev server certificate names localhost (and 127.0.0.1, which TLS cannot send as a name).
    result = subprocess.run(
        [node, "client.mjs", daemon.target, str(daemon.dev.dir), str(PROTOS), "localhost"],
        cwd=INTEROP,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"client.mjs exited {result.returncode}:\n{result.stderr}"
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def check_story(out: dict[str, Any]) -> None:
    assert out["enroll"] == [
        {"subject_id": "alice", "template_count": 1, "has_template_id": True},
        {"subject_id": "bob", "template_count": 1, "has_template_id": True},
    ]
    assert [(m["name"], m["match"]) for m in out["match"]] == [("alice_vs_alice", True), ("alice_vs_bob", False)]
    assert [c["subject_id"] for c in out["identify"]["candidates"]] == ["alice"]
    assert out["delete"] == {"deleted": 1}
    assert out["refused"] == {
        "gateway_enroll": {"code": PERMISSION_DENIED, "status": "PERMISSION_DENIED"},
        "enroller_match": {"code": PERMISSION_DENIED, "status": "PERMISSION_DENIED"},
        "match_deleted_subject": {"code": NOT_FOUND, "status": "NOT_FOUND"},
        "wrong_dimension": {"code": INVALID_ARGUMENT, "status": "INVALID_ARGUMENT"},
    }


def test_node_client_decision_only(node: str, daemon: InProcessDaemon) -> None:
    out = run_client(node, daemon)
    check_story(out)
    # The gateway's default disclosure is the decision: no distance reaches it.
    assert all(m["distance"] is None for m in out["match"])
    assert all(c["distance"] is None for c in out["identify"]["candidates"])


def test_node_client_sees_distances_when_the_policy_discloses_them(node: str, harness: InProcessDaemon) -> None:
    harness.dev.edit_caller("gateway", disclosure="distance")
    out = run_client(node, harness.start())
    check_story(out)
    near, far = (m["distance"] for m in out["match"])
    # client.mjs probes with a vector 0.2 away from alice's; bob's is a random unit vector (~1.41).
    assert near == pytest.approx(0.2, abs=0.002)
    assert far > 0.6
    (candidate,) = out["identify"]["candidates"]
    assert candidate["distance"] == pytest.approx(0.2, abs=0.002)
