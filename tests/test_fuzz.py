"""Abuse resistance, part 1: property tests (hypothesis) over everything that parses untrusted input.

* Request validation (``faceseal.server.validation``): any vector, id, gallery name or top_k
  gives either a valid result or InvalidArgument, and the message never carries the value.
  And what it accepts the gallery handles: Identify over any accepted templates and probe agrees
  with a brute-force float64 search, up to float32 rounding (vectors whose float32 squares over-
  or underflowed used to vanish from Identify; validation now bounds a vector's length).
* The policy parser: arbitrary TOML-ish text, and arbitrary structured policies dumped to TOML,
  give a Policy or ConfigError, nothing else; an accepted policy obeys every rule of the format.
* The config parser: arbitrary mutations of a valid dev config give a Config or ConfigError.
* The running daemon over mutual TLS, with raw stubs: random Enroll / Match / Identify / Delete
  requests (NaN, infinities, float32 overflow, subnormals, empty and oversized vectors, odd
  unicode and very long ids and gallery names, huge top_k, the wrong caller) end with a
  documented status code only, never INTERNAL or UNKNOWN; a refused request leaves the store
  byte for byte as it was (every row of every table, and the revision counter); no message
  echoes a value of the request; the daemon is still SERVING at the end.

The daemon runs twice. ``test_daemon_fuzz_guard_off`` disables the abuse guard: its rate limit
and lockouts are checked *before* validation, so with it on most fuzzed calls would end as
RESOURCE_EXHAUSTED without ever reaching the code under test, and a failed Match would write
guard counters into the store, blurring "the store changed iff an Enroll or Delete succeeded".
``test_daemon_fuzz_guard_on`` then runs the same requests with the guard on and tight limits,
accepting RESOURCE_EXHAUSTED, to show that the guard's refusals change nothing either.

"The store" is the SQLite file: refused calls do append an audit record (by design), nothing else.

Reproducible in CI: every run draws the same examples (``derandomize=True``) and nothing is
read from or written to a hypothesis example database. About 35 s of CPU in all.
"""

from __future__ import annotations

import copy
import json
import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from helpers import DIM, Dev, InProcessDaemon, db_revision, db_snapshot, health, random_encodings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from faceseal.server import validation
from faceseal.server.auth.policy import Permission, Policy, parse_policy
from faceseal.server.config import GALLERY_NAME, MAX_DIMENSION, Config, GalleryConfig, load_config
from faceseal.server.devinit import init_dev
from faceseal.server.errors import ConfigError, InvalidArgument
from faceseal.server.gallery.memory import Gallery
from faceseal.server.matching import distance
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc as pb_grpc

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def _settings(max_examples: int, deadline: timedelta | None = timedelta(seconds=5)) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=deadline,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


CANARY = "Qz7Canary"  # put into ids and gallery names; must never come back in a message
CANARY_FLOATS = (0.31415927, -271828.19, 1.6180339e-3)  # their digits would stand out in a message

# ----------------------------------------------------------------------------- shared strategies

WEIRD_TEXT = (
    "",
    " ",
    "zoë",
    "ünïcödé",
    "😀",
    "a\u200bb",  # zero-width space
    "\u202eevil",  # right-to-left override
    "\uff41\uff4c\uff49\uff43\uff45",  # fullwidth: \w would accept it, the ASCII rule must not
    "alice\n",
    "alice\x00",
    "x'; DROP TABLE templates; --",
    "../faces",
    "faces/x",
    "%s%n%x",
    "{}",
    "\\",
    "s" * 128,
    "s" * 129,
    "g" * 64,
    "g" * 65,
    "é" * 128,
    "x" * 10_000,
)

TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=string.ascii_letters + string.digits + "._:@-", min_size=0, max_size=140),
    st.sampled_from(WEIRD_TEXT),
    st.tuples(st.text(max_size=8), st.text(max_size=8)).map(lambda t: t[0] + CANARY + t[1]),
)

SPECIAL_FLOATS = (
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1e-45,  # the smallest float32 subnormal
    -1e-45,
    1e-50,  # underflows to zero as float32
    1.17549435e-38,
    3.4028235e38,  # float32 max
    -3.4028235e38,
    3.5e38,  # finite as float64, infinite as float32
    1e300,
    -1e300,
    *CANARY_FLOATS,
)
FLOATS = st.one_of(st.floats(), st.floats(width=32), st.sampled_from(SPECIAL_FLOATS))
NICE_FLOATS = st.floats(-1.0, 1.0, width=32)


def _digits_left(message: str, *allowed: int) -> str:
    """The digits of ``message`` once the numbers it may legitimately name are taken out."""
    for number in sorted({str(a) for a in allowed}, key=len, reverse=True):
        message = re.sub(rf"(?<!\d){number}(?!\d)", "", message)
    return "".join(ch for ch in message if ch.isdigit())


def outcome(call: Callable[[], T], expected: type[E]) -> T | E:
    """What ``call`` returns, or the ``expected`` exception it raised; anything else propagates,
    which is the failure these properties look for."""
    try:
        return call()
    except expected as exc:
        return exc


def _as_float32(values: list[float]) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------------- request validation


@st.composite
def vectors_and_dimension(draw: st.DrawFn) -> tuple[list[float], int]:
    dimension = draw(st.sampled_from([1, 2, 3, 4, 16, DIM]))
    kind = draw(st.sampled_from(["exact-nice", "exact-any", "exact-spiked", "zeros", "any-length"]))
    if kind == "exact-nice":
        values = draw(st.lists(NICE_FLOATS, min_size=dimension, max_size=dimension))
    elif kind == "exact-any":
        values = draw(st.lists(FLOATS, min_size=dimension, max_size=dimension))
    elif kind == "exact-spiked":
        values = draw(st.lists(NICE_FLOATS, min_size=dimension, max_size=dimension))
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, dimension - 1))] = draw(st.sampled_from(SPECIAL_FLOATS))
    elif kind == "zeros":
        values = [draw(st.sampled_from([0.0, -0.0, 1e-50]))] * dimension
    else:
        values = draw(st.lists(FLOATS, max_size=2 * dimension + 3))
    return values, dimension


@_settings(300)
@given(case=vectors_and_dimension(), field_name=st.sampled_from(["encoding", "probe"]))
def test_vector_is_valid_or_invalid_argument(case: tuple[list[float], int], field_name: str) -> None:
    values, dimension = case
    as32 = _as_float32(values)
    expected_ok = (
        len(values) == dimension
        and bool(np.all(np.isfinite(as32)))
        and bool(np.any(as32 != 0))
        and validation.MIN_NORM <= math.sqrt(sum(float(v) ** 2 for v in as32)) <= validation.MAX_NORM
    )
    out = outcome(lambda: validation.vector(values, dimension, field_name), InvalidArgument)
    if isinstance(out, InvalidArgument):
        assert not expected_ok, "a valid vector was refused"
        message = str(out)
        assert message.startswith(field_name)
        # Only the gallery's dimension, the count and the norm bounds may appear: no value of the vector.
        for fixed in (f"{validation.MIN_NORM:g}", f"{validation.MAX_NORM:g}", "L2"):
            message = message.replace(fixed, "")
        assert _digits_left(message, dimension, len(values)) == "", message
        return
    assert expected_ok, "an invalid vector was accepted"
    assert out.dtype == np.float32
    assert out.shape == (dimension,)
    assert np.all(np.isfinite(out))
    assert np.any(out != 0)
    assert np.array_equal(out, as32)


SCALES = (1.0, 1.0, 1.0, 1e-30, 1e-20, 1e-12, 1e-6, 1e6, 1e12, 1e20, 1e30, 1e38)


@st.composite
def galleries_and_probe(draw: st.DrawFn) -> tuple[str, float, list[tuple[int, list[float]]], list[float], int]:
    """Templates and a probe of every magnitude, some close to the probe, so there are hits."""
    metric = draw(st.sampled_from(["euclidean", "cosine"]))
    threshold = draw(st.sampled_from([0.3, 0.6, 1.0] if metric == "euclidean" else [0.1, 0.3, 0.5]))
    dimension = draw(st.integers(1, 6))
    unit = st.lists(NICE_FLOATS, min_size=dimension, max_size=dimension)
    probe = [v * draw(st.sampled_from(SCALES)) for v in draw(unit)]
    templates = []
    for _ in range(draw(st.integers(1, 25))):
        subject = draw(st.integers(0, 9))
        if draw(st.booleans()):  # near the probe: the same direction, or the probe plus a little
            if metric == "cosine":
                vector = [v * draw(st.sampled_from(SCALES)) for v in probe]
            else:
                vector = [p + n * 0.1 for p, n in zip(probe, draw(unit), strict=True)]
        else:
            vector = [v * draw(st.sampled_from(SCALES)) for v in draw(unit)]
        templates.append((subject, vector))
    return metric, threshold, templates, probe, draw(st.integers(1, 5))


@_settings(150)
@given(case=galleries_and_probe())
def test_identify_ranks_every_accepted_vector_correctly(
    case: tuple[str, float, list[tuple[int, list[float]]], list[float], int],
) -> None:
    """Whatever validation lets in, Identify agrees with a brute-force float64 search over the same
    templates, up to the float32 pre-ranking's rounding: it never loses a candidate that is clearly
    closer than what it returned (it did, for templates or probes whose float32 squares over- or
    underflow, before validation bounded a vector's length)."""
    metric, threshold, templates, raw_probe, top_k = case
    dimension = len(raw_probe)
    gallery = Gallery(GalleryConfig("g", dimension, metric, threshold))  # type: ignore[arg-type]
    rows: dict[str, list[np.ndarray]] = {}
    for i, (subject, values) in enumerate(templates):
        vector = outcome(lambda values=values: validation.vector(values, dimension, "encoding"), InvalidArgument)
        if isinstance(vector, InvalidArgument):
            continue
        sid = f"s{subject}"
        gallery.add(sid, f"t{i}", vector, subject_ref=sid.encode())
        rows.setdefault(sid, []).append(vector)
    probe = outcome(lambda: validation.vector(raw_probe, dimension, "probe"), InvalidArgument)
    if isinstance(probe, InvalidArgument) or not rows:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow inside the ranking is a lost candidate waiting to happen
        hits = gallery.identify(probe, top_k)
    best = {sid: float(distance.exact(np.stack(vs), probe, metric).min()) for sid, vs in rows.items()}
    expected = sorted(d for d in best.values() if d <= threshold)

    # How far float32 rounding may move a pre-ranking score (a generous bound on a dot product's
    # error, dim * 2**-24 * |r| |p|), as a slack on squared euclidean or on cosine distances.
    eps = 64 * dimension * 2.0**-23
    if metric == "euclidean":
        largest = max(float(np.linalg.norm(v.astype(np.float64))) for vs in rows.values() for v in vs)
        slack = eps * (largest + float(np.linalg.norm(probe.astype(np.float64)))) ** 2

        def clearly_closer(a: float, b: float) -> bool:
            return a * a + slack < b * b
    else:
        slack = 2 * eps

        def clearly_closer(a: float, b: float) -> bool:
            return a + slack < b

    assert len(hits) <= top_k
    assert len({h.subject_id for h in hits}) == len(hits)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    for hit in hits:
        assert hit.distance <= threshold
        assert hit.distance >= best[hit.subject_id] - 1e-12  # never closer than the truth
    # No candidate clearly inside the threshold is dropped while fewer than top_k came back ...
    clearly_inside = [d for d in expected if clearly_closer(d, threshold)]
    assert len(hits) >= min(top_k, len(clearly_inside)), "a candidate within the threshold was lost"
    # ... and none clearly closer than the i-th answer is passed over.
    for i, hit in enumerate(hits):
        assert not clearly_closer(expected[i], hit.distance), "a closer candidate was passed over"


SUBJECT_CHARS = frozenset(string.ascii_letters + string.digits + "._:@-")
_REFUSED_SUBJECT = "subject_id must be 1-128 characters of [A-Za-z0-9._:@-]"


@_settings(300)
@given(value=TEXT)
def test_subject_id_is_valid_or_invalid_argument(value: str) -> None:
    expected_ok = 1 <= len(value) <= 128 and set(value) <= SUBJECT_CHARS
    out = outcome(lambda: validation.subject_id(value), InvalidArgument)
    if isinstance(out, InvalidArgument):
        assert not expected_ok, "a valid subject id was refused"
        assert str(out) == _REFUSED_SUBJECT  # one fixed text, whatever the value
        return
    assert expected_ok, "an invalid subject id was accepted"
    assert out == value


GALLERY_CHARS = frozenset(string.ascii_letters + string.digits + "._-")


@_settings(200)
@given(value=TEXT)
def test_gallery_name_is_valid_or_invalid_argument(value: str) -> None:
    expected_ok = (
        1 <= len(value) <= 64
        and set(value) <= GALLERY_CHARS
        and (value[0] in string.ascii_letters or value[0] in string.digits)
    )
    reference = str(outcome(lambda: validation.gallery_name(".."), InvalidArgument))
    out = outcome(lambda: validation.gallery_name(value), InvalidArgument)
    if isinstance(out, InvalidArgument):
        assert not expected_ok, "a valid gallery name was refused"
        assert str(out) == reference  # one fixed text, whatever the value
        return
    assert expected_ok, "an invalid gallery name was accepted"
    assert out == value


@_settings(200)
@given(
    value=st.one_of(st.integers(), st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**63, -(2**63)])),
    maximum=st.integers(1, 10_000),
)
def test_top_k_is_valid_or_invalid_argument(value: int, maximum: int) -> None:
    reference = str(outcome(lambda: validation.top_k(0, maximum), InvalidArgument))
    out = outcome(lambda: validation.top_k(value, maximum), InvalidArgument)
    if isinstance(out, InvalidArgument):
        assert not 1 <= value <= maximum
        assert str(out) == reference
        return
    assert 1 <= value <= maximum
    assert out == value


# ------------------------------------------------------------------------------- TOML writing


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but non-ASCII stays as it is (JSON would
    write an astral character as a surrogate pair, which TOML refuses) and DEL is escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return toml_string(key)  # a quoted key: any string is a valid TOML key this way


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value).__name__)


def toml_document(data: dict[str, Any]) -> str:
    """Top-level keys one per line; every nested table inline. Always valid TOML."""
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in data.items())


SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(WEIRD_TEXT[:-1]),
    st.datetimes(),
    st.dates(),
    st.times(),
)
ANY_TOML = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=8,
)


def test_toml_writer_round_trips() -> None:
    """The fuzzers below rely on it: what it writes is valid TOML that reads back the same."""
    import tomllib

    data = {
        "a b": [1, 2.5, 'x"\n\x00é\x7f\U0001f600\u2028'],
        "t": {"": True, "n": {"k": -(2**63)}},
        "d": date(2024, 1, 2),
    }
    assert tomllib.loads(toml_document(data)) == data


# --------------------------------------------------------------------------------- policy parser

POLICY_TOKENS = (
    "[[callers]]",
    "[callers]",
    "[[other]]",
    "identity",
    "permissions",
    "galleries",
    "disclosure",
    "rate",
    "failures_per_hour",
    "identify_per_hour",
    "callers",
    " = ",
    "=",
    '"',
    "'",
    '"""',
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "\n",
    " ",
    "# comment\n",
    '"spiffe://faceseal.dev/gateway"',
    '"spiffe://faceseal.dev/*"',
    '"*"',
    '"a*b"',
    '""',
    '"enroll"',
    '"match"',
    '"identify"',
    '"delete"',
    '"admin"',
    '"root"',
    '"decision"',
    '"distance"',
    "1",
    "0",
    "-1",
    "1.5",
    "1e12",
    "1e400",
    "99999999999999999999999999",
    "nan",
    "inf",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "\\u0000",
    "\\",
    "\t",
    "\r",
    "é",
)
POLICY_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(POLICY_TOKENS), st.text(max_size=3)), max_size=80).map("".join),
)
DEEP = 3_000  # deeper than the interpreter's recursion limit (1000)


def _assert_policy_well_formed(policy: Policy) -> None:
    identities = [r.identity for r in policy.rules]
    assert len(identities) == len(set(identities))
    for rule in policy.rules:
        assert rule.identity
        assert rule.identity != "*"
        assert "*" not in rule.identity[:-1]
        assert rule.permissions <= set(Permission)
        assert rule.galleries
        assert all(isinstance(g, str) for g in rule.galleries)
        assert rule.disclosure in ("decision", "distance")
        for limit in (rule.rate, rule.failures_per_hour, rule.identify_per_hour):
            assert limit is None or (math.isfinite(limit) and 0 < limit < 1e12)
        assert rule.failures_per_hour is None or isinstance(rule.failures_per_hour, int)
        assert rule.identify_per_hour is None or isinstance(rule.identify_per_hour, int)


def _parse_policy_or_config_error(text: str) -> Policy | ConfigError:
    policy = outcome(lambda: parse_policy(text, "policy.toml"), ConfigError)
    if isinstance(policy, ConfigError):
        assert str(policy).startswith("policy.toml: "), "a policy error must name its file"
        return policy
    _assert_policy_well_formed(policy)
    return policy


@_settings(300)
@given(text=POLICY_TEXT)
@example(text="callers = " + "[" * DEEP + "]" * DEEP)
@example(text="x = " + "{a = " * DEEP + "1" + "}" * DEEP)
@example(text="[[callers]]\nidentity = 'a'\npermissions = ['enroll']\ngalleries = ['*']\nrate = " + "9" * 500)
@example(text="[[callers]]\nidentity = 'a'\npermissions = ['enroll']\ngalleries = ['*']\nrate = nan")
@example(text="\ufeff[[callers]]")
def test_policy_text_parses_or_config_error(text: str) -> None:
    _parse_policy_or_config_error(text)


RULE_KEYS = ("identity", "permissions", "galleries", "disclosure", "rate", "failures_per_hour", "identify_per_hour")
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "identity": st.one_of(
        st.sampled_from(["spiffe://faceseal.dev/a", "spiffe://faceseal.dev/*", "*", "", "a*b", "x", "x*"]),
        st.text(max_size=12),
    ),
    "permissions": st.lists(
        st.one_of(st.sampled_from([p.value for p in Permission]), st.sampled_from(["Enroll", "root", ""])),
        max_size=6,
    ),
    "galleries": st.lists(st.one_of(st.sampled_from(["*", "faces", ""]), st.text(max_size=6)), max_size=3),
    "disclosure": st.sampled_from(["decision", "distance", "score", "", "Decision"]),
    "rate": st.one_of(st.floats(), st.integers(), st.sampled_from([0, 1e-300, 1e12, 1e12 - 1, 10**400])),
    "failures_per_hour": st.one_of(st.integers(), st.floats(), st.sampled_from([0, 1, 10**12, 10**400])),
    "identify_per_hour": st.one_of(st.integers(), st.floats(), st.booleans()),
}


@st.composite
def policy_entry(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(ANY_TOML)  # not even a table
    entry: dict[str, Any] = {}
    for key in RULE_KEYS:
        presence = draw(st.integers(0, 9))
        if presence == 0:
            continue  # missing
        entry[key] = draw(ANY_TOML) if presence == 1 else draw(PLAUSIBLE[key])
    if draw(st.integers(0, 9)) == 0:
        entry[draw(st.text(max_size=10))] = draw(ANY_TOML)
    return entry


@st.composite
def policy_document(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    shape = draw(st.integers(0, 19))
    if shape == 0:
        doc["callers"] = draw(ANY_TOML)
    elif shape != 1:  # 1: no callers at all, which is an empty (deny-all) policy
        doc["callers"] = draw(st.lists(policy_entry(), max_size=5))
    revoked = draw(st.integers(0, 9))
    if revoked == 0:
        doc["revoked"] = draw(ANY_TOML)
    elif revoked <= 3:
        doc["revoked"] = draw(
            st.dictionaries(
                st.sampled_from(["serials", "sha256", "serial"]),
                st.one_of(st.lists(st.one_of(REVOKED_STRINGS, st.text(max_size=6)), max_size=4), ANY_TOML),
                max_size=3,
            )
        )
    if draw(st.integers(0, 14)) == 0:
        doc[draw(st.text(max_size=8))] = draw(ANY_TOML)
    return doc


HEX = "0123456789abcdefABCDEF"
REVOKED_STRINGS = st.one_of(
    st.sampled_from(["0x1A2B", "0X1a", "1a:2b:3c", "1:2b", "ab:c", "0x", "", "1a2b:", "g1", "0x1a:2b", "١٢"]),
    st.text(alphabet=HEX + ":xX", min_size=1, max_size=70),
    st.lists(st.text(alphabet=HEX, min_size=2, max_size=2), min_size=1, max_size=33).map(":".join),
    st.text(alphabet=HEX, min_size=63, max_size=65),
)


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in HEX for c in text)


def _serial_ok(value: str) -> bool:
    """A serial as the policy module documents it: hex up to 20 bytes, 0x1a2b..., 1A2B... or 1a:2b:..."""
    body = value[2:] if value[:2] in ("0x", "0X") else value
    if ":" not in body:
        return _is_hex(body) and len(body) <= 40
    first, *rest = body.split(":")
    return (
        len(first) in (1, 2)
        and _is_hex(first)
        and 1 <= len(rest) <= 19
        and all(len(p) == 2 and _is_hex(p) for p in rest)
    )


def _sha256_ok(value: str) -> bool:
    """64 hex digits, plain or as AB:CD:... pairs."""
    pairs = value.split(":")
    return (len(value) == 64 and _is_hex(value)) or (
        len(pairs) == 32 and all(len(p) == 2 and _is_hex(p) for p in pairs)
    )


def _revoked_oracle(table: Any) -> bool:
    if not isinstance(table, dict) or set(table) - {"serials", "sha256"}:
        return False
    for key, ok in (("serials", _serial_ok), ("sha256", _sha256_ok)):
        if key in table:
            values = table[key]
            if not isinstance(values, list) or not all(isinstance(v, str) and ok(v) for v in values):
                return False
    return True


def _policy_oracle(doc: dict[str, Any]) -> bool:
    """Whether the format, as the policy module's docstring and DESIGN.md state it, accepts ``doc``."""
    if set(doc) - {"callers", "revoked"}:
        return False
    if "revoked" in doc and not _revoked_oracle(doc["revoked"]):
        return False
    entries = doc.get("callers", [])
    if not isinstance(entries, list):
        return False
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - set(RULE_KEYS):
            return False
        identity = entry.get("identity")
        if not isinstance(identity, str) or identity in ("", "*") or "*" in identity[:-1] or identity in seen:
            return False
        seen.add(identity)
        permissions, galleries = entry.get("permissions"), entry.get("galleries")
        if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
            return False
        if not set(permissions) <= {p.value for p in Permission}:
            return False
        if not isinstance(galleries, list) or not galleries or not all(isinstance(g, str) for g in galleries):
            return False
        if entry.get("disclosure", "decision") not in ("decision", "distance"):
            return False
        for key, kinds in (("rate", (int, float)), ("failures_per_hour", (int,)), ("identify_per_hour", (int,))):
            if key in entry:
                v = entry[key]
                if isinstance(v, bool) or not isinstance(v, kinds) or not 0 < v < 1e12:
                    return False
    return True


@_settings(200)
@given(doc=policy_document())
def test_structured_policy_parses_or_config_error(doc: dict[str, Any]) -> None:
    outcome = _parse_policy_or_config_error(toml_document(doc))
    expected_ok = _policy_oracle(doc)
    if isinstance(outcome, ConfigError):
        assert not expected_ok, f"a valid policy was refused: {outcome}"
        return
    assert expected_ok, "an invalid policy was accepted"
    assert len(outcome.rules) == len(doc.get("callers", []))


# --------------------------------------------------------------------------------- config parser


@pytest.fixture(scope="module")
def dev_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    import tomllib

    directory = tmp_path_factory.mktemp("fuzz-config") / "dev"
    init_dev(directory, listen="127.0.0.1:0")
    path = directory / "faceseal.toml"
    base = tomllib.loads(path.read_text(encoding="utf-8"))
    # A few optional tables, so mutations reach their keys too.
    base["guard"] = {"enabled": True, "caller_rate": 200.0, "lockout_seconds": 30.0, "lockout_max_seconds": 3600.0}
    base["server"].update(max_top_k=100, max_message_bytes=1 << 20, grace_seconds=10.0, max_workers=16)
    base["audit"]["max_bytes"] = 1 << 20
    return path, base


CONFIG_VALUES = st.sampled_from(
    [
        0,
        1,
        -1,
        0.5,
        1e-9,
        1e-10,
        1.999,
        2.0,
        4.0,
        4096,
        4097,
        1024,
        2**63 - 1,
        2**64,
        10**400,
        -(10**400),
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        "",
        "127.0.0.1:0",
        "[::1]:65535",
        "host:65536",
        "localhost:50051",
        "sqlite:",
        "sqlite:///",
        "sqlite:///tmp/x.db",
        "postgres://x",
        "euclidean",
        "cosine",
        "file",
        "pkcs11",
        "transit",
        "dev",
        "production",
        "http://127.0.0.1:8200",
        "https://h:1/",
        "faces",
        "nope",
        "/abs/path",
        "rel/\x00path",
        [],
        {},
    ]
)


def _paths(data: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


def _tables(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _tables(value, (*prefix, key))


def _at(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        data = data[key]
    return data


def _assert_config_sane(config: Config) -> None:
    assert config.mode in ("dev", "production")
    assert config.galleries
    assert config.default_gallery in config.galleries
    for name, gallery in config.galleries.items():
        assert GALLERY_NAME.fullmatch(name)
        assert gallery.name == name
        assert isinstance(gallery.dimension, int)
        assert 1 <= gallery.dimension <= MAX_DIMENSION
        assert gallery.metric in ("euclidean", "cosine")
        assert math.isfinite(gallery.threshold)
        assert gallery.threshold > 0
    s = config.server
    assert 1 <= s.max_top_k <= 10_000
    assert 1 <= s.max_workers <= 1024
    assert 1024 <= s.max_message_bytes <= 64 << 20
    assert math.isfinite(s.grace_seconds)
    assert s.grace_seconds >= 0
    g = config.guard
    for number in (g.subject_window_seconds, g.lockout_seconds, g.lockout_max_seconds, g.caller_rate):
        assert isinstance(number, float)
        assert math.isfinite(number)
        assert number > 0
    assert g.lockout_max_seconds >= g.lockout_seconds
    assert 0.0 <= g.similar_probe_fraction <= 1.0
    assert config.store.url.startswith("sqlite:")
    if config.seal.type == "file":
        assert config.mode == "dev"


@_settings(150)
@given(data=st.data())
def test_config_mutations_load_or_config_error(dev_config: tuple[Path, dict[str, Any]], data: st.DataObject) -> None:
    path, base = dev_config
    config = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["delete", "set", "set", "add"]), label="op")
        existing = list(_paths(config))
        if op in ("delete", "set") and existing:
            where = data.draw(st.sampled_from(existing), label="path")
            parent = _at(config, where[:-1])
            if op == "delete":
                del parent[where[-1]]
            else:
                parent[where[-1]] = data.draw(st.one_of(CONFIG_VALUES, ANY_TOML), label="value")
        else:
            parent = _at(config, data.draw(st.sampled_from(list(_tables(config))), label="table"))
            key = data.draw(st.one_of(st.sampled_from(["thresold", "seal", "x", "", "galleries"]), st.text(max_size=8)))
            parent[key] = data.draw(st.one_of(CONFIG_VALUES, ANY_TOML), label="value")
    path.write_text(toml_document(config), encoding="utf-8")
    loaded = outcome(lambda: load_config(path), ConfigError)
    if isinstance(loaded, ConfigError):
        assert str(loaded).startswith(str(path.resolve())), "a config error must name its file"
        return
    _assert_config_sane(loaded)


def test_unmutated_config_loads(dev_config: tuple[Path, dict[str, Any]]) -> None:
    """The fuzzer starts from a valid config, so what it finds is the mutations' doing."""
    path, base = dev_config
    path.write_text(toml_document(base), encoding="utf-8")
    _assert_config_sane(load_config(path))


# ------------------------------------------------------------------------- the daemon over mTLS

SMALL_DIM = 4  # a second gallery in which random vectors are often valid, so calls reach the core
OK = grpc.StatusCode.OK
DOCUMENTED = {
    OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
PROFILES = ("enroller", "gateway", "admin", "limited")
RIGHT_PROFILE = {"Enroll": "enroller", "Delete": "enroller", "Match": "gateway", "Identify": "gateway"}
FACES = random_encodings(4, seed=900)
SMALL = random_encodings(4, seed=901, dim=SMALL_DIM)
KNOWN = {("faces", f"known-{i}"): [float(v) for v in FACES[i]] for i in range(len(FACES))} | {
    ("small", f"known-{i}"): [float(v) for v in SMALL[i]] for i in range(len(SMALL))
}
KNOWN_SUBJECTS = sorted({s for _, s in KNOWN})
ZERO = [0.0] * DIM  # refused: an all-zero vector has no direction
FACE0, FACE1, FACE2 = (KNOWN["faces", f"known-{i}"] for i in range(3))
OVERSIZED = [0.5] * 300_000  # 1.2 MB: over the daemon's 1 MiB message limit


@dataclass(frozen=True)
class Call:
    method: str
    profile: str
    request: Any = field(repr=False)
    vector: list[float] = field(default_factory=list, repr=False)
    texts: tuple[str, ...] = ()

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        fields = {f.name: getattr(self.request, f.name) for f in self.request.DESCRIPTOR.fields}
        for name in ("encoding", "probe"):
            if name in fields:
                values = list(fields[name])
                fields[name] = values if len(values) <= 8 else f"<{len(values)} floats: {values[:4]}...>"
        for name in ("subject_id", "gallery"):
            if name in fields and len(fields[name]) > 40:
                fields[name] = fields[name][:20] + f"...<{len(fields[name])} chars>"
        return f"Call({self.method} as {self.profile}: {fields})"


WILD_GALLERIES = st.one_of(st.sampled_from(["nope", "Faces", "faces ", "small\x00"]), TEXT)
WILD_SUBJECTS = TEXT
VALID_SUBJECTS = st.one_of(
    st.sampled_from(KNOWN_SUBJECTS), st.from_regex(r"[A-Za-z0-9._:@-]{1,128}", fullmatch=True).filter(str.isascii)
)
TOP_K = st.one_of(
    st.integers(1, 100),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 2, 100, 101, 10_000, 2**31, 2**32 - 1]),
)


@st.composite
def wire_vectors(draw: st.DrawFn, dimension: int | None = None, gallery: str | None = None) -> list[float]:
    """A vector for the wire; ``dimension`` (the gallery's) makes the well-formed kinds likely."""
    kinds = ["known", "nice", "nice", "spiked", "zeros", "empty", "any-length", "any-values", "huge"]
    kind = draw(st.sampled_from(kinds))
    if dimension is None:
        dimension = draw(st.sampled_from([SMALL_DIM, DIM]))
    if kind == "known":
        known = sorted(v for (g, _), v in KNOWN.items() if gallery is None or g == (gallery or "faces"))
        return list(draw(st.sampled_from(known)))
    if kind == "nice":
        return draw(st.lists(NICE_FLOATS, min_size=dimension, max_size=dimension))
    if kind == "spiked":
        values = draw(st.lists(NICE_FLOATS, min_size=dimension, max_size=dimension))
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, dimension - 1))] = draw(st.sampled_from(SPECIAL_FLOATS))
        return values
    if kind == "zeros":
        return [draw(st.sampled_from([0.0, -0.0, 1e-50]))] * dimension
    if kind == "empty":
        return []
    if kind == "any-values":
        return draw(st.lists(FLOATS, min_size=dimension, max_size=dimension))
    if kind == "huge":
        return draw(st.sampled_from([OVERSIZED, [0.25] * 50_000, [3.4028235e38] * dimension, [1e-45] * dimension]))
    return draw(st.lists(FLOATS, max_size=300))


@st.composite
def calls(draw: st.DrawFn) -> Call:
    """Half the requests start well formed (a configured gallery, the right caller, a valid id, a
    vector of the gallery's dimension) and get at most one field made wild, so the fuzzing reaches
    the core and not only the first check; the other half are wild in every field."""
    method = draw(st.sampled_from(["Enroll", "Match", "Identify", "Delete"]))
    if draw(st.booleans()):
        gallery = draw(st.sampled_from(["", "faces", "small"]))
        profile = "limited" if gallery == "small" and draw(st.booleans()) else RIGHT_PROFILE[method]
        subject = draw(VALID_SUBJECTS)
        vector = draw(wire_vectors(SMALL_DIM if gallery == "small" else DIM, gallery))
        wild = draw(st.sampled_from(["none", "none", "profile", "gallery", "subject", "vector"]))
        if wild == "profile":
            profile = draw(st.sampled_from(PROFILES))
        elif wild == "gallery":
            gallery = draw(WILD_GALLERIES)
        elif wild == "subject":
            subject = draw(WILD_SUBJECTS)
        elif wild == "vector":
            vector = draw(wire_vectors())
    else:
        profile = draw(st.sampled_from(PROFILES))
        gallery = draw(st.one_of(st.sampled_from(["", "faces", "small"]), WILD_GALLERIES))
        subject = draw(st.one_of(VALID_SUBJECTS, WILD_SUBJECTS))
        vector = draw(wire_vectors())
    texts = (gallery, subject)
    request: Any
    if method == "Enroll":
        replace = draw(st.booleans())
        request = pb.EnrollRequest(gallery=gallery, subject_id=subject, encoding=vector, replace=replace)
    elif method == "Match":
        request = pb.MatchRequest(gallery=gallery, subject_id=subject, probe=vector)
    elif method == "Identify":
        request, texts = pb.IdentifyRequest(gallery=gallery, probe=vector, top_k=draw(TOP_K)), (gallery,)
    else:
        request, vector = pb.DeleteRequest(gallery=gallery, subject_id=subject), []
    return Call(method, profile, request, vector, texts)


def _distinctive_floats(values: list[float]) -> set[str]:
    """How a value of the request would look if a message echoed it (only ones unlikely by chance)."""
    out: set[str] = set()
    for value in values[:512]:
        with np.errstate(over="ignore"):
            as32 = np.float32(value)
        if not np.isfinite(as32) or float(as32).is_integer():
            continue
        for text in (str(as32), repr(float(as32)), repr(value)):
            digits = re.sub(r"[^0-9]", "", text.split("e")[0]).strip("0")
            if len(digits) >= 5:
                out.add(text)
    return out


def _assert_no_echo(call: Call, message: str) -> None:
    assert CANARY not in message, f"a message echoed an id or gallery name: {message!r}"
    for text in call.texts:
        if len(text) >= 12:
            assert text not in message, f"a message echoed an id or gallery name: {message!r}"
    for text in _distinctive_floats(call.vector):
        assert text not in message, f"a message echoed a vector value: {message!r}"


class Target:
    """A started daemon and a raw stub per caller profile."""

    def __init__(self, daemon: InProcessDaemon) -> None:
        self.daemon = daemon
        self.db = daemon.dev.db_path
        self.stubs = {p: daemon.stub(p) for p in PROFILES}

    def invoke(self, call: Call) -> tuple[grpc.StatusCode, Any, str]:
        stub: pb_grpc.FaceSealServiceStub = self.stubs[call.profile]
        try:
            response = getattr(stub, call.method)(call.request, timeout=15)
        except grpc.RpcError as err:
            return err.code(), None, err.details() or ""
        return OK, response, ""


def _prepare(harness: InProcessDaemon, guard: dict[str, Any]) -> Target:
    dev: Dev = harness.dev
    dev.add_gallery("small", dimension=SMALL_DIM, metric="cosine", threshold=0.3)
    dev.add_caller("limited", ["enroll", "match", "identify", "delete"], galleries=("small",))
    dev.edit_config(lambda c: c.setdefault("guard", {}).update(guard))
    target = Target(harness.start())
    for (gallery, subject), vector in KNOWN.items():
        target.stubs["enroller"].Enroll(pb.EnrollRequest(gallery=gallery, subject_id=subject, encoding=vector))
    return target


def _check_call(target: Target, call: Call, allowed: set[grpc.StatusCode], *, guard_on: bool) -> grpc.StatusCode:
    before, revision = db_snapshot(target.db), db_revision(target.db)
    code, response, message = target.invoke(call)
    assert code in allowed, f"undocumented status {code.name}: {message!r}"
    after = db_snapshot(target.db)
    if code is not OK:
        assert after == before, f"a refused call ({code.name}) changed the store"
        assert db_revision(target.db) == revision
        _assert_no_echo(call, message)
        return code
    if call.method in ("Enroll", "Delete"):
        assert db_revision(target.db) > revision, f"an acknowledged {call.method} did not reach the store"
    elif not guard_on:  # with the guard on, a non-match records a failure; otherwise reads write nothing
        assert after == before, f"a {call.method} changed the store"
    if call.method == "Enroll":
        assert response.subject_id == call.request.subject_id
        assert response.template_count >= 1
    if call.method == "Identify":
        assert len(response.candidates) <= call.request.top_k
    return code


def test_daemon_fuzz_guard_off(harness: InProcessDaemon) -> None:
    target = _prepare(harness, {"enabled": False})
    outcomes: Counter[tuple[str, str]] = Counter()

    @_settings(200, deadline=None)
    @given(call=calls())
    @example(call=Call("Enroll", "enroller", pb.EnrollRequest(subject_id="big", encoding=OVERSIZED), OVERSIZED))
    @example(call=Call("Enroll", "enroller", pb.EnrollRequest(subject_id="max", encoding=[3.4e38] * DIM)))
    @example(call=Call("Identify", "gateway", pb.IdentifyRequest(probe=[1e-45] * DIM, top_k=2**32 - 1)))
    @example(call=Call("Identify", "gateway", pb.IdentifyRequest(probe=list(FACES[0]), top_k=2**32 - 1)))
    # Every outcome the coverage check below requires, whatever the random draws reach: the draws
    # are derandomized, yet how many of them hypothesis runs varies from run to run.
    @example(call=Call("Match", "gateway", pb.MatchRequest(subject_id="nobody", probe=list(FACES[0])), list(FACES[0])))
    @example(call=Call("Delete", "enroller", pb.DeleteRequest(subject_id="nobody"), []))
    @example(call=Call("Enroll", "enroller", pb.EnrollRequest(subject_id="fresh", encoding=FACE1), FACE1))
    @example(call=Call("Enroll", "enroller", pb.EnrollRequest(subject_id="zero", encoding=ZERO), ZERO))
    @example(call=Call("Enroll", "gateway", pb.EnrollRequest(subject_id="fresh", encoding=FACE1), FACE1))
    @example(call=Call("Match", "gateway", pb.MatchRequest(subject_id="known-0", probe=FACE0), FACE0))
    @example(call=Call("Match", "gateway", pb.MatchRequest(subject_id="known-0", probe=ZERO), ZERO))
    @example(call=Call("Match", "enroller", pb.MatchRequest(subject_id="known-0", probe=FACE0), FACE0))
    @example(call=Call("Identify", "gateway", pb.IdentifyRequest(probe=FACE1, top_k=3), FACE1))
    @example(call=Call("Identify", "enroller", pb.IdentifyRequest(probe=FACE1, top_k=3), FACE1))
    @example(call=Call("Delete", "enroller", pb.DeleteRequest(subject_id="known-3"), []))
    @example(call=Call("Delete", "enroller", pb.DeleteRequest(subject_id=""), []))
    @example(call=Call("Delete", "gateway", pb.DeleteRequest(subject_id="known-1"), []))
    def run(call: Call) -> None:
        outcomes[call.method, _check_call(target, call, DOCUMENTED, guard_on=False).name] += 1

    run()
    assert health(harness.dev, harness.target) == "SERVING"
    # The examples reached every outcome worth reaching, not only the first refusal.
    for method in ("Enroll", "Match", "Identify", "Delete"):
        for code in ("OK", "INVALID_ARGUMENT", "PERMISSION_DENIED"):
            assert outcomes[method, code], (method, code, outcomes)
    for method, code in (("Match", "NOT_FOUND"), ("Delete", "NOT_FOUND")):
        assert outcomes[method, code], (method, code, outcomes)
    assert any(code == "RESOURCE_EXHAUSTED" for _, code in outcomes), outcomes  # the 1 MiB limit


def test_daemon_fuzz_guard_on(harness: InProcessDaemon) -> None:
    target = _prepare(
        harness,
        {
            "enabled": True,
            "caller_rate": 10.0,
            "subject_failures": 1,
            "caller_failures_per_hour": 10,
            "identify_per_hour": 5,
        },
    )
    outcomes: Counter[str] = Counter()

    @_settings(120, deadline=None)
    @given(call=calls())
    # Two impostor probes on one subject: whichever runs first is answered (a non-match, OK) and
    # with subject_failures = 1 the other is locked out, however fast or slow the machine is.
    @example(call=Call("Match", "gateway", pb.MatchRequest(subject_id="known-0", probe=FACE1), FACE1))
    @example(call=Call("Match", "gateway", pb.MatchRequest(subject_id="known-0", probe=FACE2), FACE2))
    def run(call: Call) -> None:
        outcomes[_check_call(target, call, DOCUMENTED, guard_on=True).name] += 1

    run()
    assert health(harness.dev, harness.target) == "SERVING"
    assert outcomes["OK"], outcomes
    assert outcomes["RESOURCE_EXHAUSTED"], outcomes


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A method and a request body that may not even be protobuf: random bytes, or a valid request
    with bytes flipped, cut off or inserted (which makes invalid UTF-8, bad lengths, bad tags)."""
    method = draw(st.sampled_from(["Enroll", "Match", "Identify", "Delete"]))
    if draw(st.booleans()):
        return method, draw(st.binary(max_size=600))
    valid = {
        "Enroll": pb.EnrollRequest(subject_id="known-1", encoding=list(FACES[1]), replace=True),
        "Match": pb.MatchRequest(subject_id="known-2", probe=list(FACES[2])),
        "Identify": pb.IdentifyRequest(probe=list(FACES[0]), top_k=3),
        "Delete": pb.DeleteRequest(subject_id="known-3"),
    }[method].SerializeToString()
    body = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body)))
        edit = draw(st.sampled_from(["flip", "cut", "insert"]))
        if edit == "flip" and at < len(body):
            body[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del body[at:]
        else:
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
    return method, bytes(body)


def test_daemon_fuzz_raw_bytes(harness: InProcessDaemon) -> None:
    """Request bodies that are not valid protobuf: INVALID_ARGUMENT (gRPC itself would say INTERNAL,
    before any of the daemon's code ran), or a documented code when the bytes happen to decode."""
    target = _prepare(harness, {"enabled": False})
    channel = harness.dev.channel(harness.target, "enroller")
    gateway = harness.dev.channel(harness.target, "gateway")
    outcomes: Counter[str] = Counter()

    @_settings(150, deadline=None)
    @given(case=raw_bodies())
    @example(case=("Enroll", b"\x12\x03\xff\xfe\xfd"))  # subject_id that is not UTF-8
    @example(case=("Match", b"\xff\xff\xff\xff"))
    def run(case: tuple[str, bytes]) -> None:
        method, body = case
        via = channel if method in ("Enroll", "Delete") else gateway
        call = via.unary_unary(f"/faceseal.v1.FaceSealService/{method}", lambda b: b, lambda b: b)
        before, revision = db_snapshot(target.db), db_revision(target.db)
        try:
            call(body, timeout=15)
            code = OK
        except grpc.RpcError as err:
            code = err.code()
        assert code in DOCUMENTED, f"undocumented status {code.name}"
        if code is not OK:
            assert db_snapshot(target.db) == before, f"a refused call ({code.name}) changed the store"
            assert db_revision(target.db) == revision
        outcomes[code.name] += 1

    run()
    assert health(harness.dev, harness.target) == "SERVING"
    assert outcomes["INVALID_ARGUMENT"], outcomes
