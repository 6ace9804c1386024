"""The daemon's exception tree; every layer raises these, and only ``api.errors`` turns them into codes.

::

    FaceSealError                  base; its message is safe to show a caller
    ├── InvalidArgument            malformed request (bad vector, id, gallery name, top_k)
    ├── Unauthenticated            the certificate maps to no caller in the policy
    ├── PermissionDenied           the caller may not call this method on this gallery
    ├── NotFound                   unknown subject or gallery
    ├── FailedPrecondition         the system is not in a state for this (retiring a key still in use)
    ├── ResourceExhausted          over a rate, a budget or a lockout; carries a retry delay
    ├── IntegrityError             a stored blob failed to open: tampered, moved or its key retired
    ├── Unavailable                cannot answer now; retrying later may work
    │   └── Sealed                 the keyring is not unwrapped (the seal is unreachable)
    └── ConfigError                a configuration or policy file is wrong (raised at start / reload)

Messages are written for developers, in plain English, and never carry the caller's data: no
encoding, probe, distance, key or subject id. That rule is why constructors take fixed text from
the call site rather than formatting request values in.
"""

from __future__ import annotations


class FaceSealError(Exception):
    """Base of every error the daemon raises on purpose."""


class InvalidArgument(FaceSealError):
    """The request is malformed; nothing was stored or compared."""


class Unauthenticated(FaceSealError):
    """The peer proved a certificate from our CA but the policy names no such caller."""


class PermissionDenied(FaceSealError):
    """The caller is known but may not do this. ``reason`` is a fixed word for the metrics."""

    def __init__(self, message: str, reason: str = "no_permission") -> None:
        super().__init__(message)
        self.reason = reason


class NotFound(FaceSealError):
    """The subject or gallery does not exist."""


class FailedPrecondition(FaceSealError):
    """The request is valid but the system's state forbids it; retrying as is will not help."""


class ResourceExhausted(FaceSealError):
    """The caller must wait; ``retry_after`` says how long, in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IntegrityError(FaceSealError):
    """A stored blob did not open. One opaque error for every cause, as Fernet's InvalidToken."""


class Unavailable(FaceSealError):
    """The daemon cannot answer now; the caller should retry."""


class Sealed(Unavailable):
    """The keyring is still wrapped because the seal has not answered."""


class ConfigError(FaceSealError):
    """A configuration or policy file is invalid; the message names the file and the key."""
