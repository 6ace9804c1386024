"""The abuse guard's counters and its rules. Pure: no clock, no I/O; ``now`` is passed in.

One ``Counter`` per (scope, key): failures in the current window, a lockout deadline, and the
lockout level that doubles the next lockout. Kept in the store so a restart does not wipe an
attacker's record and several replicas see the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Counter:
    count: int = 0
    window_start: float = 0.0
    locked_until: float = 0.0
    level: int = 0

    def locked(self, now: float) -> float:
        """Seconds left in a lockout, or 0."""
        return max(0.0, self.locked_until - now)


@dataclass(frozen=True, slots=True)
class LockoutRule:
    """``failures`` within ``window`` seconds lock for ``base`` seconds, doubling up to ``cap``."""

    failures: int
    window: float
    base: float
    cap: float

    def fail(self, c: Counter, now: float) -> Counter:
        """Count one failure; lock (and raise the level) when the window fills up."""
        if now - c.window_start >= self.window:
            c = replace(c, count=0, window_start=now)
        c = replace(c, count=c.count + 1)
        if c.count >= self.failures:
            c = Counter(count=0, window_start=now, locked_until=now + self.duration(c.level), level=c.level + 1)
        return c

    def lock_now(self, c: Counter, now: float) -> Counter:
        """Lock at once (hill-climbing detected), with the same doubling."""
        until = max(c.locked_until, now + self.duration(c.level))
        return Counter(count=0, window_start=now, locked_until=until, level=c.level + 1)

    def duration(self, level: int) -> float:
        """The lockout at ``level``: ``base`` doubled ``level`` times, at most ``cap``.

        The exponent is clamped: ``base * 2**level`` stops fitting a float past level 1023, and the
        OverflowError it raised failed every later failed Match of that subject with INTERNAL
        before anything was counted, so the subject was never locked again (and INTERNAL versus
        a match still told the caller the decision). Any clamp past log2(cap / base) is the cap.
        """
        return min(self.cap, self.base * 2.0 ** min(level, 64))


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """At most ``limit`` events per ``window`` seconds (a fixed window, refilled whole)."""

    limit: int
    window: float

    def spend(self, c: Counter, now: float, n: int = 1) -> Counter:
        if now - c.window_start >= self.window:
            c = Counter(count=0, window_start=now)
        return replace(c, count=c.count + n)

    def exhausted(self, c: Counter, now: float, n: int = 1) -> float:
        """Seconds until the budget refills, or 0 if there is budget left for ``n`` more events."""
        if now - c.window_start >= self.window:
            return 0.0 if n <= self.limit else self.window
        if c.count + n <= self.limit:
            return 0.0
        return c.window_start + self.window - now
