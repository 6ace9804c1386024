"""The seal: the narrowest interface in the daemon (after go-kms-wrapping's wrapper).

A seal wraps and unwraps data keys with a key-encryption key (KEK) it keeps to itself. It never
sees a template. ``aad`` binds a wrapped key to its purpose and version, so a wrapped key copied
to another keyring slot fails to unwrap.
"""

from __future__ import annotations

from typing import Protocol

from faceseal.server.errors import FaceSealError


class SealError(FaceSealError):
    """The seal could not wrap or unwrap: unreachable, wrong KEK, or a tampered wrapped key."""


class SealUnreachable(SealError):
    """The seal did not answer; retrying later may work (HSM or KMS down)."""


class Seal(Protocol):
    """Wraps data keys under a KEK that never leaves the seal."""

    def describe(self) -> str:
        """A one-line, secret-free description for logs and status (e.g. ``file:/etc/faceseal/seal.key``)."""
        ...

    def wrap(self, key: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...
