"""Who may do what: deny by default, the most specific rule wins, and a broken policy file is
refused with a message that says where."""

from __future__ import annotations

from pathlib import Path

import pytest

from faceseal.server import pki
from faceseal.server.auth.identity import identity_from_pem, identity_of
from faceseal.server.auth.policy import Caller, Permission, Policy, load_policy, parse_policy
from faceseal.server.devinit import init_dev
from faceseal.server.errors import ConfigError, PermissionDenied

SOURCE = "/etc/faceseal/policy-under-test.toml"


def _rule(identity: str, permissions: list[str], galleries: list[str], disclosure: str | None = None) -> str:
    text = f"[[callers]]\nidentity = {identity!r}\npermissions = {permissions!r}\ngalleries = {galleries!r}\n"
    if disclosure is not None:
        text += f"disclosure = {disclosure!r}\n"
    return text


def _policy(*rules: str) -> Policy:
    return parse_policy("\n".join(rules), SOURCE)


def _resolve(policy: Policy, identity: str) -> Caller:
    caller = policy.resolve(identity)
    assert caller is not None, identity
    return caller


# -- deny by default ------------------------------------------------------------------------------


def test_unknown_identity_is_nobody() -> None:
    policy = _policy(_rule("spiffe://corp/gw/a", ["match"], ["*"]), _rule("spiffe://corp/enr/*", ["enroll"], ["*"]))
    for stranger in (
        "spiffe://corp/gw/b",
        "spiffe://corp/gw/a/x",
        "spiffe://corp/gw/",
        "spiffe://corp/enr",
        "spiffe://corp/enrx/1",
        "SPIFFE://CORP/GW/A",
        "",
        "*",
    ):
        assert policy.resolve(stranger) is None, stranger


def test_empty_policy_denies_everyone() -> None:
    assert parse_policy("", SOURCE).resolve("spiffe://corp/admin") is None


def test_caller_with_no_permissions_is_denied_everything() -> None:
    caller = _resolve(_policy(_rule("svc", [], ["*"])), "svc")
    for permission in Permission:
        assert not caller.may(permission)
        with pytest.raises(PermissionDenied):
            caller.authorize(permission, "faces")


# -- the most specific rule wins -------------------------------------------------------------------

EXACT_AND_PREFIX = [
    _rule("spiffe://corp/gw/*", ["match", "identify"], ["*"], "distance"),
    _rule("spiffe://corp/gw/kiosk-7", ["match"], ["lobby"]),
]


@pytest.mark.parametrize("rules", [EXACT_AND_PREFIX, EXACT_AND_PREFIX[::-1]], ids=["prefix-first", "exact-first"])
def test_exact_rule_beats_prefix(rules: list[str]) -> None:
    policy = _policy(*rules)
    kiosk = _resolve(policy, "spiffe://corp/gw/kiosk-7")
    kiosk.authorize(Permission.MATCH, "lobby")
    with pytest.raises(PermissionDenied):
        kiosk.authorize(Permission.IDENTIFY, "lobby")
    with pytest.raises(PermissionDenied):
        kiosk.authorize(Permission.MATCH, "vault-door")
    assert kiosk.disclosure == "decision"
    other = _resolve(policy, "spiffe://corp/gw/kiosk-8")
    other.authorize(Permission.IDENTIFY, "vault-door")
    assert other.disclosure == "distance"


@pytest.mark.parametrize("prefix", ["spiffe://corp/gw/kiosk-7*", "spiffe://corp/gw/kiosk-*"])
def test_exact_rule_beats_a_prefix_as_long_or_longer(prefix: str) -> None:
    """Specificity is exact-before-prefix first, length second: 'kiosk-7*' does not outrank 'kiosk-7'."""
    for rules in ([prefix, "spiffe://corp/gw/kiosk-7"], ["spiffe://corp/gw/kiosk-7", prefix]):
        policy = _policy(
            *(_rule(r, ["match"], ["lobby"]) if not r.endswith("*") else _rule(r, ["admin"], ["*"]) for r in rules)
        )
        kiosk = _resolve(policy, "spiffe://corp/gw/kiosk-7")
        assert not kiosk.may(Permission.ADMIN)
        kiosk.authorize(Permission.MATCH, "lobby")
        assert _resolve(policy, "spiffe://corp/gw/kiosk-70").may(Permission.ADMIN)


PREFIXES = [
    _rule("spiffe://corp/*", ["admin"], ["*"]),
    _rule("spiffe://corp/gw/*", ["match"], ["faces"]),
    _rule("spiffe://corp/gw/eu/*", ["identify"], ["faces"]),
]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_longer_prefix_beats_shorter(order: list[int]) -> None:
    policy = _policy(*(PREFIXES[i] for i in order))
    expect = {
        "spiffe://corp/ops/alice": Permission.ADMIN,
        "spiffe://corp/gw/us-1": Permission.MATCH,
        "spiffe://corp/gw/eu/fr-1": Permission.IDENTIFY,
    }
    for identity, permission in expect.items():
        caller = _resolve(policy, identity)
        assert caller.rule.permissions == frozenset({permission}), identity
        assert caller.identity == identity


# -- authorize -------------------------------------------------------------------------------------


def test_authorize_checks_permission_and_gallery() -> None:
    caller = _resolve(_policy(_rule("svc", ["enroll", "delete"], ["faces", "staff"])), "svc")
    caller.authorize(Permission.ENROLL, "faces")
    caller.authorize(Permission.DELETE, "staff")
    assert caller.may(Permission.ENROLL)
    assert not caller.may(Permission.MATCH)
    with pytest.raises(PermissionDenied):
        caller.authorize(Permission.MATCH, "faces")
    with pytest.raises(PermissionDenied):
        caller.authorize(Permission.ENROLL, "visitors")
    with pytest.raises(PermissionDenied):
        caller.authorize(Permission.ENROLL, "*")  # a gallery named "*" is not a wildcard request
    with pytest.raises(PermissionDenied):
        caller.authorize(Permission.ADMIN, "faces")


def test_star_galleries_allow_any_gallery_but_not_other_permissions() -> None:
    caller = _resolve(_policy(_rule("svc", ["match"], ["*"])), "svc")
    for gallery in ("faces", "staff", "x.y-z_1"):
        caller.authorize(Permission.MATCH, gallery)
    with pytest.raises(PermissionDenied):
        caller.authorize(Permission.IDENTIFY, "faces")


def test_disclosure_defaults_to_decision() -> None:
    policy = _policy(_rule("a", ["match"], ["*"]), _rule("b", ["match"], ["*"], "distance"))
    assert _resolve(policy, "a").disclosure == "decision"
    assert _resolve(policy, "b").disclosure == "distance"


def test_permission_denied_message_does_not_name_other_galleries() -> None:
    caller = _resolve(_policy(_rule("svc", ["match"], ["secret-gallery-name"])), "svc")
    with pytest.raises(PermissionDenied) as info:
        caller.authorize(Permission.MATCH, "faces")
    assert "secret-gallery-name" not in str(info.value)


def test_dev_policy_is_least_privilege(tmp_path: Path) -> None:
    init_dev(tmp_path)
    policy = load_policy(tmp_path / "policy.toml")
    enroller = _resolve(policy, "spiffe://faceseal.dev/enroller")
    gateway = _resolve(policy, "spiffe://faceseal.dev/gateway")
    admin = _resolve(policy, "spiffe://faceseal.dev/admin")
    # Each role holds something, and nothing beyond its job.
    assert enroller.rule.permissions
    assert enroller.rule.permissions <= {Permission.ENROLL, Permission.DELETE}
    assert gateway.rule.permissions
    assert gateway.rule.permissions <= {Permission.MATCH, Permission.IDENTIFY}
    assert admin.rule.permissions == {Permission.ADMIN}
    assert gateway.disclosure == "decision"
    assert policy.resolve("spiffe://faceseal.dev/someone-else") is None


# -- malformed policies ---------------------------------------------------------------------------

GOOD_ENTRY = _rule("spiffe://corp/ok", ["match"], ["*"])

MALFORMED: list[tuple[str, str, str]] = [
    ("not-toml", "[[callers]\nidentity = ", ""),
    ("unknown-top-level-key", 'caller = "x"\n', "caller"),
    ("callers-not-array", 'callers = "everyone"\n', "callers"),
    ("callers-entry-not-table", "callers = [1, 2]\n", "callers[0]"),
    ("unknown-entry-key", _rule("svc", ["match"], ["*"]) + "permission = ['admin']\n", "callers[0]"),
    ("identity-missing", "[[callers]]\npermissions = ['match']\ngalleries = ['*']\n", "callers[0]"),
    (
        "identity-not-string",
        "[[callers]]\nidentity = 7\npermissions = ['match']\ngalleries = ['*']\n",
        "callers[0]",
    ),
    ("identity-empty", _rule("", ["match"], ["*"]), "callers[0]"),
    ("identity-star-alone", _rule("*", ["match"], ["*"]), "callers[0]"),
    ("identity-star-inside", _rule("spiffe://*/gw", ["match"], ["*"]), "callers[0]"),
    ("identity-two-stars", _rule("spiffe://corp/**", ["match"], ["*"]), "callers[0]"),
    ("identity-twice", GOOD_ENTRY + _rule("spiffe://corp/ok", ["identify"], ["*"]), "callers[1]"),
    ("permissions-missing", "[[callers]]\nidentity = 'svc'\ngalleries = ['*']\n", "callers[0]"),
    (
        "permissions-not-list",
        "[[callers]]\nidentity = 'svc'\npermissions = 'match'\ngalleries = ['*']\n",
        "callers[0]",
    ),
    ("permissions-unknown", _rule("svc", ["match", "read"], ["*"]), "callers[0]"),
    ("permissions-wrong-case", _rule("svc", ["Match"], ["*"]), "callers[0]"),
    (
        "permissions-non-string",
        "[[callers]]\nidentity = 'svc'\npermissions = [1]\ngalleries = ['*']\n",
        "callers[0]",
    ),
    ("galleries-missing", "[[callers]]\nidentity = 'svc'\npermissions = ['match']\n", "callers[0]"),
    ("galleries-empty", _rule("svc", ["match"], []), "callers[0]"),
    (
        "galleries-not-list",
        "[[callers]]\nidentity = 'svc'\npermissions = ['match']\ngalleries = '*'\n",
        "callers[0]",
    ),
    ("disclosure-unknown", _rule("svc", ["match"], ["*"], "full"), "callers[0]"),
    ("disclosure-not-string", _rule("svc", ["match"], ["*"]) + "disclosure = true\n", "callers[0]"),
    ("second-entry-broken", GOOD_ENTRY + _rule("svc", ["fly"], ["*"]), "callers[1]"),
]


@pytest.mark.parametrize(("text", "where"), [(t, w) for _, t, w in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_policy_names_source_and_entry(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(text, SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE), message
    assert where in message, message


def test_load_policy_names_a_missing_or_undecodable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(info.value)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[[callers]]\nidentity = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_policy(latin)
    assert str(latin) in str(info.value)


# -- identity from a certificate -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.make_ca("policy test CA")


def test_identity_prefers_spiffe(ca: pki.Issued) -> None:
    cert = pki.issue_client(ca, "cn-name", spiffe_id="spiffe://corp/gw/a", dns_names=["gw-a.corp.example"])
    assert identity_of(cert.cert) == "spiffe://corp/gw/a"
    assert identity_from_pem(cert.cert_pem()) == "spiffe://corp/gw/a"


def test_identity_falls_back_to_first_dns_name(ca: pki.Issued) -> None:
    cert = pki.issue_client(ca, "cn-name", dns_names=["gw-a.corp.example", "gw-b.corp.example"])
    assert identity_of(cert.cert) == "gw-a.corp.example"


def test_non_spiffe_uri_is_not_an_identity(ca: pki.Issued) -> None:
    cert = pki.issue_client(ca, "cn-name", spiffe_id="https://corp.example/gw", dns_names=["gw.corp.example"])
    assert identity_of(cert.cert) == "gw.corp.example"
    only_uri = pki.issue_client(ca, "cn-name", spiffe_id="https://corp.example/gw")
    assert identity_of(only_uri.cert) == "cn-name"


def test_identity_falls_back_to_cn(ca: pki.Issued) -> None:
    cert = pki.issue_client(ca, "gateway-cn")
    assert identity_of(cert.cert) == "gateway-cn"


def test_identity_feeds_the_policy(ca: pki.Issued) -> None:
    policy = _policy(_rule("spiffe://corp/gw/*", ["match"], ["*"]), _rule("gw.corp.example", ["identify"], ["*"]))
    by_spiffe = pki.issue_client(ca, "gw.corp.example", spiffe_id="spiffe://corp/gw/1", dns_names=["gw.corp.example"])
    caller = _resolve(policy, identity_of(by_spiffe.cert) or "")
    assert caller.may(Permission.MATCH)
    assert not caller.may(Permission.IDENTIFY)
