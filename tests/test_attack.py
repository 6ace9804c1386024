"""Hill-climbing attacks against a real daemon: the attackers of bench/attack.py, real encodings.

(a) A caller shown distances, guard off: the attacker rebuilds a matching probe from a random
    start: finite differences in dim + 2 queries, a stochastic hill climb in a few hundred.
    (And the guard, on, stops that same attacker after a handful of answers.)
(b) DESIGN.md's defaults (decision-only caller, guard on): a decision-only hill climber with
    10,000 queries gets no match; the subject locks after the configured 5 failures, and the
    lockouts show in faceseal_guard_rejections_total and in the audit log.
(c) The same budget spread over 25 subjects (one real encoding per person): no match; the caller's
    failed-match budget and the subject lockouts refuse it.

Refused calls are cheap: 10,000 queries take 15-40 s here. Each attack also stops at TIME_LIMIT,
so a loaded machine cannot stretch a test past a minute; an attack stopped that way must still
have made MIN_QUERIES per BUDGET queries (the summary shows the count). An answer the daemon gave
after the attacker's DEADLINE has passed is one the attacker never sees: the answers are counted
on the daemon too (faceseal_match_decisions_total), and the attacker's own count may fall short of
it by its deadline-expired calls. The query counts are printed in pytest's terminal summary. No
encoding is ever printed.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers import DIM, GuardClock, InProcessDaemon, load_real_encodings

from faceseal.server.config import GuardConfig

ATTACK_FILE = Path(__file__).resolve().parents[1] / "bench" / "attack.py"
BUDGET = 10_000
TIME_LIMIT = 55.0  # seconds per attack
MIN_QUERIES = 2_500  # what an attack of BUDGET queries stopped by TIME_LIMIT must still have made
DEADLINE = 2.0  # the attacker's client deadline per call
DEFAULTS = GuardConfig()


def _load_attack() -> ModuleType:
    """bench/attack.py by path: bench/ is not a package, and "attack" is too common a name."""
    spec = importlib.util.spec_from_file_location("faceseal_bench_attack", ATTACK_FILE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


attack = _load_attack()


# ------------------------------------------------------------------------------- the report

_REPORT = "faceseal-attack-report"


class _Report:
    """Lines for pytest's terminal summary (registered as a plugin by the first test that reports)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.write_sep("-", "hill-climbing attacks (bench/attack.py): queries")
            for line in self.lines:
                terminalreporter.write_line(line)


@pytest.fixture
def report(pytestconfig: pytest.Config, record_property: Callable[[str, object], None]) -> Callable[[str, Any], None]:
    plugin = pytestconfig.pluginmanager.get_plugin(_REPORT)
    if plugin is None:
        plugin = _Report()
        pytestconfig.pluginmanager.register(plugin, _REPORT)

    def add(label: str, tally: Any) -> None:
        plugin.lines.append(f"{label}: {tally.summary()}")
        record_property(label, tally.queries if tally.matched_at is None else tally.matched_at)

    return add


# --------------------------------------------------------------------------------- fixtures


class Real:
    """The real encodings as a redacted view (never printed), and one index per person."""

    def __init__(self) -> None:
        enc, labels = load_real_encodings()
        self.enc = enc.view(attack.Redacted)
        self.people = attack.one_per_person(labels)

    def __repr__(self) -> str:
        return "<real encodings, redacted>"


@pytest.fixture(scope="module")
def real() -> Real:
    return Real()


def set_guard(harness: InProcessDaemon, **settings: Any) -> None:
    harness.dev.edit_config(lambda c: c.setdefault("guard", {}).update(settings))


def start(harness: InProcessDaemon, subjects: dict[str, Any]) -> InProcessDaemon:
    harness.start()
    enroller = harness.client("enroller")
    for subject, encoding in subjects.items():
        enroller.enroll(subject, encoding)
    return harness


def oracle(harness: InProcessDaemon, budget: int = BUDGET) -> Any:
    return attack.Oracle(harness.client("gateway"), budget=budget, time_limit=TIME_LIMIT, deadline=DEADLINE)


def ran_the_budget(tally: Any) -> None:
    if tally.timed_out:
        needed = MIN_QUERIES * tally.budget // BUDGET  # a smaller budget: the same share of it
        assert tally.queries >= needed, f"only {tally.queries} queries in {TIME_LIMIT:g} s"
    else:
        assert tally.queries == tally.budget


def server_answers(harness: InProcessDaemon) -> int:
    """The Match calls the daemon answered (faceseal_match_decisions_total, every label)."""
    assert harness.daemon is not None
    return int(
        sum(
            sample.value
            for family in harness.daemon.registry.collect()
            for sample in family.samples
            if sample.name == "faceseal_match_decisions_total"
        )
    )


def saw_the_answers(tally: Any, answers: int) -> None:
    """The attacker saw every answer the daemon gave, bar those that came after its deadline."""
    assert answers - tally.refused.get("deadline", 0) <= tally.answered <= answers


def check_the_records(harness: InProcessDaemon, tally: Any) -> dict[str, int]:
    """Every refusal the attacker saw is in faceseal_guard_rejections_total and in the audit log.

    A call that ran out of its deadline (rare, on a loaded machine) may still have been refused
    on the server: it loosens the counts by one each."""
    assert harness.daemon is not None
    slack = tally.refused.get("deadline", 0)
    metrics = attack.guard_rejections(harness.daemon)
    for scope, calls in tally.refused.items():
        if scope != "deadline":
            assert calls <= metrics[scope] <= calls + slack, f"{scope}: metric {metrics[scope]}, attacker saw {calls}"
    refused = sum(calls for scope, calls in tally.refused.items() if scope != "deadline")
    audit = attack.audit_outcomes(harness.daemon)
    assert refused <= audit.get("RESOURCE_EXHAUSTED", 0) <= refused + slack
    return metrics


# ------------------------------------------------------------------------------------ (a)


def test_a_with_distances_and_no_guard_the_attacker_reaches_a_match(
    harness: InProcessDaemon, real: Real, report: Callable[[str, Any], None]
) -> None:
    harness.dev.edit_caller("gateway", disclosure="distance")
    set_guard(harness, enabled=False)
    start(harness, {"target": real.enc[real.people[0]]})
    rng = np.random.default_rng(2024)

    fd = attack.finite_difference_attack(oracle(harness), "target", attack.random_start(rng))
    report("(a) distance, guard off, finite differences", fd)
    assert fd.matched
    assert fd.matched_at == DIM + 2, "one base distance, one per coordinate, one to present the result"

    climb = attack.distance_hill_climb(oracle(harness), "target", attack.random_start(rng), rng)
    report("(a) distance, guard off, (1+1) hill climb", climb)
    assert climb.matched
    assert climb.matched_at is not None
    assert climb.matched_at <= 3000
    assert not climb.refused


def test_a_the_guard_stops_the_same_distance_attacker(
    harness: InProcessDaemon, real: Real, report: Callable[[str, Any], None]
) -> None:
    harness.dev.edit_caller("gateway", disclosure="distance")
    start(harness, {"target": real.enc[real.people[0]]})
    # The guard's clock follows the wall clock for half a lockout, then stands still: however slow
    # the machine, the whole run falls within the first lockout (here it takes about 3 s).
    GuardClock(harness, runs_for=DEFAULTS.lockout_seconds / 2)
    rng = np.random.default_rng(2024)
    tally = attack.finite_difference_attack(oracle(harness, budget=2000), "target", attack.random_start(rng))
    report("(a) distance, guard on (defaults), finite differences", tally)
    assert not tally.matched
    ran_the_budget(tally)
    answers = server_answers(harness)
    assert answers == DEFAULTS.subject_failures, "it needs 129 distances and gets 5"
    saw_the_answers(tally, answers)
    check_the_records(harness, tally)


# ------------------------------------------------------------------------------------ (b)


def test_b_decision_only_with_the_defaults_gets_no_match_and_is_locked_out(
    harness: InProcessDaemon, real: Real, report: Callable[[str, Any], None]
) -> None:
    start(harness, {"target": real.enc[real.people[0]]})  # DESIGN.md's defaults: no [guard] table
    rng = np.random.default_rng(7)

    tally = attack.decision_hill_climb(oracle(harness), "target", rng)
    report("(b) decision only, defaults, one subject", tally)
    assert not tally.matched
    ran_the_budget(tally)
    # Locked out after exactly the configured number of failures (of which the attacker saw all
    # but any answered after its deadline) ...
    first = tally.answered_at_first_refusal["subject"]
    assert DEFAULTS.subject_failures - tally.refused.get("deadline", 0) <= first <= DEFAULTS.subject_failures
    # ... and, however long the run, only that many answers per lockout (30 s, then 60 s, ...).
    periods = 1 + int(tally.elapsed // DEFAULTS.lockout_seconds)
    answers = server_answers(harness)
    assert answers <= DEFAULTS.subject_failures * periods
    saw_the_answers(tally, answers)
    assert 0 < tally.max_retry_after["subject"] <= DEFAULTS.lockout_seconds * 2 ** (periods - 1)
    metrics = check_the_records(harness, tally)
    assert metrics["subject"] > 0
    assert set(tally.refused) <= {"subject", "caller_rate", "deadline"}


# ------------------------------------------------------------------------------------ (c)


def test_c_spreading_over_many_subjects_gets_no_match_and_is_refused(
    harness: InProcessDaemon, real: Real, report: Callable[[str, Any], None]
) -> None:
    budget = attack.SPREAD_FAILURES_PER_HOUR
    set_guard(harness, caller_failures_per_hour=budget)
    subjects = {f"person-{n:02d}": real.enc[i] for n, i in enumerate(real.people)}
    assert len(subjects) == 25
    start(harness, subjects)
    rng = np.random.default_rng(11)

    tally = attack.spread_decision_attack(oracle(harness), list(subjects), rng)
    report(f"(c) decision only, spread over {len(subjects)} subjects", tally)
    assert not tally.matched
    ran_the_budget(tally)
    # Each subject it worked on locked after the configured failures; the caller's failed-match
    # budget ended the rest: all it ever got was that budget's worth of "no". (A call past the
    # attacker's deadline hides an answer, and sends the attacker on to the next subject early:
    # each may add up to one more subject's worth of answers before the first lockout it sees.)
    first = tally.answered_at_first_refusal["subject"]
    late = tally.refused.get("deadline", 0)
    assert DEFAULTS.subject_failures - late <= first <= DEFAULTS.subject_failures * (1 + late)
    answers = server_answers(harness)
    assert answers == budget
    saw_the_answers(tally, answers)
    assert tally.refused["caller_failures"] > 0
    assert tally.refused["subject"] > 0
    assert tally.max_retry_after["caller_failures"] > 3000
    metrics = check_the_records(harness, tally)
    assert metrics["caller_failures"] > 0
    assert metrics["subject"] > 0
