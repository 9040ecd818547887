"""Job routes: thin, the service layer owns the logic."""

from __future__ import annotations

import itertools
from typing import Annotated, Any

from fastapi import File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import routing
from api.errors import ApiError
from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import (
    CheckpointList,
    ErrorBody,
    EventList,
    JobList,
    JobOut,
    OutputList,
    SampleEstimate,
    SampleRequest,
    TrainEstimate,
    TrainRequest,
    WebhookDeliveryList,
)
from api.services import archive, deletion, stream
from api.services import jobs as svc
from shared.catalog import OUTPUT_FORMATS, PRIORITY_HELP, SCHEDULERS
from shared.models import EVENT_TYPES
from shared.storage import get_storage
from shared.webhooks import WEBHOOK_EVENTS

router = routing.router(prefix="/v1/jobs", tags=["jobs"])
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
    422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody},
}
DELETE_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 409: {"model": ErrorBody}}
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]
DryRun = Annotated[bool, Query(description="Validate and estimate only: nothing is stored or enqueued (200).")]


def _accepted(response: Response, created: bool) -> None:
    response.status_code = 202
    if not created:
        response.headers["Idempotent-Replayed"] = "true"


@router.post("/train", status_code=202, response_model=JobOut | TrainEstimate, responses=ERRORS)
def create_train_job(params: TrainRequest, response: Response, session: SessionDep, settings: SettingsDep,
                     tenant: TenantDep, idempotency_key: IdemKey = None, dry_run: DryRun = False) -> JobOut | TrainEstimate:
    if dry_run:
        response.status_code = 200
        return svc.estimate_train(session, settings, tenant, params)
    submitted = svc.create_train_job(session, settings, tenant, params, idempotency_key=idempotency_key)
    _accepted(response, submitted.created)
    return submitted.out()


@router.post("/sample", status_code=202, response_model=JobOut | SampleEstimate, responses=ERRORS)
def create_sample_job(req: SampleRequest, response: Response, session: SessionDep, settings: SettingsDep,
                      tenant: TenantDep, idempotency_key: IdemKey = None,
                      dry_run: DryRun = False) -> JobOut | SampleEstimate:
    if dry_run:
        response.status_code = 200
        return svc.estimate_sample(session, settings, tenant, req)
    submitted = svc.create_sample_job(session, settings, tenant, req, idempotency_key=idempotency_key)
    _accepted(response, submitted.created)
    return submitted.out()


@router.post("/sample/csv", status_code=202, response_model=JobOut | SampleEstimate, responses=ERRORS)
async def create_sample_job_csv(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="CSV of prompts: prompt[,negative_prompt,seed,num_images,guidance_scale,steps]")],
    model: Annotated[str | None, Form()] = None,
    scheduler: Annotated[str | None, Form(description=f"one of {', '.join(SCHEDULERS)}")] = None,
    steps: Annotated[str | None, Form()] = None,
    guidance_scale: Annotated[str | None, Form()] = None,
    priority: Annotated[str | None, Form(description=PRIORITY_HELP)] = None,
    webhook_url: Annotated[str | None, Form(description="POST the job's events here (signed; see GET /v1/webhooks/secret)")] = None,
    webhook_events: Annotated[str | None, Form(description=f"comma-separated subset of {', '.join(WEBHOOK_EVENTS)}")] = None,
    output_format: Annotated[str | None, Form(description=f"one of {', '.join(OUTPUT_FORMATS)}")] = None,
    idempotency_key: IdemKey = None,
    dry_run: DryRun = False,
) -> JobOut | SampleEstimate:
    form = {"model": model, "scheduler": scheduler, "steps": steps, "guidance_scale": guidance_scale,
            "priority": priority, "webhook_url": webhook_url, "webhook_events": webhook_events,
            "output_format": output_format}
    # FastAPI drops form fields it has no parameter for; a typo (``prority=…``, ``step=…``) must
    # not be silently ignored, as unknown JSON fields are not.
    unknown = sorted(set((await request.form()).keys()) - set(form) - {"file"})
    if unknown:
        valid = ", ".join(["file", *form])
        raise ApiError(422, "invalid_request", f"unknown form field(s) {', '.join(map(repr, unknown))}; valid: {valid}",
                       [{"field": name, "message": "unknown form field"} for name in unknown])
    data = await file.read()
    # Parsing and the inserts block: off the event loop (the route is async only to read the upload).
    return await run_in_threadpool(_submit_csv, session, settings, tenant, response, data, form, idempotency_key,
                                   dry_run)


def _submit_csv(session, settings, tenant, response, data, form, idempotency_key, dry_run) -> JobOut | SampleEstimate:
    req, digest = svc.sample_request_from_csv(settings, data, form)
    if dry_run:
        response.status_code = 200
        return svc.estimate_sample(session, settings, tenant, req)
    submitted = svc.create_sample_job(session, settings, tenant, req, idempotency_key=idempotency_key, digest=digest)
    _accepted(response, submitted.created)
    return submitted.out()


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(session: SessionDep, tenant: TenantDep,
              status: Annotated[str | None, Query()] = None,
              type: Annotated[str | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query()] = None) -> JobList:
    jobs, next_cursor = svc.list_jobs(session, tenant, status=status, type_=type, limit=limit, cursor=cursor)
    return JobList(items=svc.job_outs(session, jobs), next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> JobOut:
    job = svc.get_job(session, tenant, job_id)
    return svc.job_out(job, queue=svc.queue_of(session, settings, job))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return svc.job_out(svc.cancel_job(session, tenant, job_id))


@router.delete("/{job_id}", status_code=204, responses=DELETE_ERRORS)
def delete_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """A final job: its record (rows, outputs, events, webhook) and its stored objects. A queued or
    running job: 409 (cancel it, then delete it once it has ended)."""
    deletion.delete_job(session, settings, tenant, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/outputs", response_model=OutputList, responses=ERRORS)
def list_outputs(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> OutputList:
    return svc.list_outputs(session, settings, get_storage(settings), tenant, job_id)


@router.get("/{job_id}/archive", response_class=StreamingResponse, responses={
    **ERRORS, 409: {"model": ErrorBody}, 200: {"content": {"application/x-tar": {}}, "description": "a tar"}})
def job_archive(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> StreamingResponse:
    """Every output of a sample job (PNGs, or WebDataset shards, and the manifest once it has
    succeeded) as one tar, streamed from storage: ``<job id>/rows/…``, ``<job id>/shards/…``,
    ``<job id>/manifest.json``, ``<job id>/manifest.csv``. A train job: 409."""
    storage = get_storage(settings)
    stream = archive.tar_stream(storage, archive.archive_entries(session, storage, tenant, job_id))
    first = next(stream)  # the first object opened here: storage down is a 503, not a cut stream
    return StreamingResponse(itertools.chain([first], stream), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{job_id}.tar"'})


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=ERRORS)
def list_checkpoints(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> CheckpointList:
    """A train job's stored checkpoints with their evaluation, sample grid and loss curve (empty for
    a sample job, or before the first checkpoint)."""
    return CheckpointList(items=svc.list_checkpoints(session, settings, get_storage(settings), tenant, job_id))


@router.get("/{job_id}/events", response_model=EventList, responses=ERRORS)
def list_events(job_id: str, session: SessionDep, tenant: TenantDep,
                after_id: Annotated[int, Query(ge=0, description="Only events with a larger id (0: from the start).")] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                types: Annotated[str | None, Query(description=f"comma-separated subset of {', '.join(EVENT_TYPES)}")] = None,
                ) -> EventList:
    items, next_after_id, has_more = svc.list_events(session, tenant, job_id, after_id=after_id, limit=limit,
                                                     types=svc.parse_event_types(types))
    return EventList(items=items, next_after_id=next_after_id, has_more=has_more)


STREAM_DOC = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                    "description": "Server-sent events: `event: job` (the job now), then each event of the job "
                                   "after Last-Event-ID (`id:` its id), then `event: end` once it has ended."},
              429: {"model": ErrorBody}}


@router.get("/{job_id}/stream", status_code=200, response_class=stream.EventStreamResponse,
            responses={**ERRORS, **STREAM_DOC})
def stream_job(job_id: str, request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
               last_event_id: Annotated[str | None, Query(description="Resume after this event id (the "
                                                                      "Last-Event-ID header wins).")] = None,
               last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", description=(
                   "Resume after this event id (what an EventSource sends when it reconnects)."))] = None,
               ) -> stream.EventStreamResponse:
    """A job's events as they happen (server-sent events); resumable with ``Last-Event-ID``."""
    after_id = stream.last_event_id(last_event_id_header, last_event_id)
    job = svc.get_job(session, tenant, job_id)
    snapshot = svc.job_out(job).model_dump(mode="json")
    slots: stream.StreamSlots = request.app.state.stream_slots
    slots.acquire(tenant.id)
    body = stream.job_stream(settings, tenant.id, job.id, after_id, snapshot, request.app.state.stream_stop)
    return stream.EventStreamResponse(body,
                                      on_close=lambda: slots.release(tenant.id))


@router.get("/{job_id}/webhook-deliveries", response_model=WebhookDeliveryList, responses=ERRORS)
def list_webhook_deliveries(job_id: str, session: SessionDep, tenant: TenantDep,
                            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> WebhookDeliveryList:
    return WebhookDeliveryList(items=svc.list_deliveries(session, tenant, job_id, limit))
