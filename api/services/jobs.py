"""Jobs: create (with idempotency), read, list with cursor pagination, cancel, outputs."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from shared import jobstate
from shared.db import after_commit
from shared.models import Dataset, Job, JobOutput, JobRow, JobStatus, JobType, Model, Tenant, utcnow
from shared.queue import enqueue
from shared.schemas import JOB_STATUSES, JOB_TYPES, SEED_MAX, JobOut, OutputOut, SamplePrompt, SampleRequest
from shared.settings import Settings
from shared.storage import Storage, manifest_key
from shared.train_schema import TrainParams

BUILTIN_DATASETS = ("builtin:digits",)


def request_hash(kind: str, payload: Any) -> str:
    blob = json.dumps({"kind": kind, "payload": payload}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, type=job.type, status=job.status, progress=job.progress, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, error=job.error, params=job.params,
        model_id=job.model_id, outputs_count=job.outputs_count, attempts=job.attempts,
        progress_detail=job.progress_detail or {}, total_items=job.total_items,
    )


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        raise not_found("job", job_id)
    return job


def get_model(session: Session, tenant: Tenant, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant.id:
        raise not_found("model", model_id)
    return model


def _existing_for_key(session: Session, tenant: Tenant, key: str, digest: str) -> Job | None:
    job = session.scalars(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key)).first()
    if job is not None and job.request_hash != digest:
        raise ApiError(422, "idempotency_key_reused",
                       "this Idempotency-Key was used with a different request body")
    return job


def _insert(session: Session, settings: Settings, tenant: Tenant, job: Job, idempotency_key: str | None,
            digest: str) -> tuple[Job, bool]:
    """Insert ``job`` unless ``idempotency_key`` already names one; return (job, created)."""
    if idempotency_key:
        if len(idempotency_key) > 200:
            raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key is longer than 200 characters")
        found = _existing_for_key(session, tenant, idempotency_key, digest)
        if found is not None:
            return found, False
    job.idempotency_key = idempotency_key
    job.request_hash = digest
    job.tenant_id = tenant.id
    job.max_attempts = job.max_attempts or settings.max_attempts
    job.enqueued_at = utcnow()
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        # A concurrent request with the same key won the insert.
        found = _existing_for_key(session, tenant, idempotency_key or "", digest) if idempotency_key else None
        if found is None:
            raise
        return found, False
    after_commit(session, lambda: enqueue(job.id, job.type, settings))
    return job, True


def create_sample_job(session: Session, settings: Settings, tenant: Tenant, req: SampleRequest, *,
                      idempotency_key: str | None = None, digest: str | None = None) -> tuple[Job, bool]:
    model = get_model(session, tenant, req.model)
    problems = []
    if len(req.prompts) > settings.csv_max_rows:
        problems.append({"field": "prompts", "message": f"{len(req.prompts)} rows; the limit is {settings.csv_max_rows}"})
    for i, p in enumerate(req.prompts, start=1):
        if len(p.prompt) > settings.prompt_max_chars:
            problems.append({"row": i, "column": "prompt", "message": f"prompt has {len(p.prompt)} characters; the limit is {settings.prompt_max_chars}"})
        if p.negative_prompt and len(p.negative_prompt) > settings.prompt_max_chars:
            problems.append({"row": i, "column": "negative_prompt", "message": f"negative_prompt is longer than {settings.prompt_max_chars} characters"})
        if p.num_images > settings.max_images_per_row:
            problems.append({"row": i, "column": "num_images", "message": f"num_images {p.num_images} is over the limit {settings.max_images_per_row}"})
        if p.steps is not None and p.steps > settings.max_steps:
            problems.append({"row": i, "column": "steps", "message": f"steps {p.steps} is over the limit {settings.max_steps}"})
    if req.steps > settings.max_steps:
        problems.append({"field": "steps", "message": f"steps {req.steps} is over the limit {settings.max_steps}"})
    for dim in ("width", "height"):
        v = getattr(req, dim)
        if v is not None and (v % 8 or v > settings.max_image_size):
            problems.append({"field": dim, "message": f"{dim} must be a multiple of 8 and at most {settings.max_image_size}"})
    total = sum(p.num_images for p in req.prompts)
    if total > settings.max_images_per_job:
        problems.append({"field": "prompts", "message": f"{total} images; the limit per job is {settings.max_images_per_job}"})
    if problems:
        raise ApiError(422, "invalid_request", "the sample request is invalid", problems)

    digest = digest or request_hash("sample", req.model_dump(mode="json"))
    if idempotency_key:
        found = _existing_for_key(session, tenant, idempotency_key, digest)
        if found is not None:
            return found, False
    params = req.model_dump(mode="json", exclude={"prompts", "max_attempts"})
    params["num_rows"] = len(req.prompts)
    job = Job(type=JobType.sample.value, status=JobStatus.queued.value, params=params, model_id=model.id,
              total_items=total, max_attempts=req.max_attempts or settings.max_attempts)
    job.rows = [_row(i, p) for i, p in enumerate(req.prompts, start=1)]
    return _insert(session, settings, tenant, job, idempotency_key, digest)


def _row(i: int, p: SamplePrompt) -> JobRow:
    # Seeds are fixed at submit time, so a re-run (or a retry after a crash) gives the same pixels.
    seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
    return JobRow(row=i, prompt=p.prompt, negative_prompt=p.negative_prompt, seed=seed,
                  num_images=p.num_images, guidance_scale=p.guidance_scale, steps=p.steps)


def create_train_job(session: Session, settings: Settings, tenant: Tenant, params: TrainParams, *,
                     idempotency_key: str | None = None) -> tuple[Job, bool]:
    dataset_id = None
    if params.dataset not in BUILTIN_DATASETS:
        ds = session.get(Dataset, params.dataset)
        if ds is None or ds.tenant_id != tenant.id:
            raise ApiError(404, "not_found", f"dataset {params.dataset!r} was not found; "
                           f"builtin datasets: {', '.join(BUILTIN_DATASETS)}")
        dataset_id = ds.id
    if params.base_model is not None:
        get_model(session, tenant, params.base_model)
    body = params.model_dump(mode="json")
    digest = request_hash("train", body)
    job = Job(type=JobType.train.value, status=JobStatus.queued.value, params=body, dataset_id=dataset_id,
              total_items=0, max_attempts=settings.max_attempts)
    return _insert(session, settings, tenant, job, idempotency_key, digest)


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, job_id = raw.split("|", 1)
        return datetime.fromisoformat(ts), job_id
    except Exception:
        raise ApiError(422, "invalid_cursor", "cursor is not one this API returned") from None


def list_jobs(session: Session, tenant: Tenant, *, status: str | None, type_: str | None, limit: int,
              cursor: str | None) -> tuple[list[Job], str | None]:
    if status is not None and status not in JOB_STATUSES:
        raise ApiError(422, "invalid_request", f"unknown status {status!r}; valid: {', '.join(JOB_STATUSES)}")
    if type_ is not None and type_ not in JOB_TYPES:
        raise ApiError(422, "invalid_request", f"unknown type {type_!r}; valid: {', '.join(JOB_TYPES)}")
    q = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        q = q.where(Job.status == status)
    if type_:
        q = q.where(Job.type == type_)
    if cursor:
        ts, job_id = _decode_cursor(cursor)
        q = q.where(or_(Job.created_at < ts, and_(Job.created_at == ts, Job.id < job_id)))
    jobs = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def cancel_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = get_job(session, tenant, job_id)
    if not JobStatus(job.status).is_final:
        jobstate.request_cancel(session, job_id)
        session.flush()
        session.refresh(job)
    return job


def list_outputs(session: Session, settings: Settings, storage: Storage, tenant: Tenant, job_id: str
                 ) -> tuple[list[OutputOut], str | None]:
    job = get_job(session, tenant, job_id)
    rows = session.execute(
        select(JobOutput, JobRow.prompt)
        .join(JobRow, and_(JobRow.job_id == JobOutput.job_id, JobRow.row == JobOutput.row))
        .where(JobOutput.job_id == job.id)
        .order_by(JobOutput.row, JobOutput.index)
    ).all()
    prefix = f"{tenant.id}/"
    items = []
    for out, prompt in rows:
        if not out.key.startswith(prefix):  # presigned URLs only under the tenant's own prefix
            continue
        items.append(OutputOut(row=out.row, prompt=prompt, seed=out.seed, index=out.index, key=out.key,
                               url=storage.presigned_url(out.key, settings.presign_expiry_s),
                               width=out.width, height=out.height))
    manifest = None
    if job.type == JobType.sample.value and job.status == JobStatus.succeeded.value:
        manifest = storage.presigned_url(manifest_key(tenant.id, job.id), settings.presign_expiry_s)
    return items, manifest
