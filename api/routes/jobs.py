"""Job routes: thin, the service layer owns the logic."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Header, Query, Request, Response, UploadFile
from pydantic import ValidationError

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.services import jobs as svc
from shared.csvrows import CsvError, CsvLimits, parse_prompts_csv
from shared.schemas import SCHEDULERS, ErrorBody, JobList, JobOut, OutputList, SampleRequest
from shared.storage import get_storage
from shared.train_schema import TrainParams

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
    422: {"model": ErrorBody}, 503: {"model": ErrorBody},
}
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]


def _accepted(response: Response, created: bool) -> None:
    response.status_code = 202
    if not created:
        response.headers["Idempotent-Replayed"] = "true"


@router.post("/train", status_code=202, response_model=JobOut, responses=ERRORS)
def create_train_job(params: TrainParams, response: Response, session: SessionDep, settings: SettingsDep,
                     tenant: TenantDep, idempotency_key: IdemKey = None) -> JobOut:
    job, created = svc.create_train_job(session, settings, tenant, params, idempotency_key=idempotency_key)
    _accepted(response, created)
    return svc.job_out(job)


@router.post("/sample", status_code=202, response_model=JobOut, responses=ERRORS)
def create_sample_job(req: SampleRequest, response: Response, session: SessionDep, settings: SettingsDep,
                      tenant: TenantDep, idempotency_key: IdemKey = None) -> JobOut:
    job, created = svc.create_sample_job(session, settings, tenant, req, idempotency_key=idempotency_key)
    _accepted(response, created)
    return svc.job_out(job)


@router.post("/sample/csv", status_code=202, response_model=JobOut, responses=ERRORS)
async def create_sample_job_csv(
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="CSV of prompts: prompt[,negative_prompt,seed,num_images,guidance_scale,steps]")],
    model: Annotated[str | None, Form()] = None,
    scheduler: Annotated[str | None, Form(description=f"one of {', '.join(SCHEDULERS)}")] = None,
    steps: Annotated[str | None, Form()] = None,
    guidance_scale: Annotated[str | None, Form()] = None,
    idempotency_key: IdemKey = None,
) -> JobOut:
    data = await file.read()
    limits = CsvLimits(max_rows=settings.csv_max_rows, max_prompt_chars=settings.prompt_max_chars,
                       max_images_per_row=settings.max_images_per_row, max_steps=settings.max_steps)
    try:
        prompts = parse_prompts_csv(data, limits)
    except CsvError as exc:
        raise ApiError(422, "invalid_csv", exc.message, exc.details) from None
    body: dict[str, Any] = {"model": model, "prompts": [p.model_dump(exclude_none=True) for p in prompts]}
    for name, value in (("scheduler", scheduler), ("steps", steps), ("guidance_scale", guidance_scale)):
        if value not in (None, ""):
            body[name] = value
    if not model:
        raise ApiError(422, "invalid_request", "the form field 'model' (a model id) is required",
                       [{"field": "model", "message": "required"}])
    try:
        req = SampleRequest.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", "the form fields are invalid",
                       [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]) from None
    digest = svc.request_hash("sample-csv", {"csv": svc.hashlib.sha256(data).hexdigest(),
                                             "form": {k: v for k, v in body.items() if k != "prompts"}})
    job, created = svc.create_sample_job(session, settings, tenant, req, idempotency_key=idempotency_key, digest=digest)
    _accepted(response, created)
    return svc.job_out(job)


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(session: SessionDep, tenant: TenantDep,
              status: Annotated[str | None, Query()] = None,
              type: Annotated[str | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query()] = None) -> JobList:
    jobs, next_cursor = svc.list_jobs(session, tenant, status=status, type_=type, limit=limit, cursor=cursor)
    return JobList(items=[svc.job_out(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return svc.job_out(svc.get_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return svc.job_out(svc.cancel_job(session, tenant, job_id))


@router.get("/{job_id}/outputs", response_model=OutputList, responses=ERRORS)
def list_outputs(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> OutputList:
    items, manifest = svc.list_outputs(session, settings, get_storage(settings), tenant, job_id)
    return OutputList(items=items, manifest_url=manifest)
