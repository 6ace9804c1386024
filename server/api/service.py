"""FaceSealService: proto <-> core translation and nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import grpc

from faceseal.server.api.errors import abort, code_for
from faceseal.server.auth.interceptor import caller
from faceseal.server.auth.policy import Permission
from faceseal.server.core import Core, EnrollOutcome
from faceseal.server.errors import InvalidArgument
from faceseal.v1 import faceseal_pb2 as pb
from faceseal.v1 import faceseal_pb2_grpc as pb_grpc

_SERVICE = "/faceseal.v1.FaceSealService/"

# The permission each method needs; the interceptor refuses a caller without it.
PERMISSIONS = {
    _SERVICE + "Enroll": Permission.ENROLL,
    _SERVICE + "Match": Permission.MATCH,
    _SERVICE + "Identify": Permission.IDENTIFY,
    _SERVICE + "Delete": Permission.DELETE,
    _SERVICE + "BulkEnroll": Permission.ENROLL,
    _SERVICE + "IdentifyBatch": Permission.IDENTIFY,
}


class FaceSealServicer(pb_grpc.FaceSealServiceServicer):
    def __init__(self, core: Core) -> None:
        self._core = core

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        try:
            out = self._core.enroll(caller(), request.gallery, request.subject_id, request.encoding, request.replace)
        except Exception as exc:
            abort(context, exc)
        return pb.EnrollResponse(
            subject_id=out.subject_id, template_id=out.template_id, template_count=out.template_count
        )

    def Match(self, request: pb.MatchRequest, context: grpc.ServicerContext) -> pb.MatchResponse:
        try:
            out = self._core.match(caller(), request.gallery, request.subject_id, request.probe)
        except Exception as exc:
            abort(context, exc)
        response = pb.MatchResponse(match=out.match)
        if out.distance is not None:
            response.distance = out.distance
        return response

    def Identify(self, request: pb.IdentifyRequest, context: grpc.ServicerContext) -> pb.IdentifyResponse:
        try:
            hits = self._core.identify(caller(), request.gallery, request.probe, request.top_k)
        except Exception as exc:
            abort(context, exc)
        response = pb.IdentifyResponse()
        for hit in hits:
            candidate = response.candidates.add(subject_id=hit.subject_id)
            if hit.distance is not None:
                candidate.distance = hit.distance
        return response

    def IdentifyBatch(
        self, request: pb.IdentifyBatchRequest, context: grpc.ServicerContext
    ) -> pb.IdentifyBatchResponse:
        try:
            answers = self._core.identify_many(
                caller(), request.gallery, [p.encoding for p in request.probes], request.top_k
            )
        except Exception as exc:
            abort(context, exc)
        response = pb.IdentifyBatchResponse()
        for hits in answers:
            result = response.results.add()
            for hit in hits:
                candidate = result.candidates.add(subject_id=hit.subject_id)
                if hit.distance is not None:
                    candidate.distance = hit.distance
        return response

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        try:
            deleted = self._core.delete(caller(), request.gallery, request.subject_id)
        except Exception as exc:
            abort(context, exc)
        return pb.DeleteResponse(deleted=deleted)

    def BulkEnroll(
        self, request_iterator: Iterator[pb.BulkEnrollRequest], context: grpc.ServicerContext
    ) -> pb.BulkEnrollResponse:
        try:
            messages = _committed(request_iterator)
            first = next(messages)  # _committed raises for an empty stream: it has no commit
            rest = _no_later_key(messages)
            items = ((i.gallery, i.subject_id, i.encoding, i.replace) for r in chain([first], rest) for i in r.items)
            outcomes = self._core.bulk_enroll(caller(), items, first.idempotency_key)
        except Exception as exc:
            abort(context, exc)
        response = pb.BulkEnrollResponse()
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, EnrollOutcome):
                response.results.add(index=index, template_id=outcome.template_id, code=0)
            else:
                response.results.add(index=index, code=code_for(outcome).value[0], message=str(outcome))
        return response


def _no_later_key(requests: Iterator[pb.BulkEnrollRequest]) -> Iterator[pb.BulkEnrollRequest]:
    """The messages after the first, none of which may name an idempotency key: a key that
    changed mid-stream would leave it unclear which batch the stream is."""
    for request in requests:
        if request.idempotency_key:
            raise InvalidArgument("idempotency_key belongs on the first message of a BulkEnroll stream only")
        yield request


def _committed(requests: Iterator[pb.BulkEnrollRequest]) -> Iterator[pb.BulkEnrollRequest]:
    """The stream's messages, refused unless the last one, and only it, sets ``commit``.

    gRPC Python's request iterator ends the same way whether the client half-closed or its call
    was cancelled (a crashed client, an exception in its request generator): the cancellation
    may be noticed only after the iterator has stopped. Without the client's own end marker the
    daemon would store the front half of a batch the client never finished sending. Raising
    here, while Core is still reading the stream, happens before anything is stored.

    A message carries at least one item unless it is the bare end marker (``commit`` alone, for
    a client that learns the stream is over only after sending its last item): one in the former
    one-item format (fields 2-4 at the top level, now reserved) parses as empty, and must not be
    answered as a successful batch.
    """
    committed = False
    for request in requests:
        if committed:
            raise InvalidArgument("a BulkEnroll message followed the one that set 'commit'; nothing was stored")
        if not request.items and not request.commit:
            raise InvalidArgument(
                "every BulkEnroll message must carry at least one item (field 'items') or end the stream ('commit')"
            )
        committed = request.commit
        yield request
    if not committed:
        raise InvalidArgument(
            "the BulkEnroll stream ended before a message set 'commit' (its last message must): nothing was stored"
        )
