"""The core story over real mutual TLS: the enroller enrolls, the gateway matches and identifies,
the enroller deletes. Each test runs its own daemon on a fresh dev setup."""

from __future__ import annotations

import re

import pytest
from helpers import InProcessDaemon, euclidean, nearby, random_encodings
from seals import EACH_SEAL

from faceseal.client import NotFoundError

# Once per seal: file, PKCS#11 (SoftHSM2), Transit (OpenBao).
pytestmark = EACH_SEAL


@pytest.fixture
def with_auditor(harness: InProcessDaemon) -> InProcessDaemon:
    """The default setup plus ``auditor``: match and identify, distances disclosed."""
    harness.dev.add_caller("auditor", ["match", "identify"], disclosure="distance")
    return harness.start()


def test_enroll_match_identify_delete(daemon: InProcessDaemon) -> None:
    alice, bob, carol = random_encodings(3, seed=1)
    enroller, gateway = daemon.client("enroller"), daemon.client("gateway")

    first = enroller.enroll("alice", alice)
    assert first.subject_id == "alice"
    assert first.template_count == 1
    assert re.fullmatch(r"[0-9a-f]{32}", first.template_id)
    assert enroller.enroll("bob", bob).template_count == 1

    # Her own encoding, and a new photo of her (0.3 away), match; Bob's face does not.
    assert gateway.match("alice", alice).match is True
    assert gateway.match("alice", nearby(alice, 0.3, seed=2)).match is True
    assert gateway.match("alice", bob).match is False
    assert gateway.match("bob", alice).match is False
    # The gateway's default disclosure is the decision only.
    assert gateway.match("alice", alice).distance is None

    # Identify names Alice for a probe of Alice, and nobody for a stranger.
    probe = nearby(alice, 0.25, seed=3)
    assert [c.subject_id for c in gateway.identify(probe, top_k=5)] == ["alice"]
    assert gateway.identify(carol, top_k=5) == []

    assert enroller.delete("alice") == 1
    with pytest.raises(NotFoundError):
        gateway.match("alice", alice)
    assert gateway.identify(probe, top_k=5) == []
    with pytest.raises(NotFoundError):
        enroller.delete("alice")
    # Bob is untouched by Alice's deletion.
    assert gateway.match("bob", bob).match is True


def test_threshold_is_inclusive_at_0_6(daemon: InProcessDaemon) -> None:
    (alice,) = random_encodings(1, seed=4)
    daemon.client("enroller").enroll("alice", alice)
    gateway = daemon.client("gateway")
    inside, outside = nearby(alice, 0.59, seed=5), nearby(alice, 0.61, seed=6)
    assert euclidean(alice, inside) < 0.6 < euclidean(alice, outside)
    assert gateway.match("alice", inside).match is True
    assert gateway.match("alice", outside).match is False


def test_match_decides_on_the_closest_of_several_templates(with_auditor: InProcessDaemon) -> None:
    first, second, _ = random_encodings(3, seed=7)
    enroller = with_auditor.client("enroller")
    assert enroller.enroll("dana", first).template_count == 1
    assert enroller.enroll("dana", second).template_count == 2

    probe = nearby(second, 0.3, seed=8)  # close to the second photo, far from the first
    d_first, d_second = euclidean(first, probe), euclidean(second, probe)
    assert d_first > 0.6 >= d_second
    assert with_auditor.client("gateway").match("dana", probe).match is True
    result = with_auditor.client("auditor").match("dana", probe)
    assert result.match is True
    assert result.distance == round(min(d_first, d_second), 3)

    # The same holds the other way round: near the first photo only.
    probe = nearby(first, 0.4, seed=9)
    assert with_auditor.client("auditor").match("dana", probe).distance == round(euclidean(first, probe), 3)


def test_replace_drops_the_old_templates(daemon: InProcessDaemon) -> None:
    old1, old2, new = random_encodings(3, seed=10)
    enroller, gateway = daemon.client("enroller"), daemon.client("gateway")
    enroller.enroll("erin", old1)
    assert enroller.enroll("erin", old2).template_count == 2
    replaced = enroller.enroll("erin", new, replace=True)
    assert replaced.template_count == 1

    assert gateway.match("erin", new).match is True
    assert gateway.match("erin", old1).match is False
    assert gateway.match("erin", old2).match is False
    assert [c.subject_id for c in gateway.identify(old1, top_k=5)] == []
    # Replace on a subject that does not exist yet simply enrolls it.
    assert enroller.enroll("frank", old1, replace=True).template_count == 1
    assert gateway.match("frank", old1).match is True
    # And Delete removes the one remaining template of the replaced subject.
    assert enroller.delete("erin") == 1


def test_identify_ranks_closest_first_and_honours_top_k(with_auditor: InProcessDaemon) -> None:
    base, stranger = random_encodings(2, seed=11)
    # Three subjects around one point at different distances, and one far away.
    people = {
        "near": nearby(base, 0.10, seed=12),
        "mid": nearby(base, 0.25, seed=13),
        "edge": nearby(base, 0.40, seed=14),
        "far": stranger,
    }
    enroller = with_auditor.client("enroller")
    for subject, encoding in people.items():
        enroller.enroll(subject, encoding)
    want = sorted(
        ((s, euclidean(e, base)) for s, e in people.items() if euclidean(e, base) <= 0.6),
        key=lambda item: item[1],
    )
    assert [s for s, _ in want] == ["near", "mid", "edge"]

    auditor = with_auditor.client("auditor")
    got = auditor.identify(base, top_k=10)
    assert [(c.subject_id, c.distance) for c in got] == [(s, round(d, 3)) for s, d in want]
    assert [c.subject_id for c in auditor.identify(base, top_k=2)] == ["near", "mid"]
    # The gateway sees the same ranking, without distances.
    gateway = with_auditor.client("gateway")
    assert [(c.subject_id, c.distance) for c in gateway.identify(base, top_k=10)] == [(s, None) for s, _ in want]


def test_enrollments_survive_a_restart(harness: InProcessDaemon) -> None:
    encodings = random_encodings(5, seed=15)
    harness.start()
    enroller = harness.client("enroller")
    for i, e in enumerate(encodings):
        enroller.enroll(f"subject-{i}", e)
    enroller.delete("subject-4")

    harness.restart()
    gateway = harness.client("gateway")
    for i in range(4):
        assert gateway.match(f"subject-{i}", encodings[i]).match is True
        assert gateway.match(f"subject-{i}", encodings[(i + 1) % 4]).match is False
    with pytest.raises(NotFoundError):
        gateway.match("subject-4", encodings[4])
