from __future__ import annotations

from typing import Annotated

from fastapi import File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from api import routing
from api.deps import SessionDep, SettingsDep, TenantDep
from api.routes.jobs import DELETE_ERRORS, ERRORS
from api.services import deletion
from api.schemas import DatasetList, DatasetOut
from api.services import datasets as svc
from shared.models import Dataset
from shared.storage import get_storage

router = routing.router(prefix="/v1/datasets", tags=["datasets"])


def dataset_out(d: Dataset) -> DatasetOut:
    return DatasetOut(id=d.id, name=d.name, num_images=d.num_images, created_at=d.created_at, info=d.info or {})


@router.post("", status_code=201, response_model=DatasetOut, responses=ERRORS)
async def upload_dataset(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                         file: Annotated[UploadFile, File(description="zip or tar(.gz) with metadata.csv/jsonl")],
                         name: Annotated[str | None, Form()] = None) -> DatasetOut:
    # The upload is spooled to disk by the form parser; it is read from there member by member, and
    # stored streamed (never whole in memory). Inspecting, storing and the insert block: off the loop.
    ds = await run_in_threadpool(svc.create_dataset, session, settings, get_storage(settings), tenant, file.filename or "upload",
                                 file.file, name)
    return dataset_out(ds)


@router.get("", response_model=DatasetList, responses=ERRORS)
def list_datasets(session: SessionDep, tenant: TenantDep) -> DatasetList:
    return DatasetList(items=[dataset_out(d) for d in svc.list_datasets(session, tenant)])


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERRORS)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    return dataset_out(svc.get_dataset(session, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=DELETE_ERRORS)
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """The dataset's record and archive; 409 while a queued or running train job uses it."""
    deletion.delete_dataset(session, settings, tenant, dataset_id)
    return Response(status_code=204)
