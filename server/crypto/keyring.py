"""Data-key versions held in memory after the seal unwrapped them.

Like Vault's keyring, adding a version returns a new keyring rather than mutating the one that
concurrent requests may be reading. Key bytes never appear in a repr, so an exception or a log
line that formats a keyring cannot leak them.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NoReturn

KEY_BYTES = 32


class SecretKey:
    """32 bytes of key material that refuse to be printed."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        self._material = bytes(material)

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def reveal(self) -> bytes:
        """The raw bytes, for the cipher and the seal only. The name is meant to stand out in review."""
        return self._material

    def __repr__(self) -> str:
        return "SecretKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material is not serialisable")


@dataclass(frozen=True)
class Keyring:
    """Immutable map of data-key versions plus the index key that names subjects in the store.

    ``active`` is the version new blobs are sealed with: always the newest.
    """

    index_key: SecretKey
    data_keys: Mapping[int, SecretKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.data_keys:
            raise ValueError("a keyring holds at least one data key")
        object.__setattr__(self, "data_keys", MappingProxyType(dict(self.data_keys)))

    @property
    def active(self) -> int:
        return max(self.data_keys)

    def key(self, version: int) -> SecretKey | None:
        return self.data_keys.get(version)

    def versions(self) -> list[int]:
        return sorted(self.data_keys)

    def with_version(self, version: int, key: SecretKey) -> Keyring:
        if version in self.data_keys:
            raise ValueError("key version already present")
        return Keyring(self.index_key, {**self.data_keys, version: key})

    def without_version(self, version: int) -> Keyring:
        remaining = {v: k for v, k in self.data_keys.items() if v != version}
        return Keyring(self.index_key, remaining)

    def __repr__(self) -> str:
        return f"Keyring(versions={self.versions()}, active={self.active})"
