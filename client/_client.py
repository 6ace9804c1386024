"""A small synchronous client for faceseald, over mutual TLS only.

There is deliberately no insecure constructor: the daemon has no plaintext port, and a client
that offered one would only teach people to look for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from faceseal.client._encodings import EncodingLike, as_floats
from faceseal.client._errors import FaceSealClientError, from_rpc_error
from faceseal.v1 import faceseal_pb2, faceseal_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
# Items per BulkEnroll message, by size: far below the daemon's default 1 MiB message limit, and
# large enough that gRPC's per-message cost is paid per few hundred items, not per item.
BULK_MESSAGE_BYTES = 256 * 1024

_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


@dataclass(frozen=True, slots=True)
class EnrollResult:
    subject_id: str
    template_id: str
    template_count: int


@dataclass(frozen=True, slots=True)
class BulkResult:
    """The outcome of one item of :meth:`FaceSealClient.bulk_enroll`.

    ``code`` is ``grpc.StatusCode.OK`` and ``template_id`` set when the item was stored; otherwise
    ``template_id`` is None and ``code`` / ``message`` say why it was refused (the message is the
    daemon's, which never echoes the encoding).
    """

    index: int
    subject_id: str
    template_id: str | None
    code: grpc.StatusCode
    message: str

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK


@dataclass(frozen=True, slots=True)
class MatchResult:
    match: bool
    distance: float | None  # None unless the daemon's policy discloses distances to this caller


@dataclass(frozen=True, slots=True)
class Candidate:
    subject_id: str
    distance: float | None


class Connection:
    """One mutual-TLS channel to one daemon, shared by :class:`FaceSealClient` and ``AdminClient``.

    Subclasses add their stubs in ``_bind``; the constructors, ``close``, the context manager,
    ``health`` and the error translation live here once.
    """

    def __init__(
        self,
        target: str,
        *,
        ca_cert: bytes,
        client_cert: bytes,
        client_key: bytes,
        timeout: float = DEFAULT_TIMEOUT,
        server_name: str | None = None,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_cert, private_key=client_key, certificate_chain=client_cert
        )
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self._channel = grpc.secure_channel(target, credentials, options=options)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout
        self._bind(self._channel)

    def _bind(self, channel: grpc.Channel) -> None:
        """Create the service stubs this client calls (none in the base class)."""

    @classmethod
    def from_files(
        cls,
        target: str,
        *,
        ca: Path | str,
        cert: Path | str,
        key: Path | str,
        timeout: float = DEFAULT_TIMEOUT,
        server_name: str | None = None,
    ) -> Self:
        """Read the PEM files now, so a wrong path fails here rather than at the first call."""
        return cls(
            target,
            ca_cert=Path(ca).read_bytes(),
            client_cert=Path(cert).read_bytes(),
            client_key=Path(key).read_bytes(),
            timeout=timeout,
            server_name=server_name,
        )

    @classmethod
    def from_profile(
        cls,
        profile: str,
        *,
        dev_dir: Path | str = "dev",
        target: str = DEFAULT_TARGET,
        timeout: float = DEFAULT_TIMEOUT,
        server_name: str | None = None,
    ) -> Self:
        """Use a client certificate from the development PKI that ``faceseald init --dev`` writes."""
        if not _PROFILE_NAME.fullmatch(profile):
            raise ValueError(f"invalid profile name {profile!r}: use letters, digits, '.', '_' or '-'")
        dev_dir = Path(dev_dir)
        ca, cert, key = (
            dev_dir / "ca.crt",
            dev_dir / "clients" / f"{profile}.crt",
            dev_dir / "clients" / f"{profile}.key",
        )
        for path in (ca, cert, key):
            if not path.is_file():
                known = sorted(p.stem for p in (dev_dir / "clients").glob("*.crt"))
                hint = f"known profiles: {', '.join(known)}" if known else "run `make dev-pki` first"
                raise FileNotFoundError(f"profile {profile!r}: {path} does not exist ({hint})")
        return cls.from_files(target, ca=ca, cert=cert, key=key, timeout=timeout, server_name=server_name)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def health(self, *, timeout: float | None = None) -> str:
        """The standard grpc.health.v1 status of the whole server: NOT_SERVING while it is sealed."""
        request = health_pb2.HealthCheckRequest(service="")
        response = self._call(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def _call(self, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req, timeout: float | None) -> _Resp:
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class FaceSealClient(Connection):
    """One channel to one daemon; cheap calls, so keep an instance for the life of the process.

    Every method raises a :class:`~faceseal.client.FaceSealClientError` subclass on failure.
    A non-match is an answer (``MatchResult.match is False``), not an error.
    """

    def _bind(self, channel: grpc.Channel) -> None:
        self._stub = faceseal_pb2_grpc.FaceSealServiceStub(channel)

    def enroll(
        self,
        subject_id: str,
        encoding: EncodingLike,
        *,
        gallery: str = "",
        replace: bool = False,
        timeout: float | None = None,
    ) -> EnrollResult:
        """Add a template; with ``replace`` the subject's old templates go in the same transaction."""
        request = faceseal_pb2.EnrollRequest(
            gallery=gallery, subject_id=subject_id, encoding=as_floats(encoding), replace=replace
        )
        response = self._call(self._stub.Enroll, request, timeout)
        return EnrollResult(response.subject_id, response.template_id, response.template_count)

    def bulk_enroll(
        self,
        items: Iterable[tuple[str, EncodingLike]],
        *,
        gallery: str = "",
        replace: bool = False,
        timeout: float | None = None,
        idempotency_key: str = "",
    ) -> list[BulkResult]:
        """Enroll ``(subject_id, encoding)`` pairs over one BulkEnroll stream; one result per item, in order.

        The daemon checks every item like :meth:`enroll` and stores all the valid ones in one
        transaction once the stream's last message (which sets ``commit``) arrives: an item it
        refuses comes back with its code (e.g. ``INVALID_ARGUMENT``) and the others are stored
        all the same. A call that fails as a whole
        (an exception here: no permission, sealed, more items than the daemon's ``max_batch``, a
        deadline, or ``items`` raising while it is read) stored nothing, so sending the same items
        again is safe. ``items`` is read lazily, once; ``timeout`` bounds the whole stream.

        ``idempotency_key`` (1-128 characters of ``[A-Za-z0-9._:@-]``) names the batch: sent
        again under the same key within 7 days, the same items are not stored twice and the
        first answer comes back, which covers a call that committed but whose answer was lost.
        Use one key per distinct batch: other items under a used key are refused
        (``FailedPreconditionError``).
        """
        subjects: list[str] = []
        failure: list[BaseException] = []

        def requests() -> Iterator[faceseal_pb2.BulkEnrollRequest]:
            # gRPC reads this iterator on a thread of its own and only cancels the call if it
            # raises; keep the exception, so the caller sees it rather than a bare CANCELLED.
            try:
                request, size = faceseal_pb2.BulkEnrollRequest(idempotency_key=idempotency_key), 0
                for subject_id, encoding in items:
                    floats = as_floats(encoding)
                    request.items.add(gallery=gallery, subject_id=subject_id, encoding=floats, replace=replace)
                    subjects.append(subject_id)
                    size += 4 * len(floats) + len(subject_id) + len(gallery) + 16
                    if size >= BULK_MESSAGE_BYTES:
                        yield request
                        request, size = faceseal_pb2.BulkEnrollRequest(), 0
                # The end marker: without it the daemon stores nothing (a stream cut short by a
                # crash must not look complete to it).
                request.commit = True
                yield request
            except Exception as exc:
                failure.append(exc)
                raise

        try:
            response = self._stub.BulkEnroll(requests(), timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            if failure:
                raise failure[0] from None
            raise from_rpc_error(err) from None
        if len(response.results) != len(subjects):
            raise FaceSealClientError(
                grpc.StatusCode.INTERNAL,
                f"the daemon answered {len(response.results)} results for {len(subjects)} items",
            )
        results = []
        for position, r in enumerate(response.results):
            code = _STATUS_CODES.get(r.code, grpc.StatusCode.UNKNOWN)
            if r.index != position:
                raise FaceSealClientError(grpc.StatusCode.INTERNAL, "the daemon answered results out of order")
            template_id = r.template_id if code is grpc.StatusCode.OK and r.template_id else None
            results.append(BulkResult(position, subjects[position], template_id, code, r.message))
        return results

    def match(
        self, subject_id: str, probe: EncodingLike, *, gallery: str = "", timeout: float | None = None
    ) -> MatchResult:
        request = faceseal_pb2.MatchRequest(gallery=gallery, subject_id=subject_id, probe=as_floats(probe))
        response = self._call(self._stub.Match, request, timeout)
        return MatchResult(response.match, _f32(response.distance) if response.HasField("distance") else None)

    def identify(
        self, probe: EncodingLike, *, top_k: int = 5, gallery: str = "", timeout: float | None = None
    ) -> list[Candidate]:
        """Closest first; only subjects within the gallery's threshold, so an empty list is an answer."""
        request = faceseal_pb2.IdentifyRequest(gallery=gallery, probe=as_floats(probe), top_k=top_k)
        return _candidates(self._call(self._stub.Identify, request, timeout).candidates)

    def identify_batch(
        self, probes: Iterable[EncodingLike], *, top_k: int = 5, gallery: str = "", timeout: float | None = None
    ) -> list[list[Candidate]]:
        """``identify`` for several probes in one call, answers in probe order.

        Cheaper than one call per probe (the daemon reads the gallery once for the batch), not a
        way around limits: every probe counts against the caller's request rate and spends one
        search of its Identify budget, and a batch holds at most the daemon's
        ``max_identify_batch`` probes (default 64).
        """
        request = faceseal_pb2.IdentifyBatchRequest(gallery=gallery, top_k=top_k)
        for probe in probes:
            request.probes.add(encoding=as_floats(probe))
        response = self._call(self._stub.IdentifyBatch, request, timeout)
        return [_candidates(result.candidates) for result in response.results]

    def delete(self, subject_id: str, *, gallery: str = "", timeout: float | None = None) -> int:
        """Return how many templates were removed."""
        request = faceseal_pb2.DeleteRequest(gallery=gallery, subject_id=subject_id)
        return self._call(self._stub.Delete, request, timeout).deleted


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _candidates(found: Iterable[faceseal_pb2.Candidate]) -> list[Candidate]:
    return [Candidate(c.subject_id, _f32(c.distance) if c.HasField("distance") else None) for c in found]


def _f32(value: float) -> float:
    """Distances travel as float32; show 0.412, not the float64 widening 0.41200000047683716."""
    return float(str(np.float32(value)))
