"""FaceSealAdminService: proto <-> core translation for key administration."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from faceseal.server.api.errors import abort
from faceseal.server.auth.policy import Permission
from faceseal.server.core import Core
from faceseal.v1 import admin_pb2 as pb
from faceseal.v1 import admin_pb2_grpc as pb_grpc

_SERVICE = "/faceseal.v1.FaceSealAdminService/"

PERMISSIONS = {
    _SERVICE + name: Permission.ADMIN for name in ("GetStatus", "RotateKey", "Rewrap", "RetireKey", "GetAuditHash")
}


class FaceSealAdminServicer(pb_grpc.FaceSealAdminServiceServicer):
    def __init__(self, core: Core) -> None:
        self._core = core

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        try:
            status = self._core.status()
        except Exception as exc:
            abort(context, exc)
        return pb.GetStatusResponse(
            sealed=status.sealed,
            key_versions=[
                pb.KeyVersion(version=k.version, template_count=k.template_count, active=k.active)
                for k in status.key_versions
            ],
            galleries=[
                pb.GalleryStatus(
                    name=g.name,
                    dimension=g.dimension,
                    metric=g.metric,
                    subject_count=g.subject_count,
                    template_count=g.template_count,
                )
                for g in status.galleries
            ],
        )

    def RotateKey(self, request: pb.RotateKeyRequest, context: grpc.ServicerContext) -> pb.RotateKeyResponse:
        try:
            return pb.RotateKeyResponse(version=self._core.rotate_key())
        except Exception as exc:
            abort(context, exc)

    def Rewrap(self, request: pb.RewrapRequest, context: grpc.ServicerContext) -> Iterator[pb.RewrapResponse]:
        try:
            for p in self._core.rewrap():
                yield pb.RewrapResponse(done=p.done, total=p.total, target_version=p.target_version)
        except Exception as exc:
            abort(context, exc)

    def RetireKey(self, request: pb.RetireKeyRequest, context: grpc.ServicerContext) -> pb.RetireKeyResponse:
        try:
            self._core.retire_key(request.version)
        except Exception as exc:
            abort(context, exc)
        return pb.RetireKeyResponse()

    def GetAuditHash(self, request: pb.GetAuditHashRequest, context: grpc.ServicerContext) -> pb.GetAuditHashResponse:
        try:
            return pb.GetAuditHashResponse(subject_hmac=self._core.audit_hash(request.gallery, request.subject_id))
        except Exception as exc:
            abort(context, exc)
