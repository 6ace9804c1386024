"""The abuse guard: what stops a caller with valid credentials from rebuilding a template.

Encryption at rest does nothing against a gateway certificate asking Match thousands of times:
hill-climbing attacks rebuild a matching template from scores, and from accept/reject answers
alone when attempts are unlimited. So, per DESIGN.md:

* per subject: N failed matches within a window lock the subject out; each lockout doubles the
  next, up to a cap; a successful match resets it. Stored, so restarts and replicas share it.
* per caller: a failed-match budget across all subjects (stops spraying one probe over many
  subjects), an Identify budget (both stored), and a request rate (a token bucket in memory:
  a store write per request would cost more than the requests it limits; each replica enforces
  the rate on its own, so N replicas admit up to N times the rate).
* hill-climbing signature: runs of near-identical non-matching probes from one caller lock the
  subject at once. The recent probes are kept in memory only, never stored.

Every refusal is RESOURCE_EXHAUSTED with the seconds to wait.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from faceseal.server.auth.policy import Caller
from faceseal.server.config import GalleryConfig, GuardConfig
from faceseal.server.errors import InvalidArgument, ResourceExhausted
from faceseal.server.guard.state import BudgetRule, Counter, LockoutRule
from faceseal.server.matching import distance
from faceseal.server.matching.distance import F32
from faceseal.server.metrics import Metrics
from faceseal.server.store.base import GuardRow, Store


def _row(c: Counter) -> GuardRow:
    return (c.count, c.window_start, c.locked_until, c.level)


def _counter(row: GuardRow | None) -> Counter:
    return Counter() if row is None else Counter(*row)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens, self.stamp = tokens, stamp


_PENDING_WAIT = 1.0  # seconds to wait when refused for guesses in flight: they end within milliseconds


class MatchAttempt:
    """A Match between the guard's check and its record; see ``Guard.check_match``.

    ``subject_row`` is the subject's counter as the check read it (for ``record_match``).
    ``release`` ends the attempt's place among those in flight; call it once the failure (if
    any) is written, or on any way out (an error, a refusal later on): use try/finally.
    """

    __slots__ = ("_guard", "budget_key", "subject_key", "subject_row")

    def __init__(
        self,
        guard: Guard | None,
        subject_key: tuple[str, bytes],
        budget_key: tuple[str, bytes],
        subject_row: GuardRow | None,
    ) -> None:
        self._guard = guard
        self.subject_key, self.budget_key, self.subject_row = subject_key, budget_key, subject_row

    def release(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard._release(self)


_NO_ATTEMPT = MatchAttempt(None, ("", b""), ("", b""), None)  # the guard is off: nothing to count


class Guard:
    def __init__(
        self, config: GuardConfig, store: Store, metrics: Metrics, clock: Callable[[], float] = time.time
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._subject = LockoutRule(
            config.subject_failures, config.subject_window_seconds, config.lockout_seconds, config.lockout_max_seconds
        )
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._probes: dict[tuple[str, str], deque[F32]] = {}
        # Matches between check and record, per subject key and per caller-budget key.
        self._pending: dict[tuple[str, bytes], int] = {}

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def _refuse(self, scope: str, message: str, retry_after: float) -> ResourceExhausted:
        self._metrics.guard_rejections.labels(scope).inc()
        return ResourceExhausted(message, retry_after)

    # -- every data-plane call ---------------------------------------------------------------

    def admit(self, caller: Caller, cost: int = 1) -> None:
        """The caller's request rate (token bucket, per replica). ``cost``: requests this call
        counts as (an IdentifyBatch counts one per probe: batching is no way around the rate)."""
        if not self._config.enabled:
            return
        rate = float(caller.rule.rate if caller.rule.rate is not None else self._config.caller_rate)
        # The bucket holds a second's worth of requests, and at least one: a rate below 1/s (e.g.
        # 0.5) with a capacity of ``rate`` never held a whole token and refused every call.
        burst = max(1.0, rate)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(caller.identity)
            if bucket is None:
                bucket = self._buckets[caller.identity] = _Bucket(burst, now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if cost > burst:  # no wait would help: not RESOURCE_EXHAUSTED with a retry delay
                raise InvalidArgument(
                    f"a batch of {cost} probes is more than this caller's request rate allows at once; "
                    "send smaller batches"
                )
            if bucket.tokens < cost:
                raise self._refuse("caller_rate", "this caller is over its request rate", (cost - bucket.tokens) / rate)
            bucket.tokens -= cost

    # -- Match -------------------------------------------------------------------------------

    def _failure_budget(self, caller: Caller) -> BudgetRule:
        limit = caller.rule.failures_per_hour
        return BudgetRule(self._config.caller_failures_per_hour if limit is None else limit, 3600.0)

    def check_match(self, caller: Caller, gallery: str, subject_ref: bytes) -> MatchAttempt:
        """Refuse a locked subject or a caller out of failure budget; one store read for both.

        The attempt returned counts as a possible failure until its ``release`` (after the
        failure, if any, is written), and the checks count the attempts already in flight: a
        Match's failure is only written after its comparison, so without them a burst of
        parallel guesses all passed the check before the first failure was written (11 answers
        where the lockout allows 5). The attempt takes its place *before* the store is read, so
        every other attempt either is counted among those in flight or, having released, has
        its failure in what the read sees. Per process: N replicas or workers can each admit
        one burst of the subject's remaining failures. The attempt also carries the subject's
        counter as read, so a successful Match needs no second read to learn whether there is
        anything to reset.
        """
        if not self._config.enabled:
            return _NO_ATTEMPT
        subject_key = ("subject", gallery.encode() + b"\0" + subject_ref)
        budget_key = ("caller_failures", caller.identity.encode())
        with self._lock:
            pending_subject = self._pending.get(subject_key, 0)
            pending_caller = self._pending.get(budget_key, 0)
            self._pending[subject_key] = pending_subject + 1
            self._pending[budget_key] = pending_caller + 1
        attempt = MatchAttempt(self, subject_key, budget_key, None)
        try:
            now = self._clock()
            rows = self._store.guard_get_many((subject_key, budget_key))
            attempt.subject_row = rows.get(subject_key)
            subject = _counter(attempt.subject_row)
            wait = subject.locked(now)
            if wait > 0:
                raise self._refuse("subject", "this subject is locked out after repeated failed matches", wait)
            budget = self._failure_budget(caller)
            spent = _counter(rows.get(budget_key))
            wait = budget.exhausted(spent, now)
            if wait > 0:
                raise self._refuse("caller_failures", "this caller has used up its budget of failed matches", wait)
            rule = self._subject
            recent = subject.count if now - subject.window_start < rule.window else 0
            if recent + pending_subject >= rule.failures:
                raise self._refuse("in_flight", "too many Matches of this subject at once; retry", _PENDING_WAIT)
            if budget.exhausted(spent, now, pending_caller + 1) > 0:
                raise self._refuse("in_flight", "too many failed-match guesses in flight; retry", _PENDING_WAIT)
        except BaseException:
            attempt.release()
            raise
        return attempt

    def _release(self, attempt: MatchAttempt) -> None:
        with self._lock:
            for key in (attempt.subject_key, attempt.budget_key):
                left = self._pending[key] - 1
                if left:
                    self._pending[key] = left
                else:
                    del self._pending[key]

    def record_match(
        self,
        caller: Caller,
        gallery: GalleryConfig,
        subject_ref: bytes,
        probe: F32,
        matched: bool,
        subject_row: GuardRow | None,
    ) -> None:
        """Count a failure (subject, caller budget, probe similarity) or reset the subject on success.

        ``subject_row`` is what ``check_match`` read: a row with nothing to reset (or none at all)
        means a successful Match writes nothing. A reset races harmlessly with another replica's
        failure: the write is a read-modify-write in one transaction.
        """
        if not self._config.enabled:
            return
        now = self._clock()
        key = gallery.name.encode() + b"\0" + subject_ref
        if matched:
            # A genuine user got in: their earlier failures were not an attack on this subject.
            if subject_row is not None and (subject_row[0] or subject_row[3]):
                self._store.guard_update("subject", key, lambda _old: _row(Counter()))
            return
        similar = self._similar_run(caller, gallery, probe)
        rule = self._subject

        def fail(row: GuardRow | None) -> GuardRow:
            c = _counter(row)
            return _row(rule.lock_now(c, now) if similar else rule.fail(c, now))

        self._store.guard_update("subject", key, fail)
        if similar:
            self._metrics.guard_rejections.labels("probe_similarity").inc()
        budget = self._failure_budget(caller)
        self._store.guard_update(
            "caller_failures", caller.identity.encode(), lambda row: _row(budget.spend(_counter(row), now))
        )

    def _similar_run(self, caller: Caller, gallery: GalleryConfig, probe: F32) -> bool:
        """Whether this failed probe continues a run of near-identical failed probes."""
        radius = self._config.similar_probe_fraction * gallery.threshold
        with self._lock:
            history = self._probes.setdefault((caller.identity, gallery.name), deque(maxlen=self._config.probe_history))
            close = 0
            if history:
                near = distance.exact(np.stack(history), probe, gallery.metric) <= radius
                close = int(np.count_nonzero(near))
            history.append(probe.copy())
        return close >= self._config.similar_probe_count

    # -- Identify ----------------------------------------------------------------------------

    def spend_identify(self, caller: Caller, searches: int = 1) -> None:
        """Spend ``searches`` of the caller's hourly Identify budget (an IdentifyBatch spends one
        per probe, so batching is no way around it); refused whole if they do not all fit.

        Checked and spent in one store transaction: a check read apart from the write let
        parallel calls all see the same remaining budget and together spend twice it (and
        replicas share the row, so a lock in this process would not be enough).
        """
        if not self._config.enabled:
            return
        now = self._clock()
        limit = caller.rule.identify_per_hour
        rule = BudgetRule(self._config.identify_per_hour if limit is None else limit, 3600.0)

        def spend(row: GuardRow | None) -> GuardRow:
            c = _counter(row)
            wait = rule.exhausted(c, now, searches)
            if wait > 0:
                left = rule.limit - (c.count if now - c.window_start < rule.window else 0)
                if searches > rule.limit:
                    reason = (
                        f"a batch of {searches} probes is more than this caller's Identify budget; send smaller batches"
                    )
                elif left > 0:
                    reason = f"this caller has {left} Identify searches left in its budget; "
                    reason += f"a batch of {searches} does not fit"
                else:
                    reason = "this caller has used up its Identify budget"
                raise self._refuse("identify", reason, wait)
            return _row(rule.spend(c, now, searches))

        self._store.guard_update("identify", caller.identity.encode(), spend)
