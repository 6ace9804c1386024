"""The abuse guard end to end: an in-process daemon over mutual TLS, real dlib encodings.

Each test shrinks the guard's windows and lockouts in [guard] so nothing waits long and turns the
rules it is not about out of the way (``ISOLATED``). Where the outcome depends on time passing (a
lockout ending, a rate's bucket refilling) the test runs the guard on a ``GuardClock`` that moves
only when told to, so a slow machine cannot change what the guard decides.

Covered: per-subject lockout (RESOURCE_EXHAUSTED with a RetryInfo; even the genuine probe is
refused while locked; a match afterwards resets the counter), doubling lockouts, the per-caller
failed-match budget across subjects, the Identify budget, the per-caller request rate, policy
overrides per caller, the hill-climbing signature, state kept in the store across a restart, the
metrics and the audit log, and ``enabled = false``.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import F32, Dev, GuardClock, InProcessDaemon, db_snapshot, euclidean, load_real_encodings, rpc_error
from prometheus_client.parser import text_string_to_metric_families

from faceseal.client import FaceSealClient, MatchResult, NotFoundError, ResourceExhaustedError
from faceseal.server.audit.log import segments
from faceseal.server.metrics import GUARD_SCOPES
from faceseal.v1 import faceseal_pb2

T = TypeVar("T")
THRESHOLD = 0.6
HOUR = 3600.0
MATCH = "/faceseal.v1.FaceSealService/Match"
IDENTIFY = "/faceseal.v1.FaceSealService/Identify"

# Every rule out of the way; a test sets back the one it is about.
ISOLATED: dict[str, Any] = {
    "subject_failures": 1000,
    "caller_rate": 1_000_000.0,
    "caller_failures_per_hour": 1_000_000,
    "identify_per_hour": 1_000_000,
    "similar_probe_count": 4096,  # more than probe_history (64) can ever hold: never fires
}


# --------------------------------------------------------------------------------- the data


class Redacted(np.ndarray):
    """An encoding that does not show its values: pytest prints the arguments of every frame of a
    failing test, and these are biometric data. Slices and arithmetic stay redacted."""

    def __repr__(self) -> str:
        return f"<{self.shape} encoding data, redacted>"

    __str__ = __repr__


class Faces:
    """The real encodings, chosen by person (biometric data: never printed)."""

    def __init__(self, enc: F32, labels: np.ndarray) -> None:
        self.enc: F32 = enc.view(Redacted)
        self.labels = labels

    def __repr__(self) -> str:
        return f"<{len(self.enc)} real encodings, redacted>"

    def person(self, n: int) -> int:
        """The index of the first encoding of the n-th person (data-set order)."""
        firsts: dict[str, int] = {}
        for i, label in enumerate(self.labels.tolist()):
            firsts.setdefault(str(label), i)
        return sorted(firsts.values())[n]

    def people(self) -> int:
        return len(set(self.labels.tolist()))

    def genuine(self, i: int) -> F32:
        """Another photo of the same person, well within the threshold."""
        for j in range(len(self.enc)):
            if j != i and self.labels[j] == self.labels[i] and 0.05 < euclidean(self.enc[i], self.enc[j]) < 0.5:
                return self.enc[j]
        raise AssertionError("no second photo of this person within 0.5")

    def impostors(self, i: int, k: int) -> list[F32]:
        """``k`` encodings of ``k`` other people, each clearly beyond the threshold of ``i``
        (and so, being different people, far apart from each other too)."""
        out, seen = [], {str(self.labels[i])}
        for j in range(len(self.enc)):
            label = str(self.labels[j])
            if label not in seen and euclidean(self.enc[i], self.enc[j]) > 0.75:
                seen.add(label)
                out.append(self.enc[j])
        assert len(out) >= k, f"only {len(out)} impostor people for this subject"
        return out[:k]


@pytest.fixture(scope="module")
def faces() -> Faces:
    enc, labels = load_real_encodings()
    return Faces(enc, labels)


# ------------------------------------------------------------------------------------ helpers


def random_probe(seed: int) -> F32:
    """A random unit vector: about 1.8 from every real face, so it matches nobody."""
    v = np.random.default_rng(seed).standard_normal(128)
    probe: F32 = (v / np.linalg.norm(v)).astype(np.float32)
    return probe


def set_guard(dev: Dev, **settings: Any) -> None:
    dev.edit_config(lambda c: c.setdefault("guard", {}).update(settings))


def add_gateway(dev: Dev, profile: str, **overrides: Any) -> None:
    """Another gateway (match and identify), with per-caller guard overrides in its policy entry."""
    dev.add_caller(profile, ["match", "identify"])
    if overrides:
        dev.edit_caller(profile, **overrides)


def refused(call: Callable[[], object]) -> ResourceExhaustedError:
    with pytest.raises(ResourceExhaustedError) as err:
        call()
    return err.value


def answered(client: FaceSealClient, subject: str, probe: F32) -> MatchResult | None:
    """The Match answer, or None while the guard refuses it."""
    try:
        return client.match(subject, probe)
    except ResourceExhaustedError:
        return None


def fail(client: FaceSealClient, subject: str, probes: list[F32]) -> None:
    for probe in probes:
        assert client.match(subject, probe).match is False


def rejections(harness: InProcessDaemon) -> dict[str, float]:
    """faceseal_guard_rejections_total per scope, scraped from the metrics listener like Prometheus."""
    assert harness.daemon is not None
    assert harness.daemon.metrics_port
    url = f"http://127.0.0.1:{harness.daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # our own listener
        text = response.read().decode("utf-8")
    return {
        s.labels["scope"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "faceseal_guard_rejections_total"
    }


def audit_records(harness: InProcessDaemon) -> list[dict[str, Any]]:
    assert harness.daemon is not None
    return [
        json.loads(line)
        for path in segments(harness.daemon.config.audit.dir)
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def subject_hmac(harness: InProcessDaemon, subject: str) -> str | None:
    assert harness.daemon is not None
    return harness.daemon.core.audit.subject_hmac("faces", subject)


def started(harness: InProcessDaemon, enroll: dict[str, F32]) -> InProcessDaemon:
    harness.start()
    enroller = harness.client("enroller")
    for subject, encoding in enroll.items():
        enroller.enroll(subject, encoding)
    return harness


# ---------------------------------------------------------------------------- subject lockout


def test_lockout_refuses_even_the_genuine_probe_until_it_expires_then_a_match_resets(
    harness: InProcessDaemon, faces: Faces
) -> None:
    set_guard(harness.dev, **{**ISOLATED, "subject_failures": 3, "lockout_seconds": 1.0})
    alice = faces.person(0)
    genuine, impostors = faces.genuine(alice), faces.impostors(alice, 8)
    started(harness, {"alice": faces.enc[alice]})
    clock = GuardClock(harness)  # no time passes for the guard unless the test says so
    gateway = harness.client("gateway")
    assert gateway.match("alice", genuine).match

    fail(gateway, "alice", impostors[:3])
    err = refused(lambda: gateway.match("alice", genuine))  # the genuine user is locked out too
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.retry_after == pytest.approx(1.0)
    assert "locked out" in err.message
    # The status itself carries a google.rpc.RetryInfo detail (AIP-193), not just a message; a
    # new connection changes nothing (the lockout is the subject's, kept in the store).
    raw = rpc_error(
        lambda: harness.stub("gateway").Match(faceseal_pb2.MatchRequest(subject_id="alice", probe=genuine.tolist()))
    )
    status = rpc_status.from_call(raw)  # type: ignore[arg-type]
    assert status is not None
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    assert info.retry_delay.ToTimedelta().total_seconds() == pytest.approx(1.0)

    # Halfway through, still locked, with half the wait left; once it is over, the genuine probe
    # matches again.
    clock.advance(0.5)
    assert refused(lambda: gateway.match("alice", genuine)).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert gateway.match("alice", genuine).match

    # That match reset the subject's counter: 2 failures + match + 2 failures never locks, and
    # the next lockout is a first one again (1 s), not a second (2 s).
    fail(gateway, "alice", impostors[3:5])
    assert gateway.match("alice", genuine).match
    fail(gateway, "alice", impostors[5:7])
    assert gateway.match("alice", genuine).match
    fail(gateway, "alice", impostors[:3])
    assert refused(lambda: gateway.match("alice", genuine)).retry_after == pytest.approx(1.0)


def test_each_further_lockout_lasts_twice_as_long(harness: InProcessDaemon, faces: Faces) -> None:
    set_guard(harness.dev, **{**ISOLATED, "subject_failures": 2, "lockout_seconds": 1.0, "lockout_max_seconds": 60})
    alice = faces.person(0)
    impostors = faces.impostors(alice, 4)
    started(harness, {"alice": faces.enc[alice]})
    clock = GuardClock(harness)  # no time passes for the guard unless the test says so
    gateway = harness.client("gateway")

    fail(gateway, "alice", impostors[:2])
    assert refused(lambda: gateway.match("alice", impostors[2])).retry_after == pytest.approx(1.0)
    # Refusals change nothing; once the lockout is over, the first answer is the next failure.
    clock.advance(1.0)
    fail(gateway, "alice", impostors[2:4])
    assert refused(lambda: gateway.match("alice", impostors[0])).retry_after == pytest.approx(2.0)
    # It really lasts 2 s: still locked after 1.5, answered after 2.
    clock.advance(1.5)
    assert refused(lambda: gateway.match("alice", impostors[0])).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert gateway.match("alice", impostors[0]).match is False


def all_at_once(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` on as many threads, released together: an attacker's parallel requests."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        start.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_parallel_failed_matches_get_no_more_answers_than_the_lockout_allows(
    harness: InProcessDaemon, faces: Faces
) -> None:
    """A subject's failures are counted before any answer leaves, so sending the guesses in
    parallel must not buy more of them than sending them one by one (5 before the lockout)."""
    set_guard(harness.dev, **{**ISOLATED, "subject_failures": 5})
    alice = faces.person(0)
    started(harness, {"alice": faces.enc[alice]})
    clients = [harness.client("gateway") for _ in range(4)]  # several connections, as an attacker would
    guesses = faces.impostors(alice, 20)
    results = all_at_once(
        [lambda c=clients[i % 4], g=g: answered(c, "alice", g) for i, g in enumerate(guesses)]  # type: ignore[misc]
    )
    answers = [r for r in results if r is not None]
    assert not any(r.match for r in answers)
    assert len(answers) <= 5, f"{len(answers)} parallel guesses were answered; the lockout allows 5"
    counts = rejections(harness)  # the refused ones: in flight together, or after the lockout
    assert counts["in_flight"] + counts["subject"] == len(results) - len(answers)
    # Guessing on one by one, the attacker gets the rest of the 5 and then the lockout: the
    # burst bought nothing (a guess refused as "in flight" is no answer, and counts nothing).
    more = 0
    while answered(clients[0], "alice", guesses[more]) is not None:
        more += 1
    assert len(answers) + more == 5
    assert refused(lambda: clients[0].match("alice", faces.genuine(alice))).retry_after


def test_a_match_that_ends_in_an_error_leaves_nothing_in_flight(harness: InProcessDaemon, faces: Faces) -> None:
    # NOT_FOUND comes after the guard's check: each such Match must give its place back, or
    # after subject_failures of them the subject would be refused as "too many at once".
    set_guard(harness.dev, **{**ISOLATED, "subject_failures": 3, "caller_failures_per_hour": 3})
    started(harness, {"alice": faces.enc[faces.person(0)]})
    gateway = harness.client("gateway")
    for _ in range(8):
        with pytest.raises(NotFoundError):
            gateway.match("nobody", faces.enc[0])
    assert gateway.match("alice", faces.genuine(faces.person(0))).match


def test_parallel_identify_calls_cannot_overspend_the_budget(harness: InProcessDaemon, faces: Faces) -> None:
    set_guard(harness.dev, **{**ISOLATED, "identify_per_hour": 4})
    alice = faces.person(0)
    started(harness, {"alice": faces.enc[alice]})
    clients = [harness.client("gateway") for _ in range(4)]

    def search(client: FaceSealClient) -> bool:
        try:
            client.identify(faces.genuine(alice))
        except ResourceExhaustedError:
            return False
        return True

    results = all_at_once([lambda c=clients[i % 4]: search(c) for i in range(16)])  # type: ignore[misc]
    assert sum(results) <= 4, f"{sum(results)} parallel searches were answered; the budget is 4"


# ------------------------------------------------------------------------------ caller budgets


def test_spraying_one_probe_over_many_subjects_uses_up_the_callers_failure_budget(
    harness: InProcessDaemon, faces: Faces
) -> None:
    set_guard(harness.dev, **{**ISOLATED, "caller_failures_per_hour": 6})
    add_gateway(harness.dev, "gateway2")
    subjects = {f"person-{n}": faces.enc[faces.person(n)] for n in range(8)}
    started(harness, subjects)
    gateway, other = harness.client("gateway"), harness.client("gateway2")
    spray = random_probe(1)  # one probe for every subject
    names = list(subjects)

    for name in names[:6]:  # one failure per subject: no subject comes near its own lockout
        assert gateway.match(name, spray).match is False
    err = refused(lambda: gateway.match(names[6], spray))
    assert "failed matches" in err.message
    assert err.retry_after is not None
    assert HOUR - 60 < err.retry_after <= HOUR
    # The budget is the caller's: even a genuine probe for an untouched subject is refused ...
    last = faces.person(7)
    assert "failed matches" in refused(lambda: gateway.match(names[7], faces.genuine(last))).message
    # ... while another caller is unaffected.
    assert other.match(names[7], faces.genuine(last)).match
    assert other.match(names[6], spray).match is False

    counts = rejections(harness)
    assert counts["caller_failures"] == 2
    assert counts["subject"] == 0


def test_identify_has_its_own_budget(harness: InProcessDaemon, faces: Faces) -> None:
    set_guard(harness.dev, **{**ISOLATED, "identify_per_hour": 3})
    add_gateway(harness.dev, "gateway2")
    alice = faces.person(0)
    started(harness, {"alice": faces.enc[alice]})
    gateway, other = harness.client("gateway"), harness.client("gateway2")

    for _ in range(3):
        assert [c.subject_id for c in gateway.identify(faces.genuine(alice))] == ["alice"]
    err = refused(lambda: gateway.identify(faces.genuine(alice)))
    assert "Identify" in err.message
    assert err.retry_after is not None
    assert err.retry_after > HOUR - 60
    assert gateway.match("alice", faces.genuine(alice)).match, "Match is not Identify's budget"
    assert [c.subject_id for c in other.identify(faces.genuine(alice))] == ["alice"]
    assert rejections(harness)["identify"] == 1


def test_identify_batch_spends_one_search_per_probe(harness: InProcessDaemon, faces: Faces) -> None:
    set_guard(harness.dev, **{**ISOLATED, "identify_per_hour": 5})
    alice = faces.person(0)
    started(harness, {"alice": faces.enc[alice]})
    gateway = harness.client("gateway")
    probe = faces.genuine(alice)

    answers = gateway.identify_batch([probe] * 3)
    assert [[c.subject_id for c in found] for found in answers] == [["alice"]] * 3
    # Two searches are left: a batch of three is refused whole, spending nothing ...
    err = refused(lambda: gateway.identify_batch([probe] * 3))
    assert "2 Identify searches left" in err.message
    assert [c.subject_id for c in gateway.identify_batch([probe] * 2)[1]] == ["alice"]
    # ... and then nothing is left, for a batch or a single Identify.
    refused(lambda: gateway.identify(probe))
    assert rejections(harness)["identify"] == 2


def test_a_batch_larger_than_the_whole_identify_budget_says_so(harness: InProcessDaemon, faces: Faces) -> None:
    set_guard(harness.dev, **{**ISOLATED, "identify_per_hour": 3})
    alice = faces.person(0)
    started(harness, {"alice": faces.enc[alice]})
    gateway = harness.client("gateway")
    err = refused(lambda: gateway.identify_batch([faces.genuine(alice)] * 4))
    assert "send smaller batches" in err.message
    # Nothing was spent: the whole budget is still there.
    assert len(gateway.identify_batch([faces.genuine(alice)] * 3)) == 3


def test_the_request_rate_refuses_a_burst_then_refills(harness: InProcessDaemon, faces: Faces) -> None:
    # 4/s: a token every 0.25 s, a step the guard's clock takes without rounding.
    set_guard(harness.dev, **{**ISOLATED, "caller_rate": 4.0})
    alice = faces.person(0)
    genuine = faces.genuine(alice)
    started(harness, {"alice": faces.enc[alice]})
    clock = GuardClock(harness)  # the burst takes no time for the guard, however slow the machine
    gateway = harness.client("gateway")

    outcomes = [answered(gateway, "alice", genuine) for _ in range(20)]
    admitted = [r is not None for r in outcomes]
    assert admitted == [True] * 4 + [False] * 16, "a second's worth (4) of a burst of 20 is admitted, no more"
    assert all(r.match for r in outcomes if r is not None)
    err = refused(lambda: gateway.match("alice", genuine))
    assert "request rate" in err.message
    assert err.retry_after == pytest.approx(0.25)  # one token at 4/s
    assert rejections(harness)["caller_rate"] == 17

    # Half a token later, still refused, with half the wait left; after the wait it gave, one
    # call is admitted, and only one.
    clock.advance(0.125)
    assert refused(lambda: gateway.match("alice", genuine)).retry_after == pytest.approx(0.125)
    clock.advance(0.125)
    assert gateway.match("alice", genuine).match
    assert refused(lambda: gateway.match("alice", genuine)).retry_after == pytest.approx(0.25)
    # A long pause fills the bucket to a second's worth, not more.
    clock.advance(60.0)
    assert [answered(gateway, "alice", genuine) is not None for _ in range(6)] == [True] * 4 + [False] * 2
    assert rejections(harness)["caller_rate"] == 17 + 2 + 2


def test_per_caller_policy_overrides_take_precedence_over_the_guard_defaults(
    harness: InProcessDaemon, faces: Faces
) -> None:
    # Tight defaults; one caller allowed more than them, one allowed less.
    set_guard(harness.dev, **{**ISOLATED, "caller_rate": 5.0, "caller_failures_per_hour": 3, "identify_per_hour": 3})
    add_gateway(harness.dev, "vip", rate=1000.0, failures_per_hour=50, identify_per_hour=50)
    add_gateway(harness.dev, "strict", rate=100.0, failures_per_hour=1, identify_per_hour=1)
    add_gateway(harness.dev, "slow", rate=0.5)  # below one a second
    harness.dev.edit_caller("enroller", rate=1000.0)  # enrolls 12 subjects at once
    subjects = {f"person-{n}": faces.enc[faces.person(n)] for n in range(12)}
    started(harness, subjects)
    clock = GuardClock(harness)  # no time passes for the guard unless the test says so
    names = list(subjects)
    genuine = faces.genuine(faces.person(0))
    spray = random_probe(1)

    # The guard's defaults for a caller without overrides: a burst of 10 at 5/s is cut at 5.
    gateway = harness.client("gateway")
    assert [answered(gateway, names[0], genuine) is not None for _ in range(10)] == [True] * 5 + [False] * 5

    vip = harness.client("vip")
    assert all(vip.match(names[0], genuine).match for _ in range(20)), "rate 1000 overrides 5"
    for name in names[1:11]:  # 10 failures, over the default budget of 3
        assert vip.match(name, spray).match is False
    for _ in range(10):  # 10 Identify calls, over the default 3
        vip.identify(genuine)

    strict = harness.client("strict")
    assert strict.match(names[1], spray).match is False
    assert "failed matches" in refused(lambda: strict.match(names[2], spray)).message
    strict.identify(genuine)
    assert "Identify" in refused(lambda: strict.identify(genuine)).message

    # Regression: a rate below 1/s used to refuse every call (the bucket never held a token).
    slow = harness.client("slow")
    assert slow.match(names[0], genuine).match
    err = refused(lambda: slow.match(names[0], genuine))
    assert "request rate" in err.message
    assert err.retry_after == pytest.approx(2.0)  # one token at 0.5/s
    clock.advance(1.5)
    assert refused(lambda: slow.match(names[0], genuine)).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert slow.match(names[0], genuine).match, "and the bucket refills at 0.5/s"


# -------------------------------------------------------------------- hill-climbing signature


def test_a_run_of_near_identical_failed_probes_locks_the_subject_early(harness: InProcessDaemon, faces: Faces) -> None:
    # Failures alone would take 100; similar probes lock after similar_probe_count + 1.
    set_guard(harness.dev, **{**ISOLATED, "subject_failures": 100, "similar_probe_count": 3, "lockout_seconds": 600})
    alice = faces.person(0)
    genuine = faces.genuine(alice)
    started(harness, {"alice": faces.enc[alice]})
    gateway = harness.client("gateway")

    # Ten different faces failing is what a crowd at a door looks like: no lockout.
    fail(gateway, "alice", faces.impostors(alice, 10))
    assert gateway.match("alice", genuine).match

    # A hill climber's probes: one start, tiny steps (0.01 apart, the radius is 0.25 x 0.6).
    rng = np.random.default_rng(7)
    start = random_probe(2).astype(np.float64)
    steps = 0.01 * rng.standard_normal((6, start.size)) / np.sqrt(start.size)
    climb = list((start + steps).astype(np.float32))
    fail(gateway, "alice", climb[:4])  # the 4th has 3 near-identical predecessors: answered, then locked
    err = refused(lambda: gateway.match("alice", climb[4]))
    assert "locked out" in err.message
    assert err.retry_after is not None
    assert err.retry_after > 500
    assert "locked out" in refused(lambda: gateway.match("alice", genuine)).message

    counts = rejections(harness)
    assert counts["probe_similarity"] == 1
    assert counts["subject"] == 2


# ------------------------------------------------------------------- state, metrics, audit, off


def test_lockouts_and_budgets_live_in_the_store_and_survive_a_restart(harness: InProcessDaemon, faces: Faces) -> None:
    set_guard(
        harness.dev, **{**ISOLATED, "subject_failures": 2, "caller_failures_per_hour": 2, "lockout_seconds": 3600}
    )
    add_gateway(harness.dev, "gateway2")
    alice, bob = faces.person(0), faces.person(1)
    started(harness, {"alice": faces.enc[alice], "bob": faces.enc[bob]})
    fail(harness.client("gateway"), "alice", faces.impostors(alice, 2))

    harness.restart()
    gateway = harness.client("gateway")  # a new port: a new client
    err = refused(lambda: gateway.match("alice", faces.genuine(alice)))
    assert "locked out" in err.message
    assert err.retry_after is not None
    assert err.retry_after > 3500
    assert "failed matches" in refused(lambda: gateway.match("bob", faces.genuine(bob))).message
    assert harness.client("gateway2").match("bob", faces.genuine(bob)).match

    # The store names no subject in clear: a subject's counter is keyed by its subject ref (an HMAC).
    rows = db_snapshot(harness.dev.db_path)["guard"]
    assert {row[0] for row in rows} >= {"subject", "caller_failures"}
    stored = repr(rows).encode()
    assert b"alice" not in stored


def test_refusals_show_in_the_metrics_and_the_audit_log(harness: InProcessDaemon, faces: Faces) -> None:
    set_guard(
        harness.dev,
        **{
            **ISOLATED,
            "subject_failures": 2,
            "caller_failures_per_hour": 3,
            "identify_per_hour": 1,
            "lockout_seconds": 3600,
        },
    )
    alice, bob = faces.person(0), faces.person(1)
    started(harness, {"alice": faces.enc[alice], "bob": faces.enc[bob]})
    gateway = harness.client("gateway")
    assert all(v == 0 for v in rejections(harness).values())

    fail(gateway, "alice", faces.impostors(alice, 2))  # alice locked; 2 of 3 failures spent
    refused(lambda: gateway.match("alice", faces.genuine(alice)))
    refused(lambda: gateway.match("alice", faces.genuine(alice)))
    fail(gateway, "bob", faces.impostors(bob, 1))  # the budget's last failure
    refused(lambda: gateway.match("bob", faces.genuine(bob)))
    gateway.identify(faces.genuine(bob))
    refused(lambda: gateway.identify(faces.genuine(bob)))

    counts = rejections(harness)
    assert set(counts) == set(GUARD_SCOPES)
    assert counts == {
        "subject": 2,
        "caller_failures": 1,
        "identify": 1,
        "caller_rate": 0,
        "probe_similarity": 0,
        "in_flight": 0,
    }

    exhausted = [r for r in audit_records(harness) if r["outcome"] == "RESOURCE_EXHAUSTED"]
    assert [(r["method"], r["subject"]) for r in exhausted] == [
        (MATCH, subject_hmac(harness, "alice")),
        (MATCH, subject_hmac(harness, "alice")),
        (MATCH, subject_hmac(harness, "bob")),
        (IDENTIFY, None),
    ]
    assert all(r["caller"] == "spiffe://faceseal.dev/gateway" and r["gallery"] == "faces" for r in exhausted)


def test_enabled_false_turns_every_rule_off(harness: InProcessDaemon, faces: Faces) -> None:
    # The tightest settings there are, and the switch off.
    set_guard(
        harness.dev,
        enabled=False,
        subject_failures=1,
        lockout_seconds=3600,
        caller_rate=1.0,
        caller_failures_per_hour=1,
        identify_per_hour=1,
        similar_probe_count=1,
    )
    alice = faces.person(0)
    genuine = faces.genuine(alice)
    started(harness, {"alice": faces.enc[alice]})
    gateway = harness.client("gateway")

    same = faces.impostors(alice, 1)[0]
    for _ in range(20):  # the same failing probe, as fast as it goes (far over 1 call/s)
        assert gateway.match("alice", same).match is False
    assert gateway.match("alice", genuine).match
    for _ in range(10):
        assert [c.subject_id for c in gateway.identify(genuine)] == ["alice"]

    assert all(v == 0 for v in rejections(harness).values())
    assert not [r for r in audit_records(harness) if r["outcome"] == "RESOURCE_EXHAUSTED"]
    assert db_snapshot(harness.dev.db_path)["guard"] == [], "a disabled guard writes nothing"
