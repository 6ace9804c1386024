"""docs/configuration.md and the code agree: every key the code accepts is documented under its
section, with a type, a default and a meaning, and every documented key is accepted.

How: the documentation's tables are parsed into {section: keys}. From them a configuration with
*every* documented key is built (the documented default as its value, or a sample for the
required ones) for each seal type, and loaded while ``_Table.get`` records each key the loader
reads. The load must succeed (so no documented key is unknown to the code: unknown keys are
errors), and the keys read must be exactly the documented ones. A static scan of config.py adds
the keys the loader reads only under a condition. The policy file's keys are checked against the
sets its parser accepts, and a policy with every documented key must parse."""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from helpers import dump_toml

from faceseal.server import config as config_module
from faceseal.server.auth import policy as policy_module
from faceseal.server.auth.policy import parse_policy
from faceseal.server.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
SEAL_TYPES = ("file", "pkcs11", "transit")
TABLES = ("server", "store", "seal", "galleries", "audit", "metrics", "guard")

# Values for keys that have no default (the documentation says "required" or "none").
SAMPLES: dict[str, Any] = {
    "default_gallery": "faces",
    "server.tls_cert": "server.crt",
    "server.tls_key": "server.key",
    "server.client_ca": "ca.crt",
    "server.policy": "policy.toml",
    "seal.type": "file",  # each seal section is loaded with its own type
    "seal.key_file": "seal.key",
    "seal.module": "/usr/lib/softhsm/libsofthsm2.so",
    "seal.token_label": "faceseal",
    "seal.key_label": "kek",
    "seal.pin_file": "pin",
    "seal.address": "https://bao.internal:8200",
    "seal.key_name": "faceseal-kek",
    "seal.token_file": "bao-token",
    "seal.ca_cert": "bao-ca.crt",
    "galleries.NAME.dimension": 128,
    "galleries.NAME.metric": "euclidean",
    "galleries.NAME.threshold": 0.6,
    "metrics.tls_cert": "metrics.crt",
    "metrics.tls_key": "metrics.key",
    "callers.identity": "spiffe://corp/gateway",
    "callers.permissions": ["match"],
    "callers.galleries": ["*"],
    "callers.rate": 50.0,
    "callers.failures_per_hour": 100,
    "callers.identify_per_hour": 10,
    "revoked.serials": ["0x1a2b"],
    "revoked.sha256": ["ab" * 32],
}

_ROW = re.compile(r"^\|\s*`([A-Za-z0-9_]+)`\s*\|(.*)\|\s*$")


@pytest.fixture(scope="module")
def doc() -> dict[str, dict[str, list[str]]]:
    """{section: {key: [type, default, meaning]}} from the documentation's tables.

    Sections: "" (top level), "server", "store", "seal:file|pkcs11|transit", "galleries.NAME",
    "audit", "metrics", "guard", and "policy:callers", "policy:revoked"."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(dict)
    part, section = "config", None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            if line.startswith("## faceseal.toml"):
                part = "config"
            elif "(policy.toml)" in line:
                part = "policy"
            else:
                part = "other"  # prose sections: no key tables
            section = None
        elif line.startswith("### "):
            section = _section(line[4:], part)
        elif (row := _ROW.match(line)) and section is not None:
            cells = [c.strip() for c in row.group(2).split("|")]
            assert len(cells) == 3, f"{line!r}: a key row has type, default and meaning"
            assert all(cells), f"{line!r}: an empty cell"
            assert row.group(1) not in sections[section], f"{row.group(1)} is documented twice in {section}"
            sections[section][row.group(1)] = cells
    return dict(sections)


def _section(title: str, part: str) -> str | None:
    if part == "other":
        return None
    if part == "policy":
        found = re.search(r"`\[\[?([a-z]+)\]\]?`", title)
        assert found, f"policy section {title!r} should name its table, like `[revoked]`"
        return f"policy:{found.group(1)}"
    if title.strip() == "Top level":
        return ""
    found = re.search(r"`\[([A-Za-z.]+)\]`(?:, `type = \"([a-z0-9]+)\"`)?", title)
    assert found, f"config section {title!r} should name its table, like `[server]`"
    return f"{found.group(1)}:{found.group(2)}" if found.group(2) else found.group(1)


def _value(section: str, key: str, default_cell: str) -> Any:
    """The documented default as a TOML value, or the sample for a key without one."""
    table = section.split(":")[0]
    dotted = f"{table}.{key}" if table else key
    if dotted in SAMPLES:
        return SAMPLES[dotted]
    literal = re.match(r"`([^`]+)`", default_cell)
    assert literal, f"{dotted}: document a default as `value`, or add a sample to SAMPLES"
    return tomllib.loads(f"v = {literal.group(1)}")["v"]


def _config(doc: dict[str, dict[str, list[str]]], seal_type: str) -> dict[str, Any]:
    """A faceseal.toml holding every documented key, with this seal type."""
    out: dict[str, Any] = {}
    for section, keys in doc.items():
        if section.startswith("policy:"):
            continue
        values = {k: _value(section, k, cells[1]) for k, cells in keys.items()}
        if section == "":
            out.update(values)
        elif section.startswith("seal:"):
            if section == f"seal:{seal_type}":
                out["seal"] = values | {"type": seal_type}
        elif section == "galleries.NAME":
            out["galleries"] = {"faces": values}
        else:
            out[section] = values
    if seal_type == "file":
        out["mode"] = "dev"  # the file seal is refused elsewhere
    return out


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """(table, key) of every scalar key the config loader reads (sub-tables left out)."""
    seen: set[tuple[str, str]] = set()
    original = config_module._Table.get

    def get(self: Any, key: str, kind: type, default: Any = ...) -> Any:
        if kind is not dict:
            seen.add((self.name, key))
        return original(self, key, kind, default)

    monkeypatch.setattr(config_module._Table, "get", get)
    return seen


def _normalise(table: str, seal_type: str) -> str:
    if table.startswith("galleries."):
        return "galleries.NAME"
    if table == "seal":
        return f"seal:{seal_type}"
    return table


def test_the_documentation_has_every_section(doc: dict[str, dict[str, list[str]]]) -> None:
    expected = {"", "server", "store", "galleries.NAME", "audit", "metrics", "guard"}
    expected |= {f"seal:{t}" for t in SEAL_TYPES} | {"policy:callers", "policy:revoked"}
    assert set(doc) == expected


@pytest.mark.parametrize("seal_type", SEAL_TYPES)
def test_every_documented_key_is_accepted_and_every_accepted_key_documented(
    doc: dict[str, dict[str, list[str]]], reads: set[tuple[str, str]], seal_type: str, tmp_path: Path
) -> None:
    path = tmp_path / "faceseal.toml"
    path.write_text(dump_toml(_config(doc, seal_type)), encoding="utf-8")
    load_config(path)  # a documented key the code does not know would be "not a known setting"

    read: dict[str, set[str]] = defaultdict(set)
    for table, key in reads:
        read[_normalise(table, seal_type)].add(key)
    documented = {s: set(keys) for s, keys in doc.items() if not s.startswith("policy:")}
    documented = {s: k for s, k in documented.items() if not s.startswith("seal:") or s == f"seal:{seal_type}"}
    undocumented = {s: sorted(k - documented.get(s, set())) for s, k in read.items() if k - documented.get(s, set())}
    assert not undocumented, f"keys the code reads but docs/configuration.md does not document: {undocumented}"
    unread = {s: sorted(k - read.get(s, set())) for s, k in documented.items() if k - read.get(s, set())}
    assert not unread, f"keys docs/configuration.md documents but the code never reads: {unread}"


def test_keys_read_only_under_a_condition_are_documented_too(doc: dict[str, dict[str, list[str]]]) -> None:
    """A static net under the dynamic test: any quoted key name config.py passes to the loader's
    helpers, or tests with ``in X.data``, must be documented in some section."""
    source = Path(config_module.__file__).read_text(encoding="utf-8")
    patterns = (
        r"\.(?:get|path|table)\(\s*\"([a-z_]+)\"",
        r"_bounded\(\s*\w+,\s*\"([a-z_]+)\"",
        r"\"([a-z_]+)\" in \w+\.data",
    )
    named = {key for pattern in patterns for key in re.findall(pattern, source)}
    assert {"listen", "tls_cert", "key_file", "max_workers"} <= named  # the scan itself works
    everywhere = {key for section, keys in doc.items() if not section.startswith("policy:") for key in keys}
    missing = sorted(named - everywhere - set(TABLES))
    assert not missing, f"config.py reads keys docs/configuration.md does not document: {missing}"


def test_policy_keys_match_the_documentation(doc: dict[str, dict[str, list[str]]]) -> None:
    assert set(doc["policy:callers"]) == policy_module._RULE_KEYS
    assert set(doc["policy:revoked"]) == policy_module._REVOKED_KEYS
    caller = {k: _value("callers", k, cells[1]) for k, cells in doc["policy:callers"].items()}
    revoked = {k: _value("revoked", k, cells[1]) for k, cells in doc["policy:revoked"].items()}
    text = "[[callers]]\n" + dump_toml(caller) + "\n" + dump_toml({"revoked": revoked})
    policy = parse_policy(text, "policy.toml")  # every documented key together is accepted
    assert len(policy.rules) == 1
    assert len(policy.revoked) == 2


def test_the_policy_file_has_no_other_top_level_tables(doc: dict[str, dict[str, list[str]]]) -> None:
    tables = {section.removeprefix("policy:") for section in doc if section.startswith("policy:")}
    assert tables == {"callers", "revoked"}
    with pytest.raises(Exception, match="is not a known setting"):
        parse_policy("[unheard]\nx = 1\n", "policy.toml")
