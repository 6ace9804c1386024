"""Who may do what: the policy file, parsed and evaluated. Pure: no I/O beyond reading the file.

Deny by default. A caller rule matches an identity exactly, or by prefix when its identity ends
in ``*``; an exact rule wins over any prefix, and a longer prefix over a shorter one, so a broad
``spiffe://corp/gateways/*`` grant can be narrowed for one named gateway.

The ``[revoked]`` table is a deny list of certificates, by serial number and by SHA-256
fingerprint: a listed certificate is refused before any rule is looked at, whatever it names.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from faceseal.server.errors import ConfigError, PermissionDenied

Disclosure = Literal["decision", "distance"]


class Permission(StrEnum):
    ENROLL = "enroll"
    MATCH = "match"
    IDENTIFY = "identify"
    DELETE = "delete"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[callers]]`` entry."""

    identity: str
    permissions: frozenset[Permission]
    galleries: frozenset[str]
    disclosure: Disclosure
    # Per-caller overrides of the guard's defaults; None means the [guard] default.
    rate: float | None = None
    failures_per_hour: int | None = None
    identify_per_hour: int | None = None

    def matches(self, identity: str) -> bool:
        if self.identity.endswith("*"):
            return identity.startswith(self.identity[:-1])
        return identity == self.identity

    def specificity(self) -> tuple[int, int]:
        return (0, len(self.identity)) if self.identity.endswith("*") else (1, len(self.identity))


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated peer and the rule that grants it rights."""

    identity: str
    rule: Rule

    @property
    def disclosure(self) -> Disclosure:
        return self.rule.disclosure

    def may(self, permission: Permission) -> bool:
        """Whether the caller holds ``permission`` on at least one gallery."""
        return permission in self.rule.permissions

    def authorize(self, permission: Permission, gallery: str) -> None:
        """Raise PermissionDenied unless the caller holds ``permission`` on ``gallery``."""
        if permission not in self.rule.permissions:
            raise PermissionDenied(f"this caller lacks the '{permission}' permission")
        if "*" not in self.rule.galleries and gallery not in self.rule.galleries:
            raise PermissionDenied(
                f"this caller may not use this gallery for '{permission}'", reason="gallery_not_allowed"
            )


@dataclass(frozen=True, slots=True)
class Revocations:
    """Certificates refused whatever they name: serial numbers (as integers) and SHA-256 digests."""

    serials: frozenset[int] = frozenset()
    sha256: frozenset[bytes] = frozenset()

    def __len__(self) -> int:
        return len(self.serials) + len(self.sha256)

    def revokes(self, serial: int, sha256: bytes) -> bool:
        return serial in self.serials or sha256 in self.sha256


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    revoked: Revocations = field(default_factory=Revocations)

    def resolve(self, identity: str) -> Caller | None:
        """The most specific rule for ``identity``, or None (the caller is unknown)."""
        matching = [r for r in self.rules if r.matches(identity)]
        if not matching:
            return None
        return Caller(identity, max(matching, key=Rule.specificity))


_RULE_KEYS = {"identity", "permissions", "galleries", "disclosure", "rate", "failures_per_hour", "identify_per_hour"}
_REVOKED_KEYS = {"serials", "sha256"}
# A serial as ``openssl x509 -serial`` (1A2B...), ``-text`` (1a:2b:...) or Python (0x1a2b...) prints
# it; RFC 5280 caps serials at 20 octets. A fingerprint as ``openssl x509 -fingerprint -sha256``
# prints it (AB:CD:...) or as 64 plain hex digits.
_SERIAL = re.compile(r"(?:0[xX])?(?:[0-9A-Fa-f]{1,40}|[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{2}){1,19})")
_SHA256 = re.compile(r"[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")


def parse_policy(text: str, source: str) -> Policy:
    """Parse policy TOML; raise ConfigError naming ``source`` and the entry on any problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nested too deeply") from None
    unknown = set(raw) - {"callers", "revoked"}
    if unknown:
        raise ConfigError(f"{source}: key '{sorted(unknown)[0]}' is not a known setting")
    entries = raw.get("callers", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: key 'callers' must be an array of tables ([[callers]])")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}: callers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        extra = set(entry) - _RULE_KEYS
        if extra:
            raise ConfigError(f"{where}: key '{sorted(extra)[0]}' is not a known setting")
        identity = _string(entry, "identity", where)
        if not identity or identity == "*":
            raise ConfigError(f"{where}: key 'identity' must name a caller or a prefix ending in '*'")
        if "*" in identity[:-1]:
            raise ConfigError(f"{where}: key 'identity' may hold '*' only at its end")
        if identity in seen:
            raise ConfigError(f"{where}: identity is listed twice")
        seen.add(identity)
        perms = _strings(entry, "permissions", where)
        try:
            permissions = frozenset(Permission(p) for p in perms)
        except ValueError:
            raise ConfigError(
                f"{where}: key 'permissions' may hold only {', '.join(p.value for p in Permission)}"
            ) from None
        galleries = frozenset(_strings(entry, "galleries", where))
        if not galleries:
            raise ConfigError(f"{where}: key 'galleries' must list at least one gallery, or \"*\"")
        disclosure = entry.get("disclosure", "decision")
        if disclosure not in ("decision", "distance"):
            raise ConfigError(f"{where}: key 'disclosure' must be 'decision' or 'distance'")
        rules.append(
            Rule(
                identity,
                permissions,
                galleries,
                disclosure,
                rate=_positive(entry, "rate", float, where),
                failures_per_hour=_positive(entry, "failures_per_hour", int, where),
                identify_per_hour=_positive(entry, "identify_per_hour", int, where),
            )
        )
    return Policy(tuple(rules), _revocations(raw.get("revoked", {}), source))


def _revocations(table: Any, source: str) -> Revocations:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: key 'revoked' must be a table ([revoked])")
    extra = set(table) - _REVOKED_KEYS
    if extra:
        raise ConfigError(f"{source}: key 'revoked.{sorted(extra)[0]}' is not a known setting")
    where = f"{source}: revoked"
    serials: set[int] = set()
    for i, value in enumerate(_strings(table, "serials", where, required=False)):
        if not _SERIAL.fullmatch(value):
            raise ConfigError(
                f"{where}.serials[{i}]: {value!r} is not a certificate serial number "
                "(hex, up to 20 bytes: 0x1a2b..., 1A2B... or 1a:2b:...)"
            )
        serials.add(int(value.replace(":", ""), 16))
    digests: set[bytes] = set()
    for i, value in enumerate(_strings(table, "sha256", where, required=False)):
        if not _SHA256.fullmatch(value):
            raise ConfigError(
                f"{where}.sha256[{i}]: {value!r} is not a SHA-256 certificate fingerprint "
                "(64 hex digits, plain or as AB:CD:... pairs)"
            )
        digests.add(bytes.fromhex(value.replace(":", "")))
    return Revocations(frozenset(serials), frozenset(digests))


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the policy file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the policy file is not UTF-8") from None
    return parse_policy(text, str(path))


def _positive(entry: dict[str, Any], key: str, kind: type[float] | type[int], where: str) -> Any:
    if key not in entry:
        return None
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{where}: key '{key}' must be a positive {kind.__name__}")
    if not 0 < value < 1e12:
        raise ConfigError(f"{where}: key '{key}' must be a positive {kind.__name__}")
    return kind(value)


def _string(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' must be a string")
    return value


def _strings(entry: dict[str, Any], key: str, where: str, *, required: bool = True) -> Iterable[str]:
    if not required and key not in entry:
        return []
    value = entry.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: key '{key}' must be a list of strings")
    return value
