"""The admin client: the daemon's state and its data-key lifecycle (permission ``admin``).

::

    from faceseal.client import AdminClient

    with AdminClient.from_profile("admin") as admin:
        old = admin.status().active_version
        admin.rotate_key()
        for progress in admin.rewrap():
            print(f"{progress.done}/{progress.total}")
        admin.retire_key(old)

Rotate, rewrap, retire is the whole crypto-shredding sequence: after ``retire_key`` the old
data key is destroyed and, because the daemon also rotates its key-encryption key, no backup
taken before can be unwrapped any more.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from faceseal.client._client import Connection
from faceseal.client._errors import from_rpc_error
from faceseal.v1 import admin_pb2, admin_pb2_grpc


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One data-key version and how many stored templates it seals."""

    version: int
    template_count: int
    active: bool  # the version new templates are sealed with


@dataclass(frozen=True, slots=True)
class GalleryStatus:
    name: str
    dimension: int
    metric: str  # "euclidean" or "cosine"
    subject_count: int
    template_count: int


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot of the daemon. While ``sealed`` it knows no keys and no galleries yet."""

    sealed: bool
    key_versions: tuple[KeyVersion, ...]
    galleries: tuple[GalleryStatus, ...]

    @property
    def active_version(self) -> int | None:
        """The version new templates are sealed with (None while sealed)."""
        return next((k.version for k in self.key_versions if k.active), None)


@dataclass(frozen=True, slots=True)
class RewrapProgress:
    """``done`` of ``total`` templates re-sealed under ``target_version`` so far in this run."""

    done: int
    total: int
    target_version: int


class AdminClient(Connection):
    """Key administration over the same mutual-TLS channel setup as ``FaceSealClient``.

    Every method raises a :class:`~faceseal.client.FaceSealClientError` subclass on failure:
    ``PermissionDeniedError`` for a certificate without the ``admin`` permission,
    ``UnavailableError`` while the daemon is sealed (``status`` still answers then).
    """

    def _bind(self, channel: grpc.Channel) -> None:
        self._admin = admin_pb2_grpc.FaceSealAdminServiceStub(channel)

    def status(self, *, timeout: float | None = None) -> Status:
        response = self._call(self._admin.GetStatus, admin_pb2.GetStatusRequest(), timeout)
        return Status(
            sealed=response.sealed,
            key_versions=tuple(KeyVersion(k.version, k.template_count, k.active) for k in response.key_versions),
            galleries=tuple(
                GalleryStatus(g.name, g.dimension, g.metric, g.subject_count, g.template_count)
                for g in response.galleries
            ),
        )

    def rotate_key(self, *, timeout: float | None = None) -> int:
        """Add a data-key version and make it active; return its number. Old blobs keep theirs."""
        return self._call(self._admin.RotateKey, admin_pb2.RotateKeyRequest(), timeout).version

    def rewrap(self, *, timeout: float | None = None) -> Iterator[RewrapProgress]:
        """Re-seal every template not under the active version, yielding progress.

        The call starts at once; iterate to the end: the first item has ``done == 0`` and the
        last ``done == total`` unless some template failed to open (the daemon raised an
        integrity alarm for it and it keeps its old version). A rerun picks up only what is left,
        so an interrupted rewrap is simply run again. ``timeout`` bounds the whole stream; by
        default there is none, since a large store takes a while. Leaving the loop early cancels
        the call (the template being re-sealed at that moment is finished or untouched).
        """
        call = self._admin.Rewrap(admin_pb2.RewrapRequest(), timeout=timeout)
        return _progress(call)

    def retire_key(self, version: int, *, timeout: float | None = None) -> None:
        """Destroy a data-key version for good.

        Refused with ``FailedPreconditionError`` for the active version and while any template
        still uses it (run :meth:`rewrap` first); ``NotFoundError`` if there is no such version.
        """
        if not 0 < version < 2**32:
            raise ValueError(f"a key version is a positive 32-bit number, not {version}")
        self._call(self._admin.RetireKey, admin_pb2.RetireKeyRequest(version=version), timeout)

    def audit_hash(self, subject_id: str, *, gallery: str = "", timeout: float | None = None) -> str:
        """The value of the ``subject`` field of this subject's audit records (the search key an
        investigator greps the audit log for). The request itself is audited."""
        request = admin_pb2.GetAuditHashRequest(gallery=gallery, subject_id=subject_id)
        response: admin_pb2.GetAuditHashResponse = self._call(self._admin.GetAuditHash, request, timeout)
        return response.subject_hmac


def _progress(call: grpc.CallIterator[admin_pb2.RewrapResponse]) -> Iterator[RewrapProgress]:
    try:
        for message in call:
            yield RewrapProgress(message.done, message.total, message.target_version)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
    finally:
        # A no-op once the stream has ended; stops the daemon's work when the caller leaves early.
        call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
