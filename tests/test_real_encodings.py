"""The daemon's decisions on 140 real dlib encodings agree with numpy, pair by pair.

Every encoding is enrolled as its own subject (its index as id); for every unordered pair the
daemon's Match decision and its disclosed distance are compared with a float64 numpy distance
at the gallery's 0.6 threshold. The data are biometric: nothing here prints a vector.

The identify check runs once per seal (file, PKCS#11, Transit), after a restart, so all 140
templates are re-opened through that seal's keyring. The pair-by-pair check (~10,000 Match
calls, the slowest test here) runs on the file seal only: no seal is on the Match path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np
import pytest
from helpers import InProcessDaemon, load_real_encodings
from seals import EACH_SEAL

THRESHOLD = 0.6
CLIENTS = 8


def _distance(e: np.ndarray, i: int, j: int) -> float:
    return float(np.linalg.norm(e[i].astype(np.float64) - e[j].astype(np.float64)))


@pytest.fixture
def loaded(harness: InProcessDaemon) -> tuple[InProcessDaemon, np.ndarray]:
    encodings, _ = load_real_encodings()
    harness.dev.edit_caller("gateway", disclosure="distance")
    harness.dev.set_server(max_top_k=200)
    # ~10,000 impostor questions on purpose: the abuse guard (tests/test_guard.py) would rightly
    # lock them out, so this numerical check runs with it off.
    harness.dev.edit_config(lambda c: c.setdefault("guard", {}).update(enabled=False))
    harness.start()
    enroller = harness.client("enroller")
    for i, encoding in enumerate(encodings):
        assert enroller.enroll(str(i), encoding).template_count == 1
    return harness, encodings


def test_every_pair_agrees_with_numpy(loaded: tuple[InProcessDaemon, np.ndarray]) -> None:
    harness, e = loaded
    pairs = list(combinations(range(len(e)), 2))
    clients = [harness.client("gateway", timeout=30) for _ in range(CLIENTS)]

    def run(worker: int) -> list[tuple[int, int, bool, float | None]]:
        client = clients[worker]
        return [(i, j, r.match, r.distance) for i, j in pairs[worker::CLIENTS] for r in [client.match(str(j), e[i])]]

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [row for rows in pool.map(run, range(CLIENTS)) for row in rows]
    assert len(results) == len(pairs) == 140 * 139 // 2

    wrong_decision, wrong_distance, matches = [], [], 0
    for i, j, match, distance in results:
        d = _distance(e, i, j)
        matches += match
        if match != (d <= THRESHOLD):
            wrong_decision.append((i, j))
        if distance != round(d, 3):
            wrong_distance.append((i, j))
    assert not wrong_decision, f"{len(wrong_decision)} decisions differ from numpy, e.g. {wrong_decision[:5]}"
    assert not wrong_distance, f"{len(wrong_distance)} distances differ from numpy, e.g. {wrong_distance[:5]}"
    # Both answers occur often (the data README: 459 genuine pairs, most of them within 0.6).
    assert 300 < matches < len(pairs) - 5000


@EACH_SEAL
def test_identify_returns_numpys_within_threshold_set(loaded: tuple[InProcessDaemon, np.ndarray]) -> None:
    harness, e = loaded
    harness.restart()  # every template re-opened through the seal's keyring
    gateway = harness.client("gateway")
    all_d = np.linalg.norm(e.astype(np.float64)[:, None, :] - e.astype(np.float64)[None, :, :], axis=2)
    neighbours = (all_d <= THRESHOLD).sum(axis=1)
    probes = sorted({0, 33, 77, 139, int(neighbours.argmax()), int(neighbours.argmin())})
    assert neighbours.max() > 5  # some probe has several candidates, so order matters

    for i in probes:
        within = [j for j in range(len(e)) if _distance(e, i, j) <= THRESHOLD]
        want = {str(j): round(_distance(e, i, j), 3) for j in within}
        got = gateway.identify(e[i], top_k=140)
        assert {c.subject_id: c.distance for c in got} == want, f"probe {i}"
        assert len(got) == len(want), f"probe {i}: a subject listed twice"
        distances = [c.distance for c in got if c.distance is not None]
        assert len(distances) == len(got), f"probe {i}: a distance is missing"
        assert distances == sorted(distances), f"probe {i}: not closest first"
        assert got[0].subject_id == str(i)  # itself, at distance 0

        # A small top_k takes the shortlist path; it must return the head of the same ranking.
        head = gateway.identify(e[i], top_k=3)
        assert [c.distance for c in head] == distances[:3], f"probe {i}"
        assert {c.subject_id for c in head} <= set(want)
