"""The abuse guard's rules on their own: no daemon, no clock, every ``now`` spelled out.

``LockoutRule`` (per subject): ``failures`` failed matches within ``window`` seconds lock the
subject for ``base`` seconds, each further lockout twice as long, up to ``cap``.
``BudgetRule`` (per caller): at most ``limit`` events per ``window`` seconds, refilled whole.
DESIGN.md's defaults: 5 failures in 60 s, 30 s doubling to 1 h; 1000 failed matches per hour.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from faceseal.server.config import GuardConfig
from faceseal.server.guard.state import BudgetRule, Counter, LockoutRule

T0 = 1_700_000_000.0  # a wall-clock time like time.time()'s: counters start at window_start 0.0
DEFAULTS = GuardConfig()
RULE = LockoutRule(
    DEFAULTS.subject_failures, DEFAULTS.subject_window_seconds, DEFAULTS.lockout_seconds, DEFAULTS.lockout_max_seconds
)


def fail_at(rule: LockoutRule, times: Iterable[float], c: Counter | None = None) -> Counter:
    c = Counter() if c is None else c
    for t in times:
        c = rule.fail(c, t)
    return c


def lockout_after(rule: LockoutRule, c: Counter, now: float) -> tuple[Counter, float]:
    """Fail until the subject locks, starting at ``now``; the counter and the lockout's length."""
    for i in range(rule.failures):
        assert c.locked(now + i) == 0
        c = rule.fail(c, now + i)
    start = now + rule.failures - 1
    return c, c.locked(start)


# ------------------------------------------------------------------------------------- lockout


def test_the_defaults_are_the_designs() -> None:
    assert (RULE.failures, RULE.window, RULE.base, RULE.cap) == (5, 60.0, 30.0, 3600.0)
    assert (DEFAULTS.caller_rate, DEFAULTS.caller_failures_per_hour) == (200.0, 1000)


def test_n_failures_within_the_window_lock() -> None:
    c = fail_at(RULE, [T0, T0 + 10, T0 + 20, T0 + 30])
    assert c.count == 4
    assert c.locked(T0 + 30) == 0, "four failures must not lock yet"
    c = RULE.fail(c, T0 + 59.9)  # the fifth, still inside the 60 s window that began at T0
    assert c.locked(T0 + 59.9) == pytest.approx(30.0)
    assert c.level == 1
    assert c.locked(T0 + 59.9 + 29.9) > 0
    assert c.locked(T0 + 59.9 + 30.0) == 0, "the lockout ends after 30 s"


def test_a_burst_locks_at_the_nth_failure_exactly() -> None:
    c = Counter()
    for i in range(4):
        c = RULE.fail(c, T0 + i * 0.001)
        assert c.locked(T0 + i * 0.001) == 0
    c = RULE.fail(c, T0 + 0.004)
    assert c.locked(T0 + 0.004) == pytest.approx(30.0)


def test_failures_spread_beyond_the_window_do_not_lock() -> None:
    # One failure every 15 s: four fit in a window, the fifth starts a new one.
    c = fail_at(RULE, [T0 + 15 * i for i in range(40)])
    assert c.locked(T0 + 15 * 39) == 0
    assert c.level == 0
    assert c.count < RULE.failures
    # Four failures, a pause longer than the window, four more: never five in one window.
    c = fail_at(RULE, [T0, T0 + 1, T0 + 2, T0 + 3, T0 + 64, T0 + 65, T0 + 66, T0 + 67])
    assert c.locked(T0 + 67) == 0
    assert c.count == 4


def test_a_fresh_counter_starts_its_window_at_the_first_failure() -> None:
    c = RULE.fail(Counter(), T0)
    assert (c.count, c.window_start) == (1, T0)


def test_the_failure_count_restarts_after_a_lockout() -> None:
    c, first = lockout_after(RULE, Counter(), T0)
    assert first == pytest.approx(30.0)
    assert c.count == 0
    after = T0 + 4 + 30  # the lockout is over; its window (begun at the lock) still runs
    c = fail_at(RULE, [after, after + 1, after + 2, after + 3], c)
    assert c.locked(after + 3) == 0, "four new failures after a lockout are not a fifth"


def test_each_lockout_doubles_up_to_the_cap() -> None:
    c, now, lengths = Counter(), T0, []
    for _ in range(10):
        c, length = lockout_after(RULE, c, now)
        lengths.append(length)
        now = c.locked_until + 1  # wait the lockout out, then fail again
    assert lengths == pytest.approx([30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600])
    assert c.level == 10


def test_lock_now_doubles_the_same_way_and_never_shortens_a_lockout() -> None:
    c = RULE.lock_now(Counter(), T0)
    assert c.locked(T0) == pytest.approx(30.0)
    c = RULE.lock_now(c, T0 + 31)
    assert c.locked(T0 + 31) == pytest.approx(60.0)
    # A longer lockout already running is kept: short one (level 0) on top of a 1 h one.
    long = Counter(locked_until=T0 + 3600, level=0)
    c = RULE.lock_now(long, T0)
    assert c.locked_until == T0 + 3600
    assert c.level == 1


@pytest.mark.parametrize("level", [1023, 1024, 1100, 10**6])
def test_a_very_high_level_is_the_cap_not_an_overflow(level: int) -> None:
    # Regression: base * 2**level raised OverflowError past level 1023 (a float cannot hold it),
    # which failed every later failed Match of the subject before it was counted.
    rule = LockoutRule(5, 60.0, 30.0, 3600.0)
    c = rule.fail(Counter(count=4, window_start=T0, level=level), T0 + 1)
    assert c.locked(T0 + 1) == pytest.approx(3600.0)
    c = rule.lock_now(Counter(level=level), T0)
    assert c.locked(T0) == pytest.approx(3600.0)
    assert c.level == level + 1


def test_locked_is_zero_or_the_seconds_left() -> None:
    c = Counter(locked_until=T0 + 10)
    assert c.locked(T0) == 10
    assert c.locked(T0 + 9.5) == 0.5
    assert c.locked(T0 + 10) == 0
    assert c.locked(T0 + 100) == 0


# -------------------------------------------------------------------------------------- budget


def spend(rule: BudgetRule, times: Iterable[float], c: Counter | None = None) -> Counter:
    c = Counter() if c is None else c
    for t in times:
        assert rule.exhausted(c, t) == 0, f"budget refused at {t - T0:g} s"
        c = rule.spend(c, t)
    return c


def test_the_budget_allows_limit_events_then_refuses_until_the_window_ends() -> None:
    rule = BudgetRule(limit=3, window=3600.0)
    c = spend(rule, [T0, T0 + 100, T0 + 200])
    assert rule.exhausted(c, T0 + 200) == pytest.approx(3400.0)
    assert rule.exhausted(c, T0 + 3599) == pytest.approx(1.0)


def test_the_budget_refills_whole_after_its_window() -> None:
    rule = BudgetRule(limit=3, window=3600.0)
    c = spend(rule, [T0, T0 + 1, T0 + 2])
    assert rule.exhausted(c, T0 + 3599.9) > 0
    assert rule.exhausted(c, T0 + 3600) == 0
    c = spend(rule, [T0 + 3600, T0 + 3601, T0 + 3602], c)  # the whole limit again
    assert c.count == 3
    assert rule.exhausted(c, T0 + 3602) == pytest.approx(3598.0)


def test_the_default_caller_budget_is_1000_failures_an_hour() -> None:
    rule = BudgetRule(DEFAULTS.caller_failures_per_hour, 3600.0)
    c = spend(rule, [T0 + i * 0.01 for i in range(1000)])
    assert rule.exhausted(c, T0 + 10) > 3500


def test_spending_in_a_new_window_forgets_the_old_one() -> None:
    rule = BudgetRule(limit=2, window=60.0)
    c = spend(rule, [T0, T0 + 1])
    c = rule.spend(c, T0 + 61)
    assert (c.count, c.window_start) == (1, T0 + 61)
    assert rule.exhausted(c, T0 + 61) == 0


def test_several_events_at_once_fit_only_if_all_of_them_fit() -> None:
    rule = BudgetRule(limit=5, window=3600.0)
    c = rule.spend(Counter(), T0, 3)
    assert c.count == 3
    assert rule.exhausted(c, T0 + 10, 2) == 0
    assert rule.exhausted(c, T0 + 10, 3) == pytest.approx(3590.0)  # two left: three do not fit
    # More than the whole limit never fits, not even in a fresh window.
    assert rule.exhausted(Counter(), T0, 6) > 0
    assert rule.exhausted(c, T0 + 3600, 6) == pytest.approx(3600.0)
    assert rule.exhausted(c, T0 + 3600, 5) == 0
