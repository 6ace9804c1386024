"""Hill-climbing attacks on Match: what a caller holding a gateway's credentials can rebuild.

Encryption at rest does nothing against a caller that may ask Match as often as it likes: from
disclosed distances a template is rebuilt in about ``dim + 1`` queries, and the abuse guard
(server/guard/) is what stands between a decision-only caller and unlimited guessing. This module
holds the attackers (importable: tests/test_attack.py runs them against a test daemon) and, run
as a script, plays three scenarios against a daemon it starts on a temporary dev setup:

  (a) a caller allowed to see distances, guard off: queries until a probe matches, for
      finite differences (``d(x + h e_i)^2 - d(x)^2 = 2h (x_i - t_i) + h^2``: dim + 1 distances
      give the target ``t``, one more query presents it) and for a stochastic hill climb; then
      finite differences again with the guard on (defaults);
  (b) the defaults (decision-only caller, guard on): a decision-only hill climber with a budget
      of queries against one subject;
  (c) the same budget spread over one subject per person of the real data set.

    .venv/bin/python bench/attack.py                # all three, 10,000-query budgets
    .venv/bin/python bench/attack.py --scenario b --budget 2000

Every query counts, answered or refused. Nothing here prints an encoding or a probe.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from faceseal.client import DeadlineExceededError, FaceSealClient, MatchResult, ResourceExhaustedError

F32 = npt.NDArray[np.float32]

DIM = 128
DATA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "face_encodings_dlib128.npz"
DEFAULT_BUDGET = 10_000
DEFAULT_TIME_LIMIT = 50.0  # seconds per attack; refused calls are cheap, 10,000 take ~10 s
DEFAULT_DEADLINE = 2.0  # the client's deadline per call

# Scenario (c): DESIGN.md's 1000 failed matches an hour would take hours of lockouts to reach
# with 25 subjects (5 failures each per lockout); a budget sized for a 25-subject gallery shows
# the caller budget and the subject lockouts working together within a minute.
SPREAD_FAILURES_PER_HOUR = 100

# The guard's refusal messages (server/guard/guard.py) -> its metric scopes.
_SCOPES = (
    ("locked out", "subject"),
    ("failed matches", "caller_failures"),
    ("request rate", "caller_rate"),
    ("Identify", "identify"),
)


def refusal_scope(message: str) -> str:
    """The guard scope a RESOURCE_EXHAUSTED message names ("other" if none)."""
    for needle, scope in _SCOPES:
        if needle in message:
            return scope
    return "other"


class OutOfQueries(Exception):
    """The attacker's query budget or time limit is used up."""


@dataclass
class Tally:
    """What one attack got: every query counts, whether the daemon answered it or refused it."""

    budget: int
    queries: int = 0
    answered: int = 0
    matched_at: int | None = None  # the query number of the first match
    matched_subject: str | None = None
    refused: dict[str, int] = field(default_factory=dict)  # scope (or "deadline") -> calls
    answered_at_first_refusal: dict[str, int] = field(default_factory=dict)  # scope -> answered so far
    max_retry_after: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    timed_out: bool = False

    @property
    def matched(self) -> bool:
        return self.matched_at is not None

    def refuse(self, scope: str, retry_after: float | None) -> None:
        self.refused[scope] = self.refused.get(scope, 0) + 1
        self.answered_at_first_refusal.setdefault(scope, self.answered)
        if retry_after is not None:
            self.max_retry_after[scope] = max(self.max_retry_after.get(scope, 0.0), retry_after)

    def summary(self) -> str:
        outcome = f"MATCH after {self.matched_at} queries" if self.matched else "no match"
        refused = ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items())) or "none"
        stop = " (time limit)" if self.timed_out else ""
        return (
            f"{outcome}; {self.queries} queries{stop} in {self.elapsed:.1f} s, "
            f"{self.answered} answered, refused: {refused}"
        )


class Oracle:
    """The attacker's view of Match through one client: counts queries, turns refusals into None.

    Raises OutOfQueries once ``budget`` queries were made or ``time_limit`` seconds have passed.
    """

    def __init__(
        self,
        client: FaceSealClient,
        *,
        budget: int = DEFAULT_BUDGET,
        time_limit: float = DEFAULT_TIME_LIMIT,
        deadline: float = DEFAULT_DEADLINE,
        gallery: str = "",
    ) -> None:
        self.tally = Tally(budget)
        self._client = client
        self._deadline = deadline
        self._gallery = gallery
        self._start = time.monotonic()
        self._end = self._start + time_limit

    def ask(self, subject: str, probe: F32) -> MatchResult | None:
        """One Match; None if the daemon refused it (locked out, over a budget or a rate)."""
        t = self.tally
        if t.queries >= t.budget:
            raise OutOfQueries
        if time.monotonic() > self._end:
            t.timed_out = True
            raise OutOfQueries
        t.queries += 1
        try:
            result = self._client.match(subject, probe, gallery=self._gallery, timeout=self._deadline)
        except ResourceExhaustedError as err:
            t.refuse(refusal_scope(err.message), err.retry_after)
            return None
        except DeadlineExceededError:
            t.refuse("deadline", None)
            return None
        t.answered += 1
        if result.match and t.matched_at is None:
            t.matched_at, t.matched_subject = t.queries, subject
        return result

    def distance(self, subject: str, probe: F32) -> MatchResult:
        """Ask until answered (a refused query teaches nothing; an attacker simply asks again)."""
        while True:
            result = self.ask(subject, probe)
            if result is not None:
                if result.distance is None:
                    raise ValueError("this caller is not shown distances; use a decision-only attack")
                return result

    def finish(self) -> Tally:
        self.tally.elapsed = time.monotonic() - self._start
        return self.tally


def random_start(rng: np.random.Generator, dim: int = DIM) -> F32:
    """A random unit vector: the attacker knows nothing about the target."""
    v = rng.standard_normal(dim)
    start: F32 = (v / np.linalg.norm(v)).astype(np.float32)
    return start


# --------------------------------------------------------------------------- distance attacks


def finite_difference_attack(oracle: Oracle, subject: str, start: F32, *, h: float = 1.0) -> Tally:
    """Rebuild the target from dim + 1 distances, then present it (dim + 2 queries in all).

    For the euclidean distance ``d(x)^2 = |x - t|^2``, moving coordinate i by h changes it by
    ``2h (x_i - t_i) + h^2``, so each coordinate of ``t`` follows from one extra distance. The
    three decimals the daemon discloses cost about 0.01 of accuracy, far inside a 0.6 threshold.
    """
    x = start.astype(np.float32)
    step = np.float32(h)
    with contextlib.suppress(OutOfQueries):
        base = oracle.distance(subject, x)
        if base.match:
            return oracle.finish()
        d0 = float(base.distance or 0.0)
        offset = np.empty(x.size, dtype=np.float64)
        for i in range(x.size):
            moved = x.copy()
            moved[i] += step
            answer = oracle.distance(subject, moved)
            if answer.match:
                return oracle.finish()
            di = float(answer.distance or 0.0)
            offset[i] = (di * di - d0 * d0 - h * h) / (2 * h)
        target = (x.astype(np.float64) - offset).astype(np.float32)
        oracle.distance(subject, target)
    return oracle.finish()


def distance_hill_climb(
    oracle: Oracle, subject: str, start: F32, rng: np.random.Generator, *, sigma: float = 0.3
) -> Tally:
    """A (1+1) evolution strategy on the disclosed distance, step size by the 1/5 success rule.

    The step never shrinks below a tenth of the current distance: the daemon rounds distances to
    three decimals, and smaller steps make improvements it would round away.
    """
    x = start.astype(np.float32)
    dim = x.size
    with contextlib.suppress(OutOfQueries):
        first = oracle.distance(subject, x)
        best = float(first.distance or 0.0)
        while not oracle.tally.matched:
            candidate = (x + sigma * rng.standard_normal(dim) / math.sqrt(dim)).astype(np.float32)
            answer = oracle.distance(subject, candidate)
            d = float(answer.distance or 0.0)
            if d < best:
                x, best = candidate, d
                sigma *= 1.5
            else:
                sigma = max(0.1 * best, sigma * 1.5**-0.25)
    return oracle.finish()


# --------------------------------------------------------------------------- decision attacks


@dataclass
class _Climber:
    """One decision-only hill climber: a random start, then random steps, restarted now and then."""

    rng: np.random.Generator
    dim: int
    step: float
    restart_every: int
    x: F32 = field(init=False)
    taken: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.x = random_start(self.rng, self.dim)

    def next_probe(self) -> F32:
        """The probe after a "no": a reject carries no direction, so any neighbour is as good."""
        self.taken += 1
        if self.taken % self.restart_every == 0:
            self.x = random_start(self.rng, self.dim)
        else:
            move = self.step * self.rng.standard_normal(self.dim) / math.sqrt(self.dim)
            self.x = (self.x + move).astype(np.float32)
        return self.x


def decision_hill_climb(
    oracle: Oracle,
    subject: str,
    rng: np.random.Generator,
    *,
    dim: int = DIM,
    step: float = 0.2,
    restart_every: int = 20,
) -> Tally:
    """Random-restart hill climbing on accept/reject answers against one subject, until a match
    or the budget is spent. A refused query is asked again (it taught nothing)."""
    climber = _Climber(rng, dim, step, restart_every)
    probe = climber.x
    with contextlib.suppress(OutOfQueries):
        while True:
            answer = oracle.ask(subject, probe)
            if answer is None:
                continue
            if answer.match:
                break
            probe = climber.next_probe()
    return oracle.finish()


def spread_decision_attack(
    oracle: Oracle,
    subjects: Sequence[str],
    rng: np.random.Generator,
    *,
    dim: int = DIM,
    step: float = 0.2,
    restart_every: int = 20,
) -> Tally:
    """The decision-only climber against many subjects: it stays on one subject until the daemon
    refuses it there (a lockout), then moves on to the next, round robin, so that no single
    subject's lockout stops it. Any match anywhere ends the attack."""
    climbers = [_Climber(rng, dim, step, restart_every) for _ in subjects]
    probes = [c.x for c in climbers]
    k = 0
    with contextlib.suppress(OutOfQueries):
        while True:
            answer = oracle.ask(subjects[k], probes[k])
            if answer is None:
                k = (k + 1) % len(subjects)
                continue
            if answer.match:
                break
            probes[k] = climbers[k].next_probe()
    return oracle.finish()


# ----------------------------------------------------------------------------------- the data


class Redacted(np.ndarray):
    """A view of encodings that never shows their values (in a traceback, a log, a test report):
    they are biometric data. Slices and arithmetic stay redacted."""

    def __repr__(self) -> str:
        return f"<{self.shape} encoding data, redacted>"

    __str__ = __repr__


def load_encodings(path: Path = DATA_FILE) -> tuple[F32, npt.NDArray[np.str_]]:
    """The real encodings (a redacted view) and their person labels."""
    with np.load(path, allow_pickle=False) as data:
        encodings: F32 = np.asarray(data["encodings"], dtype=np.float32).view(Redacted)
        return encodings, np.asarray(data["labels"])


def one_per_person(labels: npt.NDArray[np.str_]) -> list[int]:
    """The index of the first encoding of each person, in data-set order."""
    seen: dict[str, int] = {}
    for i, label in enumerate(labels.tolist()):
        seen.setdefault(str(label), i)
    return sorted(seen.values())


# ------------------------------------------------------------------------- the script's daemon


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@contextlib.contextmanager
def scratch_daemon(
    guard: dict[str, Any], *, disclosure: str = "decision", workdir: Path | None = None
) -> Iterator[tuple[Any, Callable[[str], FaceSealClient]]]:
    """A fresh dev setup (``faceseald init --dev``) in a temporary folder, its [guard] table set
    to ``guard`` and the gateway's disclosure to ``disclosure``, served in this process.

    Yields (the Daemon, a function making a client for a dev profile)."""
    from faceseal.server.config import load_config
    from faceseal.server.daemon import Daemon
    from faceseal.server.devinit import init_dev

    with tempfile.TemporaryDirectory(prefix="faceseal-attack-", dir=workdir) as tmp:
        directory = Path(tmp) / "dev"
        init_dev(directory, listen="127.0.0.1:0")
        config = directory / "faceseal.toml"
        table = "".join(f"{k} = {_toml(v)}\n" for k, v in guard.items())
        config.write_text(config.read_text(encoding="utf-8") + f"\n[guard]\n{table}", encoding="utf-8")
        policy = directory / "policy.toml"
        text = policy.read_text(encoding="utf-8")
        policy.write_text(text.replace('disclosure = "decision"', f"disclosure = {_toml(disclosure)}"), "utf-8")
        daemon = Daemon(load_config(config))
        clients: list[FaceSealClient] = []

        def client(profile: str) -> FaceSealClient:
            c = FaceSealClient.from_profile(profile, dev_dir=directory, target=f"127.0.0.1:{daemon.port}")
            clients.append(c)
            return c

        daemon.start()
        try:
            admin, end = client("admin"), time.monotonic() + 30
            while admin.health(timeout=2) != "SERVING":
                if time.monotonic() > end:
                    raise RuntimeError("the daemon did not unseal within 30 s")
                time.sleep(0.05)
            yield daemon, client
        finally:
            for c in clients:
                c.close()
            daemon.stop(0)


def guard_rejections(daemon: Any) -> dict[str, int]:
    """faceseal_guard_rejections_total per scope, read from the daemon's own registry."""
    from faceseal.server.metrics import GUARD_SCOPES

    out = {}
    for scope in GUARD_SCOPES:
        value = daemon.registry.get_sample_value("faceseal_guard_rejections_total", {"scope": scope})
        out[scope] = int(value or 0)
    return out


def audit_outcomes(daemon: Any) -> dict[str, int]:
    """Audit records per outcome code, read from the daemon's audit segments."""
    import json

    from faceseal.server.audit.log import segments

    counts: dict[str, int] = {}
    for path in segments(daemon.config.audit.dir):
        for line in path.read_text(encoding="utf-8").splitlines():
            outcome = json.loads(line)["outcome"]
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _scenario_a(encodings: F32, args: argparse.Namespace) -> None:
    print("(a) distance disclosed, guard off")
    with scratch_daemon({"enabled": False}, disclosure="distance") as (_, client):
        client("enroller").enroll("target", encodings[0])
        gateway = client("gateway")
        rng = np.random.default_rng(args.seed)
        fd = finite_difference_attack(Oracle(gateway, budget=args.budget), "target", random_start(rng))
        print(f"    finite differences: {fd.summary()}")
        hc = distance_hill_climb(Oracle(gateway, budget=args.budget), "target", random_start(rng), rng)
        print(f"    (1+1) hill climb:   {hc.summary()}")
    budget = min(args.budget, 2000)
    print(f"(a') distance disclosed, guard on (defaults): finite differences with {budget} queries")
    with scratch_daemon({}, disclosure="distance") as (_, client):
        client("enroller").enroll("target", encodings[0])
        rng = np.random.default_rng(args.seed)
        fd = finite_difference_attack(Oracle(client("gateway"), budget=budget), "target", random_start(rng))
        print(f"    {fd.summary()}")


def _scenario_b(encodings: F32, args: argparse.Namespace) -> None:
    print("(b) defaults: decision only, guard on; one subject")
    with scratch_daemon({}) as (daemon, client):
        client("enroller").enroll("target", encodings[0])
        rng = np.random.default_rng(args.seed)
        tally = decision_hill_climb(Oracle(client("gateway"), budget=args.budget), "target", rng)
        print(f"    {tally.summary()}")
        print(f"    answered before the first lockout: {tally.answered_at_first_refusal.get('subject')}")
        print(f"    faceseal_guard_rejections_total: {guard_rejections(daemon)}")
        print(f"    audit records by outcome: {audit_outcomes(daemon)}")


def _scenario_c(encodings: F32, labels: npt.NDArray[np.str_], args: argparse.Namespace) -> None:
    people = one_per_person(labels)
    print(
        f"(c) decision only, guard on (caller_failures_per_hour = {SPREAD_FAILURES_PER_HOUR}); "
        f"spread over {len(people)} subjects"
    )
    with scratch_daemon({"caller_failures_per_hour": SPREAD_FAILURES_PER_HOUR}) as (daemon, client):
        enroller = client("enroller")
        subjects = [f"person-{n:02d}" for n in range(len(people))]
        for subject, i in zip(subjects, people, strict=True):
            enroller.enroll(subject, encodings[i])
        rng = np.random.default_rng(args.seed)
        tally = spread_decision_attack(Oracle(client("gateway"), budget=args.budget), subjects, rng)
        print(f"    {tally.summary()}")
        print(f"    faceseal_guard_rejections_total: {guard_rejections(daemon)}")
        print(f"    audit records by outcome: {audit_outcomes(daemon)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Hill-climbing attacks on Match against a daemon started on a temporary dev setup: "
        "(a) queries-to-match with distances disclosed and the guard off, (b) a decision-only "
        "attacker against one subject with the defaults, (c) the same spread over many subjects.",
    )
    parser.add_argument("--scenario", choices=("a", "b", "c", "all"), default="all")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="queries per attack (default 10000)")
    parser.add_argument("--seed", type=int, default=1, help="the attackers' random seed")
    parser.add_argument("--data", type=Path, default=DATA_FILE, help="the .npz of real encodings (never printed)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data} does not exist (see shared/data/README.md)")
    encodings, labels = load_encodings(args.data)
    if args.scenario in ("a", "all"):
        _scenario_a(encodings, args)
    if args.scenario in ("b", "all"):
        _scenario_b(encodings, args)
    if args.scenario in ("c", "all"):
        _scenario_c(encodings, labels, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
