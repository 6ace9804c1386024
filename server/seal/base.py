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

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        """Wrap under the newest KEK version; the output names that version."""
        ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Unwrap with whichever KEK version ``wrapped`` names, if the seal still has it."""
        ...

    def rotate(self) -> None:
        """Create a new KEK version for ``wrap``; older versions still unwrap until retired."""
        ...

    def retire_previous(self) -> None:
        """Destroy every KEK version but the newest.

        This is what makes crypto-shredding reach old backups: a backup's keyring was wrapped
        under a KEK version that no longer exists, so the data keys retired since cannot be
        recovered from it. Call it only after everything still needed is re-wrapped.
        """
        ...
