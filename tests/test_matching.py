"""Distances, the in-memory gallery and request validation: the answers Match and Identify give.

Every expected answer here comes from a plain numpy reference written in this file, never from
the code under test: identify must return what a brute-force search over every template would.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from faceseal.server import validation
from faceseal.server.config import GalleryConfig
from faceseal.server.errors import IntegrityError, InvalidArgument, NotFound
from faceseal.server.gallery import memory
from faceseal.server.gallery.memory import Gallery
from faceseal.server.matching import distance

METRICS = ["euclidean", "cosine"]


def _ref_distance(row: np.ndarray, probe: np.ndarray, metric: str) -> float:
    """The definition, one pair at a time, in float64."""
    a, p = row.astype(np.float64), probe.astype(np.float64)
    if metric == "euclidean":
        return float(np.sqrt(np.sum((a - p) ** 2)))
    return float(1.0 - np.dot(a, p) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(p, p))))


# -- distance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", range(5))
def test_exact_distance_matches_numpy(metric: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 513))
    rows = (rng.standard_normal((40, dim)) * rng.uniform(0.01, 10)).astype(np.float32)
    probe = rng.standard_normal(dim).astype(np.float32)
    got = distance.exact(rows, probe, metric)  # type: ignore[arg-type]
    assert got.dtype == np.float64
    want = np.array([_ref_distance(r, probe, metric) for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_cosine_distance_landmarks() -> None:
    p = np.array([3.0, 4.0, 0.0], dtype=np.float32)
    rows = np.array([[6, 8, 0], [-3, -4, 0], [0, 0, 5], [4, -3, 0]], dtype=np.float32)
    np.testing.assert_allclose(distance.exact(rows, p, "cosine"), [0.0, 2.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(distance.exact(rows, p, "euclidean"), [5.0, 10.0, np.sqrt(50), np.sqrt(50)])


@pytest.mark.parametrize("metric", METRICS)
def test_approximate_score_orders_rows_like_the_exact_distance(metric: str) -> None:
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((300, 64)).astype(np.float32)
    probe = rng.standard_normal(64).astype(np.float32)
    sq = np.einsum("ij,ij->i", rows, rows).astype(np.float32)
    approx = distance.approximate(rows, sq, probe, metric)  # type: ignore[arg-type]
    exact = np.array([_ref_distance(r, probe, metric) for r in rows])
    assert list(np.argsort(approx, kind="stable")) == list(np.argsort(exact, kind="stable"))


@pytest.mark.parametrize("k", [1, 5, 49, 50, 51, 500])
def test_shortlist_is_the_k_smallest(k: int) -> None:
    scores = np.random.default_rng(k).permutation(50).astype(np.float32)
    got = distance.shortlist(scores, k)
    assert sorted(got.tolist()) == sorted(np.argsort(scores)[: min(k, 50)].tolist())


@pytest.mark.parametrize("k", [1, 18, 200, 5000])
@pytest.mark.parametrize("layout", ["random", "sorted", "reversed", "few_distinct", "k_tied_minimum"])
def test_shortlist_of_a_large_gallery_is_exactly_the_k_smallest(k: int, layout: str) -> None:
    # Large enough for the sampled cut-off; layouts where an even sample misjudges the rank
    # (sorted runs, heavy ties, exactly k equal minima) must still give the exact k smallest.
    n = 70_000
    rng = np.random.default_rng(k)
    scores = rng.standard_normal(n).astype(np.float32)
    if layout == "sorted":
        scores.sort()
    elif layout == "reversed":
        scores[::-1].sort()
    elif layout == "few_distinct":
        scores = rng.integers(0, 3, n).astype(np.float32)
    elif layout == "k_tied_minimum":
        scores[rng.choice(n, k, replace=False)] = -10.0
    got = distance.shortlist(scores, k)
    assert got.shape == (k,)
    assert len(set(got.tolist())) == k
    kth = np.partition(scores, k - 1)[k - 1]
    assert float(scores[got].max()) == float(kth)  # the k smallest values (ties broken any way)
    assert set(np.flatnonzero(scores < kth).tolist()) <= set(got.tolist())  # every strictly smaller one


# -- the gallery ----------------------------------------------------------------------------------


def _cfg(metric: str = "euclidean", dim: int = 4, threshold: float = 0.6) -> GalleryConfig:
    return GalleryConfig(name="g", dimension=dim, metric=metric, threshold=threshold)  # type: ignore[arg-type]


def _ref(sid: str) -> bytes:
    return b"ref:" + sid.encode()


def test_match_takes_the_smallest_distance_over_a_subjects_templates() -> None:
    g = Gallery(_cfg())
    probe = np.array([1, 0, 0, 0], dtype=np.float32)
    # Offsets along orthogonal axes: euclidean distances 0.5, 0.25 and 0.75 from the probe.
    for i, (axis, length) in enumerate([(1, 0.5), (2, 0.25), (3, 0.75)]):
        t = probe.copy()
        t[axis] += length
        g.add("alice", f"t{i}", t, subject_ref=_ref("alice"))
    g.add(
        "bob", "tb", probe, subject_ref=_ref("bob")
    )  # a perfect match for someone else must not leak into alice's answer
    assert g.match("alice", _ref("alice"), probe) == pytest.approx(0.25, abs=1e-7)
    assert g.match("bob", _ref("bob"), probe) == 0.0
    assert g.template_count("alice") == 3
    assert g.size() == (2, 4)


def test_match_unknown_subject_is_not_found() -> None:
    g = Gallery(_cfg())
    g.add("alice", "t", np.ones(4, dtype=np.float32), subject_ref=_ref("alice"))
    with pytest.raises(NotFound):
        g.match("bob", _ref("bob"), np.ones(4, dtype=np.float32))


def test_remove_then_match_is_not_found_and_others_survive_the_row_swap() -> None:
    rng = np.random.default_rng(3)
    g = Gallery(_cfg(dim=8), capacity=2)  # small, so the matrix grows as well
    templates = {f"s{i}": [rng.standard_normal(8).astype(np.float32) for _ in range(i % 3 + 1)] for i in range(6)}
    for sid, ts in templates.items():
        for j, t in enumerate(ts):
            g.add(sid, f"{sid}-{j}", t, subject_ref=_ref(sid))
    g.remove("s1", _ref("s1"))  # rows in the middle: the last rows move into the holes
    g.remove("s0", _ref("s0"))
    for sid in ("s0", "s1"):
        with pytest.raises(NotFound):
            g.match(sid, _ref(sid), templates[sid][0])
        assert g.template_count(sid) == 0
    for sid in ("s2", "s3", "s4", "s5"):
        for t in templates[sid]:
            assert g.match(sid, _ref(sid), t) == 0.0, sid
    remaining = {k: v for k, v in templates.items() if k not in ("s0", "s1")}
    assert g.size() == (len(remaining), sum(len(v) for v in remaining.values()))
    assert all(h.subject_id not in ("s0", "s1") for h in g.identify(templates["s0"][0], top_k=10))


def test_add_with_replace_drops_the_old_templates() -> None:
    g = Gallery(_cfg())
    old = np.array([1, 0, 0, 0], dtype=np.float32)
    new = np.array([0, 1, 0, 0], dtype=np.float32)
    g.add("alice", "t1", old, subject_ref=_ref("alice"))
    g.add("alice", "t2", old, subject_ref=_ref("alice"))
    g.add("alice", "t3", new, replace=True, subject_ref=_ref("alice"))
    assert g.template_count("alice") == 1
    assert g.match("alice", _ref("alice"), new) == 0.0
    assert g.match("alice", _ref("alice"), old) == pytest.approx(np.sqrt(2))


def test_poisoned_subject_answers_integrity_error_until_removed() -> None:
    g = Gallery(_cfg())
    t = np.ones(4, dtype=np.float32)
    g.add("alice", "t1", t, subject_ref=_ref("alice"))  # one template opened, another failed: still poisoned
    g.poison(_ref("alice"))
    g.poison(_ref("ghost"))  # every row failed: no templates at all
    with pytest.raises(IntegrityError):
        g.match("alice", _ref("alice"), t)
    with pytest.raises(IntegrityError):
        g.match("ghost", _ref("ghost"), t)
    g.add("bob", "tb", t, subject_ref=_ref("bob"))
    assert g.match("bob", _ref("bob"), t) == 0.0  # the alarm is per subject
    g.remove("alice", _ref("alice"))
    with pytest.raises(NotFound):
        g.match("alice", _ref("alice"), t)
    g.clear_poison(_ref("ghost"))
    with pytest.raises(NotFound):
        g.match("ghost", _ref("ghost"), t)


def test_identify_on_an_empty_gallery_is_empty() -> None:
    assert Gallery(_cfg()).identify(np.ones(4, dtype=np.float32), top_k=5) == []


def _brute_force(
    subjects: dict[str, list[np.ndarray]], probe: np.ndarray, metric: str, threshold: float, top_k: int
) -> list[tuple[str, float]]:
    best = {sid: min(_ref_distance(t, probe, metric) for t in ts) for sid, ts in subjects.items() if ts}
    within = sorted(((d, sid) for sid, d in best.items() if d <= threshold))
    return [(sid, d) for d, sid in within[:top_k]]


def _check_identify(
    g: Gallery, subjects: dict[str, list[np.ndarray]], probe: np.ndarray, top_k: int, context: str
) -> None:
    got = g.identify(probe, top_k)
    want = _brute_force(subjects, probe, g.config.metric, g.config.threshold, top_k)
    assert [h.subject_id for h in got] == [sid for sid, _ in want], context
    np.testing.assert_allclose([h.distance for h in got], [d for _, d in want], rtol=1e-9, err_msg=context)
    assert all(h.distance <= g.config.threshold for h in got)
    assert [h.distance for h in got] == sorted(h.distance for h in got)
    # A batch of one answers the same, to the bit.
    assert g.identify_many(probe[np.newaxis, :], top_k) == [got], context


@pytest.mark.parametrize("metric", METRICS)
def test_identify_equals_brute_force_on_random_galleries(metric: str) -> None:
    rng = np.random.default_rng(2024)
    for trial in range(12):
        dim = int(rng.integers(3, 40))
        n_subjects = int(rng.integers(1, 80))
        centres = rng.standard_normal((n_subjects, dim))
        subjects: dict[str, list[np.ndarray]] = {}
        rows = []
        for i in range(n_subjects):
            sid = f"s{i:03d}"
            count = int(rng.integers(1, 6))
            subjects[sid] = [(centres[i] + 0.3 * rng.standard_normal(dim)).astype(np.float32) for _ in range(count)]
            rows += subjects[sid]
        probes = [
            (centres[int(rng.integers(n_subjects))] + 0.2 * rng.standard_normal(dim)).astype(np.float32)
            for _ in range(4)
        ]
        probes.append(rng.standard_normal(dim).astype(np.float32))
        # A threshold at a quantile of all distances, so some but not all templates are within it.
        all_d = [_ref_distance(r, probes[0], metric) for r in rows]
        threshold = float(np.quantile(all_d, rng.uniform(0.05, 0.9)))
        g = Gallery(_cfg(metric, dim, threshold), capacity=int(rng.integers(1, 64)))
        order = [(sid, j) for sid, ts in subjects.items() for j in range(len(ts))]
        rng.shuffle(order)  # interleave subjects' rows, so removals swap rows of other subjects
        for sid, j in order:
            g.add(sid, f"{sid}-{j}", subjects[sid][j], subject_ref=_ref(sid))
        for top_k in (1, 3, 10, 100):
            for p, probe in enumerate(probes):
                _check_identify(g, subjects, probe, top_k, f"trial {trial} top_k {top_k} probe {p}")
        # Remove a third of the subjects and replace a few others, then ask again.
        for sid in list(subjects)[::3]:
            g.remove(sid, _ref(sid))
            del subjects[sid]
        for sid in list(subjects)[1::4]:
            fresh = (centres[int(sid[1:])] + 0.3 * rng.standard_normal(dim)).astype(np.float32)
            g.add(sid, f"{sid}-new", fresh, replace=True, subject_ref=_ref(sid))
            subjects[sid] = [fresh]
        for top_k in (1, 5, 100):
            for p, probe in enumerate(probes):
                _check_identify(g, subjects, probe, top_k, f"trial {trial} after removals top_k {top_k} probe {p}")


@pytest.mark.parametrize("metric", METRICS)
def test_identify_finds_other_subjects_behind_one_with_many_close_templates(metric: str) -> None:
    """One subject owning the whole short list must not hide the runners-up."""
    rng = np.random.default_rng(5)
    dim = 32
    probe = rng.standard_normal(dim).astype(np.float32)
    subjects: dict[str, list[np.ndarray]] = {
        "crowd": [(probe + 0.01 * rng.standard_normal(dim)).astype(np.float32) for _ in range(200)]
    }
    for i in range(30):
        subjects[f"other{i:02d}"] = [(probe + (0.05 + 0.01 * i) * rng.standard_normal(dim)).astype(np.float32)]
    for i in range(300):
        subjects[f"far{i:03d}"] = [rng.standard_normal(dim).astype(np.float32) * 3]
    threshold = max(_ref_distance(subjects["other29"][0], probe, metric) * 1.01, 1e-6)
    g = Gallery(_cfg(metric, dim, threshold))
    for sid, ts in subjects.items():
        for j, t in enumerate(ts):
            g.add(sid, f"{sid}-{j}", t, subject_ref=_ref(sid))
    for top_k in (1, 2, 5, 20, 31, 50):
        _check_identify(g, subjects, probe, top_k, f"top_k {top_k}")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("block_rows", [1, 17, None])
def test_identify_many_answers_every_probe_as_brute_force(
    metric: str, block_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the rows the score block allows at once (the fewest, a few, all), each probe
    gets what a brute-force search gives it; several templates per subject and a poisoned
    subject included."""
    rng = np.random.default_rng(77)
    dim, n_subjects = 24, 60
    centres = rng.standard_normal((n_subjects, dim))
    subjects = {
        f"s{i:02d}": [(centres[i] + 0.3 * rng.standard_normal(dim)).astype(np.float32) for _ in range(1 + i % 4)]
        for i in range(n_subjects)
    }
    probes = np.stack(
        [(centres[int(rng.integers(n_subjects))] + 0.2 * rng.standard_normal(dim)).astype(np.float32) for _ in range(7)]
        + [rng.standard_normal(dim).astype(np.float32)]
    )
    rows = [t for ts in subjects.values() for t in ts]
    threshold = float(np.quantile([_ref_distance(r, probes[0], metric) for r in rows], 0.3))
    g = Gallery(_cfg(metric, dim, threshold))
    for sid, ts in subjects.items():
        for j, t in enumerate(ts):
            g.add(sid, f"{sid}-{j}", t, subject_ref=_ref(sid))
    g.poison(_ref("s05"))
    del subjects["s05"]
    if block_rows is not None:
        monkeypatch.setattr(memory, "_SCORE_BLOCK_BYTES", 4 * len(probes) * block_rows)
    for top_k in (1, 4, 100):
        got = g.identify_many(probes, top_k)
        assert len(got) == len(probes)
        for p, (probe, hits) in enumerate(zip(probes, got, strict=True)):
            want = _brute_force(subjects, probe, metric, threshold, top_k)
            assert [h.subject_id for h in hits] == [sid for sid, _ in want], f"top_k {top_k} probe {p}"
            np.testing.assert_allclose([h.distance for h in hits], [d for _, d in want], rtol=1e-9)
            assert hits == g.identify(probe, top_k)


def test_identify_many_starts_again_when_rows_move_between_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is let go between blocks; a removal then moves rows, and row numbers taken
    before it would name other templates. The batch must notice and answer from the new layout."""
    rng = np.random.default_rng(78)
    dim = 8
    subjects = {f"s{i:02d}": [rng.standard_normal(dim).astype(np.float32)] for i in range(40)}
    g = Gallery(_cfg("euclidean", dim, 2.5))
    for sid, ts in subjects.items():
        g.add(sid, f"{sid}-0", ts[0], subject_ref=_ref(sid))
    probes = np.stack([subjects["s39"][0] + 0.01, subjects["s03"][0] + 0.01])
    monkeypatch.setattr(memory, "_SCORE_BLOCK_BYTES", 4 * len(probes) * 10)  # blocks of 10 rows
    calls = {"blocks": 0, "removed": False}
    real_many, real_shortlist = distance.approximate_many, distance.shortlist

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls["blocks"] += 1
        return real_many(*args, **kwargs)  # type: ignore[arg-type]

    def removing(scores: np.ndarray, k: int) -> np.ndarray:
        if not calls["removed"]:  # after the first block, outside the lock: s05 goes, s39 moves
            calls["removed"] = True
            g.remove("s05", _ref("s05"))
            del subjects["s05"]
        return real_shortlist(scores, k)

    monkeypatch.setattr(memory.distance, "approximate_many", counting)
    monkeypatch.setattr(memory.distance, "shortlist", removing)
    got = g.identify_many(probes, 1)  # a short list of 10: blocks of 10 rows
    assert calls["blocks"] == 1 + 4, "one block of the first attempt, then all four again"
    for probe, hits in zip(probes, got, strict=True):
        want = _brute_force(subjects, probe, "euclidean", 2.5, 1)
        assert [h.subject_id for h in hits] == [sid for sid, _ in want]
        np.testing.assert_allclose([h.distance for h in hits], [d for _, d in want], rtol=1e-9)


def test_identify_many_on_an_empty_gallery_answers_each_probe_empty() -> None:
    assert Gallery(_cfg()).identify_many(np.ones((3, 4), dtype=np.float32), top_k=5) == [[], [], []]


def test_identify_ties_are_deterministic() -> None:
    g = Gallery(_cfg(dim=2, threshold=2.0))
    probe = np.array([0, 0.5], dtype=np.float32)
    for sid in ("c", "a", "b"):
        g.add(sid, sid, np.array([1, 0.5], dtype=np.float32), subject_ref=_ref(sid))
    assert [h.subject_id for h in g.identify(probe, top_k=2)] == ["a", "b"]


# -- validation -----------------------------------------------------------------------------------

# Values distinctive enough that a message echoing them would show it.
SECRETISH = 0.7316259


def _no_echo(message: str, *values: object) -> None:
    for v in values:
        assert str(v) not in message, message
        assert repr(v) not in message, message


def test_vector_accepts_a_good_vector() -> None:
    values = [SECRETISH, -1.5, 0.0, 2.25]
    arr = validation.vector(values, 4, "probe")
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, np.array(values, dtype=np.float32))


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([SECRETISH] * 3, id="short"),
        pytest.param([SECRETISH] * 5, id="long"),
        pytest.param([], id="empty"),
        pytest.param([SECRETISH, float("nan"), 1.0, 1.0], id="nan"),
        pytest.param([SECRETISH, 1.0, 1.0, float("inf")], id="+inf"),
        pytest.param([float("-inf"), SECRETISH, 1.0, 1.0], id="-inf"),
        pytest.param([0.0, 0.0, 0.0, 0.0], id="zeros"),
        pytest.param([-0.0, 0.0, -0.0, 0.0], id="signed-zeros"),
    ],
)
def test_vector_rejects_without_echoing(values: list[float]) -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.vector(values, 4, "probe")
    message = str(info.value)
    assert "probe" in message  # says which field
    _no_echo(message, SECRETISH, np.float32(SECRETISH), "0.731", "[")


@pytest.mark.parametrize("value", ["a", "A-z_0.9:@", "user@example.org", "E-0042:badge.7", "x" * 128])
def test_subject_id_accepts(value: str) -> None:
    assert validation.subject_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 129,
        "é",
        "zoë",
        "\uff46\uff55\uff4c\uff4c",  # fullwidth "full"
        "١٢٣",
        "a b",
        "x'; DROP TABLE templates; --",
        "a\n",
        "\na",
        "a\x00b",
        "a/b",
        "a\\b",
        "a,b",
        "${jndi:ldap://x}",
        "*",
    ],
)
def test_subject_id_rejects_without_echoing(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.subject_id(value)
    message = str(info.value)
    for fragment in (value.strip(), "DROP", "jndi", "zoë"):
        if fragment and len(fragment) > 1:
            assert fragment not in message, message


@pytest.mark.parametrize("value", ["", "-faces", "a b", "x" * 65, "fäces", "faces/../x"])
def test_gallery_name_rejects(value: str) -> None:
    with pytest.raises(InvalidArgument):
        validation.gallery_name(value)


@pytest.mark.parametrize(
    ("value", "ok"), [(0, False), (-1, False), (1, True), (100, True), (101, False), (987654, False)]
)
def test_top_k_bounds(value: int, ok: bool) -> None:
    if ok:
        assert validation.top_k(value, 100) == value
        return
    with pytest.raises(InvalidArgument) as info:
        validation.top_k(value, 100)
    if abs(value) > 1:
        assert str(value) not in str(info.value)


def test_every_subject_id_character_class_boundary() -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-")
    for code in itertools.chain(range(0, 0x180), [0x2024, 0xFF0E, 0x1D7CE]):
        ch = chr(code)
        if ch in allowed:
            assert validation.subject_id(ch) == ch
        else:
            with pytest.raises(InvalidArgument):
                validation.subject_id(ch)


def test_identify_never_returns_a_poisoned_subject() -> None:
    g = Gallery(GalleryConfig("g", 2, "euclidean", 0.5))
    t = np.array([1.0, 0.0], dtype=np.float32)
    g.add("alice", "t1", t, subject_ref=_ref("alice"))
    g.add("bob", "t2", t + 0.01, subject_ref=_ref("bob"))
    g.poison(_ref("alice"))  # another row of alice's failed to open at unseal
    assert [h.subject_id for h in g.identify(t, 5)] == ["bob"]


# -- the gallery's bookkeeping ---------------------------------------------------------------------


def _hex_id(i: int) -> str:
    return f"{i:032x}"  # the daemon's form (32 lowercase hex digits), kept as 16 bytes


def test_remove_moves_the_last_rows_of_multi_template_subjects_into_the_holes() -> None:
    rng = np.random.default_rng(8)
    g = Gallery(_cfg(dim=6), capacity=3)
    # Interleaved: removing "a" (rows 0, 2, 5) moves rows of "b" and "c" (each with several
    # templates, one of them the last row) into the holes.
    order = ["a", "b", "a", "c", "b", "a", "c", "b", "c"]
    templates: dict[str, list[np.ndarray]] = {}
    for i, sid in enumerate(order):
        t = rng.standard_normal(6).astype(np.float32)
        templates.setdefault(sid, []).append(t)
        g.add(sid, _hex_id(i) if i % 2 else f"odd-{i}", t, subject_ref=_ref(sid))
    g.remove("a", _ref("a"))
    assert g.size() == (2, 6)
    for sid in ("b", "c"):
        assert g.template_count(sid) == 3
        assert g.template_count(sid, _ref(sid)) == 3
        for t in templates[sid]:
            assert g.match(sid, _ref(sid), t) == 0.0
        got = {h.subject_id: h.distance for h in g.identify(templates[sid][1], top_k=5)}
        assert got[sid] == 0.0
    assert g.template_count("a") == 0
    # Removing the rest one subject at a time leaves an empty gallery that still works.
    g.remove_ref(_ref("c"))
    assert g.size() == (1, 3)
    assert g.match("b", _ref("b"), templates["b"][2]) == 0.0
    g.remove("b", _ref("b"))
    assert g.size() == (0, 0)
    assert g.identify(templates["b"][0], top_k=3) == []
    g.add("b", "again", templates["b"][0], subject_ref=_ref("b"))
    assert g.match("b", _ref("b"), templates["b"][0]) == 0.0


@pytest.mark.parametrize("bulk", [False, True])
def test_has_template_follows_adds_and_removes(bulk: bool) -> None:
    g = Gallery(_cfg(), capacity=1)
    ids = [_hex_id(i) for i in range(100)] + [f"t{i}" for i in range(100)]
    assert _hex_id(0xAB) not in ids
    vectors = np.ones((len(ids), 4), dtype=np.float32)
    entries = [(f"s{i % 70}", tid, _ref(f"s{i % 70}")) for i, tid in enumerate(ids)]
    if bulk:  # the unseal path: the index is rebuilt on the first lookup
        g.add_many(entries, vectors)
    else:
        for (sid, tid, ref), v in zip(entries, vectors, strict=True):
            g.add(sid, tid, v, subject_ref=ref)
    assert all(g.has_template(t) for t in ids)
    assert not g.has_template(_hex_id(100))
    assert not g.has_template(_hex_id(0xAB).upper())  # ids are compared as given, not as numbers
    assert not g.has_template("t100")
    assert g.size() == (70, 200)
    g.remove("s5", _ref("s5"))  # rows 5, 75, 145
    gone = {ids[5], ids[75], ids[145]}
    assert [t for t in ids if not g.has_template(t)] == sorted(gone, key=ids.index)
    g.add("s5", ids[75], vectors[0], subject_ref=_ref("s5"))  # re-enrolled under an old id
    assert g.has_template(ids[75])
    assert not g.has_template(ids[5])
    g.add("s6", "fresh", vectors[0], subject_ref=_ref("s6"), replace=True)
    assert not any(g.has_template(ids[i]) for i in (6, 76, 146))
    assert g.has_template("fresh")
    assert g.template_count("s6", _ref("s6")) == 1


def test_many_single_removals_keep_ids_and_index_consistent() -> None:
    """Enough removals to compact the subject-id arena and re-sort the template index."""
    rng = np.random.default_rng(12)
    g = Gallery(_cfg(dim=3))
    n = 3000
    vectors = rng.standard_normal((n, 3)).astype(np.float32)
    sids = [f"subject-{i:06d}-{'x' * (i % 40)}" for i in range(n)]
    g.add_many([(sids[i], _hex_id(i), _ref(sids[i])) for i in range(n)], vectors)
    removed = set(rng.choice(n, size=2200, replace=False).tolist())
    for i in sorted(removed):
        g.remove(sids[i], _ref(sids[i]))
        g.add(sids[i] if i % 7 == 0 else sids[i] + "-back", f"back-{i}", vectors[i], subject_ref=_ref(sids[i]))
    for i in range(n):
        sid = sids[i] if i not in removed or i % 7 == 0 else sids[i] + "-back"
        assert g.has_template(_hex_id(i)) == (i not in removed)
        assert g.has_template(f"back-{i}") == (i in removed)
        assert g.match(sid, _ref(sids[i]), vectors[i]) == 0.0
        hits = g.identify(vectors[i], top_k=1)
        assert (hits[0].distance, hits[0].subject_id) == (0.0, sid)


def test_poison_hides_a_subject_from_identify_and_survives_its_rows_moving() -> None:
    g = Gallery(_cfg(dim=2, threshold=5.0))
    a, b, c = (np.array(v, dtype=np.float32) for v in ([1, 0], [0, 1], [1, 1]))
    g.add("a", "ta", a, subject_ref=_ref("a"))
    g.add("b", "tb", b, subject_ref=_ref("b"))
    g.add("c", "tc", c, subject_ref=_ref("c"))
    g.poison(_ref("c"))
    g.remove("a", _ref("a"))  # c's row moves into a's slot; it stays poisoned
    assert [h.subject_id for h in g.identify(c, top_k=3)] == ["b"]
    with pytest.raises(IntegrityError):
        g.match("c", _ref("c"), c)
    g.clear_poison(_ref("c"))
    assert g.match("c", _ref("c"), c) == 0.0
    assert {h.subject_id for h in g.identify(c, top_k=3)} == {"b", "c"}


def test_capacity_hint_and_growth() -> None:
    g = Gallery(_cfg(dim=2), capacity=10)
    v = np.ones((10, 2), dtype=np.float32)
    g.add_many([(f"s{i}", f"t{i}", _ref(f"s{i}")) for i in range(10)], v)
    g.add("late", "tl", np.array([2, 2], dtype=np.float32), subject_ref=_ref("late"))  # grows past the hint
    assert g.size() == (11, 11)
    assert g.match("late", _ref("late"), np.array([2, 2], dtype=np.float32)) == 0.0
    assert g.match("s9", _ref("s9"), v[0]) == 0.0


def test_hit_repr_names_no_subject_and_no_distance() -> None:
    g = Gallery(_cfg())
    g.add("alice-secret-id", "t", np.full(4, 0.5, dtype=np.float32), subject_ref=_ref("alice"))
    (hit,) = g.identify(np.full(4, 0.25, dtype=np.float32), top_k=1)
    assert "alice" not in repr(hit)
    assert f"{hit.distance:.2f}" not in repr(hit)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_one_is_bit_for_bit_exact(metric: str) -> None:
    rng = np.random.default_rng(21)
    for _ in range(200):
        rows = (rng.standard_normal((3, 128)) * rng.uniform(0.01, 100)).astype(np.float32)
        probe = rng.standard_normal(128).astype(np.float32)
        got = [distance.exact_one(r, probe, metric) for r in rows]  # type: ignore[arg-type]
        assert got == [float(distance.exact(r[np.newaxis], probe, metric)[0]) for r in rows]  # type: ignore[arg-type]
        if metric == "euclidean":  # and the same as the batch that Identify re-scores
            assert got == distance.exact(rows, probe, metric).tolist()


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([1e300, 1.0, 1.0, 1.0], id="beyond-float32"),
        pytest.param([-3.5e38, 1.0, 1.0, 1.0], id="just-beyond-float32"),
        pytest.param([1e-50, 0.0, 0.0, 0.0], id="underflows-to-zero"),
        pytest.param([1e-11, 0.0, 0.0, 0.0], id="too-short"),
        pytest.param([1e10, 1e9, 0.0, 0.0], id="too-long"),
    ],
)
def test_vector_rejects_edge_values_without_a_warning(values: list[float]) -> None:
    # Tests run with warnings as errors: a numpy overflow warning would surface as a failure here.
    with pytest.raises(InvalidArgument):
        validation.vector(values, 4, "probe")


def test_vector_accepts_the_extremes_of_the_norm_range() -> None:
    for values in ([1e-10, 0.0, 0.0, 0.0], [1e10, 0.0, 0.0, 0.0], [3e9, 3e9, -3e9, 3e9]):
        assert validation.vector(values, 4, "probe").dtype == np.float32
