"""Malformed requests get the documented code, change nothing in the store, echo no vector values,
and leave the daemon serving."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from helpers import DIM, InProcessDaemon, db_revision, db_snapshot, health, random_encodings

from faceseal.v1 import faceseal_pb2 as pb

MARK = 0.31415927  # a value whose digits would stand out in an error message
GOOD = [MARK + i * 1e-4 for i in range(DIM)]
ALICE, BOB = random_encodings(2, seed=200)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED


def _with(index: int, value: float) -> list[float]:
    values = list(GOOD)
    values[index] = value
    return values


# Vectors that must be refused, for every method that takes one.
BAD_VECTORS: dict[str, tuple[list[float], grpc.StatusCode]] = {
    "dim-127": (GOOD[:-1], INVALID),
    "dim-129": ([*GOOD, MARK], INVALID),
    "dim-512": (GOOD * 4, INVALID),
    "empty": ([], INVALID),
    "nan": (_with(5, float("nan")), INVALID),
    "plus-inf": (_with(0, float("inf")), INVALID),
    "minus-inf": (_with(DIM - 1, float("-inf")), INVALID),
    "all-zeros": ([0.0] * DIM, INVALID),
    "5MB": ([MARK] * (5 * 1024 * 1024 // 4), TOO_BIG),  # over the 1 MiB limit: refused by grpc
}

BAD_SUBJECTS = {
    "subject-empty": "",
    "subject-129-chars": "s" * 129,
    "subject-unicode": "zoë",
    "subject-sql": "x'; DROP TABLE templates; --",
    "subject-spaces": "john smith",
    "subject-newline": "alice\n",
    "subject-nul": "alice\x00",
}

BAD_GALLERIES = {"gallery-dotdot": "../faces", "gallery-slash": "faces/x", "gallery-65": "g" * 65}


@dataclass(frozen=True)
class Case:
    method: str
    request: Any = field(repr=False)
    code: grpc.StatusCode


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name, (vector, code) in BAD_VECTORS.items():
        cases[f"enroll-{name}"] = Case("Enroll", pb.EnrollRequest(subject_id="carol", encoding=vector), code)
        cases[f"match-{name}"] = Case("Match", pb.MatchRequest(subject_id="alice", probe=vector), code)
        cases[f"identify-{name}"] = Case("Identify", pb.IdentifyRequest(probe=vector, top_k=5), code)
        # The bad probe behind a good one: the whole batch is refused.
        probes = [pb.Probe(encoding=GOOD), pb.Probe(encoding=vector)]
        cases[f"identify_batch-{name}"] = Case("IdentifyBatch", pb.IdentifyBatchRequest(probes=probes, top_k=5), code)
    for name, subject in BAD_SUBJECTS.items():
        cases[f"enroll-{name}"] = Case("Enroll", pb.EnrollRequest(subject_id=subject, encoding=GOOD), INVALID)
        cases[f"match-{name}"] = Case("Match", pb.MatchRequest(subject_id=subject, probe=GOOD), INVALID)
        cases[f"delete-{name}"] = Case("Delete", pb.DeleteRequest(subject_id=subject), INVALID)
    for name, gallery in {**BAD_GALLERIES, "gallery-unknown": "nosuch"}.items():
        code = NOT_FOUND if gallery == "nosuch" else INVALID
        cases[f"enroll-{name}"] = Case(
            "Enroll", pb.EnrollRequest(gallery=gallery, subject_id="carol", encoding=GOOD), code
        )
        cases[f"match-{name}"] = Case("Match", pb.MatchRequest(gallery=gallery, subject_id="alice", probe=GOOD), code)
        cases[f"identify-{name}"] = Case("Identify", pb.IdentifyRequest(gallery=gallery, probe=GOOD, top_k=5), code)
        cases[f"delete-{name}"] = Case("Delete", pb.DeleteRequest(gallery=gallery, subject_id="alice"), code)
        batch = pb.IdentifyBatchRequest(gallery=gallery, probes=[pb.Probe(encoding=GOOD)], top_k=5)
        cases[f"identify_batch-{name}"] = Case("IdentifyBatch", batch, code)
    cases["identify_batch-no-probes"] = Case("IdentifyBatch", pb.IdentifyBatchRequest(top_k=5), INVALID)
    cases["identify_batch-65-probes"] = Case(
        "IdentifyBatch", pb.IdentifyBatchRequest(probes=[pb.Probe(encoding=GOOD)] * 65, top_k=5), INVALID
    )
    cases["identify_batch-top_k-0"] = Case(
        "IdentifyBatch", pb.IdentifyBatchRequest(probes=[pb.Probe(encoding=GOOD)], top_k=0), INVALID
    )
    cases["identify-top_k-0"] = Case("Identify", pb.IdentifyRequest(probe=GOOD, top_k=0), INVALID)
    cases["identify-top_k-1e9"] = Case("Identify", pb.IdentifyRequest(probe=GOOD, top_k=10**9), INVALID)
    cases["identify-top_k-101"] = Case("Identify", pb.IdentifyRequest(probe=GOOD, top_k=101), INVALID)
    return cases


CASES = _cases()
PROFILE = {
    "Enroll": "enroller",
    "Delete": "enroller",
    "Match": "gateway",
    "Identify": "gateway",
    "IdentifyBatch": "gateway",
}


@pytest.fixture
def populated(daemon: InProcessDaemon) -> InProcessDaemon:
    enroller = daemon.client("enroller")
    enroller.enroll("alice", ALICE)
    enroller.enroll("alice", ALICE * 0.99)
    enroller.enroll("bob", BOB)
    return daemon


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_refused_and_changes_nothing(populated: InProcessDaemon, name: str) -> None:
    case = CASES[name]
    db = populated.dev.db_path
    before, revision = db_snapshot(db), db_revision(db)
    assert len(before["templates"]) == 3

    stub = populated.stub(PROFILE[case.method])
    call: Callable[..., Any] = getattr(stub, case.method)
    with pytest.raises(grpc.RpcError) as caught:
        call(case.request, timeout=10)
    err: grpc.RpcError = caught.value
    assert err.code() == case.code, err.details()

    details = err.details() or ""
    for echo in ("31415", "0.314"):
        assert echo not in details, "the error echoes vector values"
    for echo in ("DROP TABLE", "zoë", "john smith"):
        assert echo not in details, "the error echoes the subject id"

    assert db_snapshot(db) == before
    assert db_revision(db) == revision
    assert health(populated.dev, populated.target) == "SERVING"
    gateway = populated.client("gateway")
    assert gateway.match("alice", ALICE).match is True
    assert gateway.match("bob", ALICE).match is False
    assert [c.subject_id for c in gateway.identify(BOB, top_k=5)] == ["bob"]


def test_the_largest_valid_inputs_are_accepted(daemon: InProcessDaemon) -> None:
    """The refusals above are about the limits, not about the shape of the request."""
    longest = "A-z.0_9:@" * 14 + "xx"
    assert len(longest) == 128
    assert daemon.client("enroller").enroll(longest, ALICE).subject_id == longest
    gateway = daemon.client("gateway")
    assert gateway.match(longest, ALICE).match is True
    assert [c.subject_id for c in gateway.identify(ALICE, top_k=100)] == [longest]
    assert [c.subject_id for c in gateway.identify(ALICE, top_k=1, gallery="faces")] == [longest]
