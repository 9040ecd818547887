from __future__ import annotations

from fastapi import Response

from api import routing
from api.deps import SessionDep, SettingsDep, TenantDep
from api.routes.jobs import DELETE_ERRORS, ERRORS
from api.schemas import ImportModelRequest, ModelFiles, ModelList, ModelOut
from api.services import deletion
from api.services import models as svc
from api.services.jobs import get_model
from shared.storage import get_storage

router = routing.router(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses=ERRORS)
def list_models(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelList:
    storage = get_storage(settings)
    return ModelList(items=[svc.model_out(m, storage, settings) for m in svc.list_models(session, tenant)])


@router.get("/{model_id}", response_model=ModelOut, responses=ERRORS)
def get_model_route(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelOut:
    return svc.model_out(get_model(session, tenant, model_id), get_storage(settings), settings)


@router.get("/{model_id}/files", response_model=ModelFiles, responses=ERRORS)
def model_files(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelFiles:
    """The model's files with their SHA-256 and presigned URLs (``ldmq models download``)."""
    return svc.model_files(get_storage(settings), settings, get_model(session, tenant, model_id))


@router.post("", status_code=201, response_model=ModelOut, responses=ERRORS)
def import_model(req: ImportModelRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelOut:
    storage = get_storage(settings)
    model = svc.import_model(session, settings, storage, tenant, req.source, req.name, req.sampling_defaults)
    return svc.model_out(model, storage, settings)


@router.delete("/{model_id}", status_code=204, responses=DELETE_ERRORS)
def delete_model(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """The model's record and stored objects; 409 while a queued or running job or another model
    needs it."""
    deletion.delete_model(session, settings, tenant, model_id)
    return Response(status_code=204)
