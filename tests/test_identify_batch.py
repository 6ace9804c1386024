"""IdentifyBatch over mutual TLS on real face encodings: the answer to every probe is the answer
Identify gives it, each probe is one audited search, and a batch is refused whole."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import F32, Dev, InProcessDaemon, db_snapshot, load_real_encodings, rpc_error
from test_audit import audit_lines

from faceseal.client import InvalidArgumentError, ResourceExhaustedError
from faceseal.client.cli import main
from faceseal.v1 import faceseal_pb2 as pb


def people(count: int) -> tuple[dict[str, F32], list[F32]]:
    """Up to ``count`` people's first photos to enroll, and each one's second photo as a probe."""
    enc, labels = load_real_encodings()
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    for i, label in enumerate(labels.tolist()):
        if str(label) not in first:
            first[str(label)] = i
        else:
            second.setdefault(str(label), i)
    both = [label for label in first if label in second][:count]
    enrolled = {f"person{n:02d}": enc[first[label]] for n, label in enumerate(both)}
    return enrolled, [enc[second[label]] for label in both]


@pytest.fixture
def enrolled(harness: InProcessDaemon) -> tuple[InProcessDaemon, list[F32]]:
    harness.dev.add_caller("auditor", ["identify"], disclosure="distance")
    harness.start()
    faces, probes = people(40)
    assert len(faces) >= 20
    harness.client("enroller").bulk_enroll(faces.items())
    stranger = np.random.default_rng(3).standard_normal(128)
    probes.append((stranger / np.linalg.norm(stranger)).astype(np.float32))  # about 1.4 from everyone
    return harness, probes


def test_every_probe_gets_what_identify_gives_it(enrolled: tuple[InProcessDaemon, list[F32]]) -> None:
    daemon, probes = enrolled
    for profile in ("auditor", "gateway"):
        client = daemon.client(profile)
        batch = client.identify_batch(probes, top_k=3)
        assert batch == [client.identify(p, top_k=3) for p in probes], profile
        assert batch[-1] == [], "the stranger matches nobody"
        assert sum(1 for found in batch if found) >= len(probes) // 2, "most second photos find their person"
        disclosed = [c.distance is not None for found in batch for c in found]
        assert all(disclosed) if profile == "auditor" else not any(disclosed)


def test_each_probe_is_one_audited_search(enrolled: tuple[InProcessDaemon, list[F32]]) -> None:
    daemon, probes = enrolled
    before = len(audit_lines(daemon.dev))
    answers = daemon.client("gateway").identify_batch([probes[0], probes[-1], probes[1], probes[-1], probes[2]])
    records = audit_lines(daemon.dev)[before:]
    assert len(records) == 5
    assert [r["candidates"] for r in records] == [len(found) for found in answers]
    assert [r["candidates"] for r in records][1::2] == [0, 0]  # the stranger's
    assert len({r["request_id"] for r in records}) == 1
    assert {r["method"] for r in records} == {"/faceseal.v1.FaceSealService/IdentifyBatch"}
    assert {r["outcome"] for r in records} == {"OK"}


def test_a_batch_over_the_limit_is_refused_whole_and_audits_no_search(harness: InProcessDaemon, dev: Dev) -> None:
    dev.set_server(max_identify_batch=4)
    harness.start()
    faces, probes = people(5)
    harness.client("enroller").bulk_enroll(faces.items())
    stub = harness.stub("gateway")
    searches = len([r for r in audit_lines(dev) if r["outcome"] == "OK"])
    request = pb.IdentifyBatchRequest(probes=[pb.Probe(encoding=p.tolist()) for p in probes[:5]], top_k=1)
    err = rpc_error(lambda: stub.IdentifyBatch(request, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 to 4 probes" in (err.details() or "")
    assert len([r for r in audit_lines(dev) if r["outcome"] == "OK"]) == searches
    del request.probes[4]
    assert len(stub.IdentifyBatch(request, timeout=10).results) == 4


def test_a_bad_probe_is_named_by_its_position(enrolled: tuple[InProcessDaemon, list[F32]]) -> None:
    daemon, probes = enrolled
    bad = probes[2].copy()
    bad[7] = np.nan
    before = db_snapshot(daemon.dev.db_path)
    request = pb.IdentifyBatchRequest(probes=[pb.Probe(encoding=p.tolist()) for p in [probes[0], probes[1], bad]])
    request.top_k = 2
    err = rpc_error(lambda: daemon.stub("gateway").IdentifyBatch(request, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "probes[2]" in (err.details() or "")
    assert db_snapshot(daemon.dev.db_path) == before


def test_identify_batch_needs_the_identify_permission(enrolled: tuple[InProcessDaemon, list[F32]]) -> None:
    daemon, probes = enrolled
    request = pb.IdentifyBatchRequest(probes=[pb.Probe(encoding=probes[0].tolist())], top_k=1)
    err = rpc_error(lambda: daemon.stub("enroller").IdentifyBatch(request, timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_cli_sends_a_file_of_several_probes_as_identify_batches(
    enrolled: tuple[InProcessDaemon, list[F32]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon, probes = enrolled
    path = tmp_path / "probes.npy"
    np.save(path, np.stack(probes[:5] + probes[-1:]))  # five people, then the stranger
    argv = ["--profile", "gateway", "--dev-dir", str(daemon.dev.dir), "--target", daemon.target, "--json"]
    # --batch 4: two IdentifyBatch calls; the answers still come back in file order.
    before = len(audit_lines(daemon.dev))
    assert main([*argv, "identify", str(path), "--top-k", "1", "--batch", "4"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len({r["request_id"] for r in audit_lines(daemon.dev)[before:]}) == 2
    want = daemon.client("gateway").identify_batch(probes[:5] + probes[-1:], top_k=1)
    assert results == [
        {"probe": i, "candidates": [{"subject_id": c.subject_id, "distance": None} for c in found]}
        for i, found in enumerate(want)
    ]
    assert results[-1]["candidates"] == []
    assert main([*argv[:-1], "identify", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert lines[-1] == "probe 5: no candidate within threshold"


def test_a_batch_whose_answer_could_overflow_a_message_is_refused(harness: InProcessDaemon, dev: Dev) -> None:
    dev.set_server(max_message_bytes=65536)
    harness.start()
    faces, probes = people(8)
    harness.client("enroller").bulk_enroll(faces.items())
    stub = harness.stub("gateway")
    request = pb.IdentifyBatchRequest(probes=[pb.Probe(encoding=p.tolist()) for p in probes], top_k=100)
    err = rpc_error(lambda: stub.IdentifyBatch(request, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send fewer probes or a smaller top_k" in (err.details() or "")
    request.top_k = 5  # 8 x 5 candidates fit
    assert len(stub.IdentifyBatch(request, timeout=10).results) == 8


def test_each_probe_counts_against_the_request_rate(harness: InProcessDaemon, dev: Dev) -> None:
    dev.edit_config(lambda c: c.setdefault("guard", {}).update({"caller_rate": 10.0}))
    harness.start()
    faces, probes = people(12)
    harness.client("enroller").bulk_enroll(faces.items())
    gateway = harness.client("gateway")
    with pytest.raises(InvalidArgumentError) as refused:  # more than the bucket ever holds: no wait helps
        gateway.identify_batch(probes[:11])
    assert "send smaller batches" in refused.value.message
    assert len(gateway.identify_batch(probes[:10])) == 10
    with pytest.raises(ResourceExhaustedError) as err:  # the bucket is empty now
        gateway.identify_batch(probes[:10])
    assert "over its request rate" in err.value.message
