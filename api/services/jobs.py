"""Jobs: create (with idempotency), estimate (dry run), read, list with cursor pagination, cancel,
outputs, events and webhook deliveries."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session

from pydantic import ValidationError

from api.csvrows import CsvError, CsvLimits, parse_prompts_csv
from api.errors import ApiError, cap_details, not_found
from api.services import estimates, images, quotas
from api.schemas import (
    JOB_STATUSES,
    JOB_TYPES,
    SEED_MAX,
    CheckpointOut,
    EventOut,
    JobOut,
    OutputList,
    OutputOut,
    QueueOut,
    SampleEstimate,
    ShardOut,
    SamplePrompt,
    SampleRequest,
    TrainEstimate,
    TrainRequest,
    WebhookDeliveryOut,
    WebhookSpec,
)
from shared import jobstate, pieces, sampling_defaults, scheduler, usage
from shared.adapters import base_of
from shared.catalog import BUILTIN_DATASETS, denoising_steps, network_evaluations
from shared.db import after_commit
from shared.models import (
    EVENT_TYPES,
    Dataset,
    Job,
    JobEvent,
    JobRow,
    JobStatus,
    JobType,
    JobWebhook,
    Model,
    WebhookDelivery,
    sched_key,
    utcnow,
)
from shared.queue import enqueue
from shared.security import TenantRef
from shared.settings import Settings
from shared.storage import (
    ObjectNotFound,
    ObjectTooLarge,
    Storage,
    checkpoint_prefix,
    job_prefix,
    manifest_key,
    sample_key,
)
from shared.train_schema import TrainParams


def request_hash(kind: str, payload: Any) -> str:
    blob = json.dumps({"kind": kind, "payload": payload}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _webhook_spec(hook: JobWebhook | None) -> WebhookSpec | None:
    return WebhookSpec(url=hook.url, events=list(hook.events or [])) if hook is not None else None


def job_out(job: Job, hook: JobWebhook | None | bool = True, queue: QueueOut | None = None) -> JobOut:
    """The API view of a job. ``hook``: its webhook row, None for none, or True to look it up;
    ``queue``: a queued job's place (:func:`queue_of`)."""
    if hook is True:
        session = object_session(job)
        hook = session.get(JobWebhook, job.id) if session is not None else None
    return JobOut(
        id=job.id, type=job.type, status=job.status, progress=job.progress, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, error=job.error, params=job.params,
        model_id=job.model_id, outputs_count=job.outputs_count, attempts=job.attempts,
        progress_detail=job.progress_detail or {}, total_items=job.total_items, priority=job.priority or 0,
        webhook=_webhook_spec(hook), queue=queue, estimated_seconds=_estimated(job),
    )


def _estimated(job: Job) -> float | None:
    """``estimated_seconds`` of a queued or running job (None once final, or detached from a session)."""
    session = object_session(job)
    if session is None or JobStatus(job.status).is_final:
        return None
    return estimates.job_estimated_seconds(session, job)


def queue_of(session: Session, settings: Settings, job: Job) -> QueueOut | None:
    """Where a queued job stands (``shared.scheduler.queue_position``); None once it left the queue."""
    if job.status != JobStatus.queued.value:
        return None
    now = utcnow()
    pos = scheduler.queue_position(session, settings, job, now)
    start = now + timedelta(seconds=pos.estimated_wait_s) if pos.estimated_wait_s is not None else None
    return QueueOut(jobs_ahead=pos.jobs_ahead, images_ahead=pos.images_ahead, exact=pos.exact,
                    estimated_start_at=start, workers=pos.workers)


class Submitted(NamedTuple):
    """What a submit did: the job, whether this request created it (False: an idempotent replay),
    and the webhook it created with it."""

    job: Job
    created: bool
    webhook: JobWebhook | None = None

    def out(self) -> JobOut:
        # A replay looks its webhook up; a new job's is known (no query).
        return job_out(self.job, self.webhook if self.created else True)


def job_outs(session: Session, jobs: list[Job]) -> list[JobOut]:
    """Many jobs with their webhooks in one query."""
    hooks = {h.job_id: h for h in session.scalars(select(JobWebhook).where(JobWebhook.job_id.in_([j.id for j in jobs])))} if jobs else {}
    return [job_out(j, hooks.get(j.id)) for j in jobs]


def get_job(session: Session, tenant: TenantRef, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id or job.parent_id is not None:  # a piece is not a job of the API
        raise not_found("job", job_id)
    return job


def get_model(session: Session, tenant: TenantRef, model_id: str, *, lock: bool = False) -> Model:
    """The tenant's model (404 otherwise). ``lock``: hold a share lock on its row until the commit,
    so a concurrent DELETE waits and then sees the job that needs it (for references the foreign
    key does not cover, such as a train job's ``base_model``)."""
    model = session.get(Model, model_id, with_for_update={"key_share": True} if lock else None)
    if model is None or model.tenant_id != tenant.id:
        raise not_found("model", model_id)
    return model


def _idempotency_key(raw: str | None) -> str | None:
    """The ``Idempotency-Key`` header, stripped (blank: none); longer than the column is a 422."""
    key = (raw or "").strip() or None
    if key is not None and len(key) > 200:
        raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key is longer than 200 characters")
    return key


def _existing_for_key(session: Session, tenant: TenantRef, key: str, digest: str) -> Job | None:
    """The tenant's job made with ``key``, if any; a 422 when it was made from another request."""
    job = session.scalars(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key)).first()
    if job is not None and job.request_hash != digest:
        raise ApiError(422, "idempotency_key_reused",
                       "this Idempotency-Key was used with a different request body")
    return job


def _create_once(session: Session, settings: Settings, tenant: TenantRef, idempotency_key: str | None,
                 digest: str, build: Callable[[], Job], webhook: WebhookSpec | None, images: int) -> Submitted:
    """The one way a job is created (JSON sample, CSV sample, train), with its idempotency and the
    tenant's queued-images quota.

    With an ``Idempotency-Key`` that already names a job of the tenant, that job is the answer (a
    replay; a 422 if the request differs, by ``digest``) and ``build`` is never called. Otherwise
    the tenant's quota must hold the job's ``images`` (a 429 ``quota_exceeded`` otherwise, nothing
    stored), and the job ``build()`` returns is inserted with its webhook, and enqueued once the
    transaction commits. The quota's lock is taken first, so a replay waiting behind its original
    sees it and is answered as a replay, not refused. Two requests racing with one key: the unique
    (tenant, key) constraint lets one insert win; the other, inside a savepoint, reads the winner's
    job instead.
    """
    key = _idempotency_key(idempotency_key)
    limit = quotas.lock_queued_images(session, tenant)
    if key:
        found = _existing_for_key(session, tenant, key, digest)
        if found is not None:
            return Submitted(found, False)
    quotas.check_queued_images(session, tenant, limit, images)
    job = build()
    job.idempotency_key = key
    job.request_hash = digest
    job.tenant_id = tenant.id
    job.max_attempts = job.max_attempts or settings.max_attempts  # the request's, else the default
    job.enqueued_at = job.created_at = utcnow()
    # Its place in the tenant's queue: priority as a head start of sched_aging_s per level.
    job.sched_key = sched_key(job.created_at, job.priority or 0, settings.sched_aging_s)
    # A big sample job's pieces (shared.pieces says why at submit), inserted after it below.
    parts = pieces.split(job, settings.sample_piece_images)
    if not key:  # nothing to collide with: no savepoint (two round trips) needed
        session.add(job)
        session.flush()
    else:
        try:
            with session.begin_nested():
                session.add(job)
                session.flush()
        except IntegrityError:
            # A concurrent request with the same key won the insert.
            found = _existing_for_key(session, tenant, key, digest)
            if found is None:
                raise
            return Submitted(found, False)
    if parts:
        session.add_all(parts)
        session.flush()
    # One wake-up per piece (idle workers take a spread job's pieces at once), else for the job.
    wake = [p.id for p in parts] or [job.id]
    after_commit(session, lambda: [enqueue(i, job.type, settings) for i in wake])
    return Submitted(job, True, _add_webhook(session, job, webhook))


def _add_webhook(session: Session, job: Job, webhook: WebhookSpec | None) -> JobWebhook | None:
    """Keep the job's webhook beside it, in the transaction that records the job (so it exists
    before the job's first event can)."""
    if webhook is None:
        return None
    hook = JobWebhook(job_id=job.id, url=webhook.url, events=list(webhook.events))
    session.add(hook)
    session.flush()
    return hook


def _sample_problems(settings: Settings, req: SampleRequest, used: dict[str, Any], sources: dict[str, str]
                     ) -> list[dict[str, Any]]:
    """Checks that depend on settings (the schema checks the rest); every problem, not the first.
    ``used``/``sources``: the scheduler, steps and guidance the job would use and where each came from."""
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
        if p.steps is not None and (over := _over_max_steps(settings, used["scheduler"], p.steps)):
            problems.append({"row": i, "column": "steps", "message": over})
        if bad := _strength_problem(p, p.steps if p.steps is not None else used["steps"]):
            problems.append({"row": i, "column": "strength", "message": bad})
    if over := _over_max_steps(settings, used["scheduler"], used["steps"]):
        whose = "" if sources["steps"] == "request" else f" (the {sources['steps']} default: pass steps)"
        problems.append({"field": "steps", "message": over + whose})
    for dim in ("width", "height"):
        v = getattr(req, dim)
        if v is not None and (v % 8 or v > settings.max_image_size):
            problems.append({"field": dim, "message": f"{dim} must be a multiple of 8 and at most {settings.max_image_size}"})
    total = sum(p.num_images for p in req.prompts)
    if total > settings.max_images_per_job:
        problems.append({"field": "prompts", "message": f"{total} images; the limit per job is {settings.max_images_per_job}"})
    if req.max_attempts is not None and req.max_attempts > settings.max_attempts_limit:
        problems.append({"field": "max_attempts", "message": f"max_attempts is {req.max_attempts}; this deployment "
                                                            f"allows at most {settings.max_attempts_limit}"})
    return problems


def _over_max_steps(settings: Settings, scheduler: str, steps: int) -> str | None:
    """``max_steps`` bounds an image's network evaluations: a langevin-pc step costs more than one."""
    nfe = network_evaluations(scheduler, steps)
    if nfe <= settings.max_steps:
        return None
    if nfe == steps:
        return f"steps {steps} is over the limit {settings.max_steps}"
    return f"steps {steps} of {scheduler} cost {nfe} network evaluations; the limit is {settings.max_steps}"


IMAGE_PROMPT_FIELDS = ("init_image", "strength", "mask_image")


def _check_sample(session: Session, settings: Settings, tenant: TenantRef, req: SampleRequest, model: Model
                  ) -> dict[str, Any]:
    """The request checked against the settings and the tenant's input images, with the scheduler,
    steps and guidance it leaves out taken from the model's sampling defaults (else the global
    ones); returns the body as the job records it (its ``params`` and request hash are built from it)."""
    used, sources = sampling_defaults.resolve(
        {f: getattr(req, f) for f in sampling_defaults.FIELDS}, model.config)
    problems = _sample_problems(settings, req, used, sources) + images.prompt_image_problems(session, tenant, req.prompts)
    if problems:
        raise ApiError(422, "invalid_request", "the sample request is invalid", cap_details(problems))
    body = {**req.model_dump(mode="json"), **used}
    # A prompt without image fields hashes as it did before they existed (an Idempotency-Key stays valid).
    body["prompts"] = [{k: v for k, v in p.items() if not (k in IMAGE_PROMPT_FIELDS and v is None)}
                       for p in body["prompts"]]
    return body



def _strength_problem(p: SamplePrompt, steps: int) -> str | None:
    """Image-to-image runs ⌊strength·steps⌋ of the sampler's steps: at least one."""
    strength = p.used_strength()
    if strength is None or denoising_steps(steps, strength) >= 1:
        return None
    return (f"strength {strength:g} × steps {steps} leaves no denoising step (image-to-image runs "
            f"⌊strength·steps⌋ steps): raise strength or steps")


def create_sample_job(session: Session, settings: Settings, tenant: TenantRef, req: SampleRequest, *,
                      idempotency_key: str | None = None, digest: str | None = None) -> Submitted:
    """A sample job. Its ``params`` hold the scheduler, steps and guidance it uses (the request's,
    else the model's defaults, else the global ones); a JSON request is hashed with those values, so
    a body that leaves them out and one that states the same values are the same request (and a key
    used before models had defaults still matches). A CSV upload is hashed as sent (``digest``)."""
    model = get_model(session, tenant, req.model)
    body = _check_sample(session, settings, tenant, req, model)
    total = sum(p.num_images for p in req.prompts)

    # A PNG request at priority 0 hashes as it did before output_format and priority existed (an
    # Idempotency-Key stays valid).
    digest = digest or request_hash("sample", {k: v for k, v in body.items()
                                               if (k, v) not in (("output_format", "png"), ("priority", 0))})

    def build() -> Job:
        params = {k: v for k, v in body.items() if k not in ("prompts", "max_attempts", "webhook", "priority")}
        params["num_rows"] = len(req.prompts)
        if req.output_format == "webdataset":  # fixed now, so every attempt plans the same shards
            params["shard_images"] = settings.wds_shard_images
        job = Job(type=JobType.sample.value, status=JobStatus.queued.value, params=params, model_id=model.id,
                  total_items=total, max_attempts=req.max_attempts, priority=req.priority)
        job.rows = [_row(i, p) for i, p in enumerate(req.prompts, start=1)]
        return job

    return _create_once(session, settings, tenant, idempotency_key, digest, build, req.webhook,
                        usage.images_of(JobType.sample.value, total))


def sample_request_from_csv(settings: Settings, data: bytes, form: dict[str, str | None]
                            ) -> tuple[SampleRequest, str]:
    """A CSV upload and its form fields as a SampleRequest, and the request hash for idempotency.

    Form fields: ``model`` (required), ``scheduler``, ``steps``, ``guidance_scale``, ``priority``, ``webhook_url``,
    ``webhook_events`` (comma-separated; needs ``webhook_url``). Any problem is a 422.
    """
    limits = CsvLimits(max_rows=settings.csv_max_rows, max_prompt_chars=settings.prompt_max_chars,
                       max_images_per_row=settings.max_images_per_row, max_steps=settings.max_steps)
    try:
        prompts = parse_prompts_csv(data, limits)
    except CsvError as exc:
        raise ApiError(422, "invalid_csv", exc.message, cap_details(exc.details)) from None
    model = form.get("model")
    body: dict[str, Any] = {"model": model, "prompts": [p.model_dump(exclude_none=True) for p in prompts]}
    for name in ("scheduler", "steps", "guidance_scale", "priority", "output_format"):
        if form.get(name) not in (None, ""):
            body[name] = form[name]
    url, events = (form.get("webhook_url") or "").strip(), (form.get("webhook_events") or "").strip()
    if events and not url:
        raise ApiError(422, "invalid_request", "webhook_events needs webhook_url",
                       [{"field": "webhook_url", "message": "required with webhook_events"}])
    if url:
        body["webhook"] = {"url": url}
        if events:
            body["webhook"]["events"] = [e.strip() for e in events.split(",") if e.strip()]
    if not model:
        raise ApiError(422, "invalid_request", "the form field 'model' (a model id) is required",
                       [{"field": "model", "message": "required"}])
    try:
        req = SampleRequest.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", "the form fields are invalid",
                       [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]) from None
    digest = request_hash("sample-csv", {"csv": hashlib.sha256(data).hexdigest(),
                                         "form": {k: v for k, v in body.items() if k != "prompts"}})
    return req, digest


def estimate_sample(session: Session, settings: Settings, tenant: TenantRef, req: SampleRequest) -> SampleEstimate:
    """Validate a sample request as a submit would, resolve its model, and estimate its GPU time
    (``api.services.estimates``: measured timings when there are some; langevin-pc's corrector
    evaluations counted), storing and enqueueing nothing; ``quota`` says whether the tenant's
    queued-images quota would refuse it now (a submit checks again: the queue moves)."""
    model = get_model(session, tenant, req.model)
    body = _check_sample(session, settings, tenant, req, model)
    images = sum(p.num_images for p in req.prompts)
    row_steps = [(p.num_images, denoising_steps(p.steps if p.steps is not None else body["steps"], p.used_strength()))
                 for p in req.prompts]
    steps = sum(n * k for n, k in row_steps)
    nfe = sum(n * network_evaluations(body["scheduler"], k) for n, k in row_steps)
    est = estimates.sample_seconds(session, model, estimates.sample_groups(req, body),
                                   estimates.sample_size(model, req.width, req.height))
    return SampleEstimate(model_id=model.id, rows=len(req.prompts), images=images, denoising_steps=steps,
                          network_evaluations=nfe, unet_steps=est["unet_steps"],
                          seconds_per_step=est["seconds_per_step"], seconds_per_step_source=est["source"],
                          measurement=est["measurement"], estimated_gpu_seconds=round(est["seconds"], 3),
                          scheduler=body["scheduler"], steps=body["steps"], guidance_scale=body["guidance_scale"],
                          quota=quotas.queued_images_verdict(session, tenant, images))


def estimate_train(session: Session, settings: Settings, tenant: TenantRef, req: TrainRequest) -> TrainEstimate:
    """A train request checked as a submit would check it (bounds, dataset, base model) and its
    estimate; nothing is stored or enqueued."""
    params = req.train_params()
    _check_train_inputs(session, settings, tenant, params)
    return estimates.train_estimate(session, params)


def _row(i: int, p: SamplePrompt) -> JobRow:
    # Seeds are fixed at submit time, so a re-run (or a retry after a crash) gives the same pixels.
    seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
    return JobRow(row=i, prompt=p.prompt, negative_prompt=p.negative_prompt, seed=seed,
                  num_images=p.num_images, guidance_scale=p.guidance_scale, steps=p.steps,
                  init_image=p.init_image, strength=p.used_strength(), mask_image=p.mask_image)


def check_train_bounds(settings: Settings, params: TrainParams) -> None:
    """What one train job may cost, as the operator bounds it (``LDMQ_TRAIN_*``): 422 listing every
    field over its bound. The schema's own limits are wider; these are the deployment's."""
    total = params.steps + (0 if params.base_model else params.autoencoder_steps)
    over = [(f, v, b) for f, v, b in (
        ("steps", total, settings.train_max_steps),
        ("batch_size", params.batch_size, settings.train_max_batch_size),
        ("resolution", params.resolution, settings.train_max_resolution),
        ("eval_num_samples", params.eval_num_samples, settings.train_max_eval_samples),
        ("keep_checkpoints", params.keep_checkpoints, settings.train_max_keep_checkpoints),
    ) if v > b]
    details = [{"field": f, "message": f"{'autoencoder_steps + steps' if f == 'steps' else f} is {v}; "
                                       f"this deployment allows at most {b}"} for f, v, b in over]
    checkpoints = -(-total // params.checkpoint_every)
    if checkpoints > settings.train_max_checkpoints:
        details.append({"field": "checkpoint_every", "message": f"checkpoint_every {params.checkpoint_every} makes "
                        f"{checkpoints} checkpoints; this deployment allows at most {settings.train_max_checkpoints}"})
    if details:
        raise ApiError(422, "invalid_request", "the train job is over this deployment's limits", details)


def _check_train_inputs(session: Session, settings: Settings, tenant: TenantRef, params: TrainParams, *,
                        lock: bool = False) -> str | None:
    """The deployment's bounds, the tenant's dataset (404 otherwise) and base model; returns the
    dataset id (None for a builtin one). ``lock``: share-lock the base model (see ``get_model``)."""
    check_train_bounds(settings, params)
    dataset_id = None
    if params.dataset not in BUILTIN_DATASETS:
        ds = session.get(Dataset, params.dataset)
        if ds is None or ds.tenant_id != tenant.id:
            raise ApiError(404, "not_found", f"dataset {params.dataset!r} was not found; "
                           f"builtin datasets: {', '.join(BUILTIN_DATASETS)}")
        dataset_id = ds.id
    if params.base_model is not None:
        base = get_model(session, tenant, params.base_model, lock=lock)
        if base_of(base.config) is not None:
            raise ApiError(422, "invalid_request", f"base_model {base.id!r} is a LoRA adapter of "
                           f"{base_of(base.config)!r}; fine-tune a pipeline model (its base)",
                           [{"field": "base_model", "message": "a LoRA model cannot be a base model"}])
    return dataset_id


def create_train_job(session: Session, settings: Settings, tenant: TenantRef, req: TrainRequest | TrainParams, *,
                     idempotency_key: str | None = None) -> Submitted:
    webhook = req.webhook if isinstance(req, TrainRequest) else None
    priority = req.priority if isinstance(req, TrainRequest) else 0
    params = req.train_params() if isinstance(req, TrainRequest) else req
    dataset_id = _check_train_inputs(session, settings, tenant, params, lock=True)
    body = params.model_dump(mode="json")
    # The webhook is part of the request (so a key reused with another webhook is refused) but not
    # of the params the worker reads.
    extra: dict[str, Any] = {} if webhook is None else {"webhook": webhook.model_dump(mode="json")}
    if priority:
        extra["priority"] = priority
    digest = request_hash("train", {**body, **extra} if extra else body)
    return _create_once(session, settings, tenant, idempotency_key, digest,
                        lambda: Job(type=JobType.train.value, status=JobStatus.queued.value, params=body,
                                    dataset_id=dataset_id, total_items=0, priority=priority),
                        webhook, usage.images_of(JobType.train.value, 0))


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


def list_jobs(session: Session, tenant: TenantRef, *, status: str | None, type_: str | None, limit: int,
              cursor: str | None) -> tuple[list[Job], str | None]:
    if status is not None and status not in JOB_STATUSES:
        raise ApiError(422, "invalid_request", f"unknown status {status!r}; valid: {', '.join(JOB_STATUSES)}")
    if type_ is not None and type_ not in JOB_TYPES:
        raise ApiError(422, "invalid_request", f"unknown type {type_!r}; valid: {', '.join(JOB_TYPES)}")
    q = select(Job).where(Job.tenant_id == tenant.id, Job.parent_id.is_(None))
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


def cancel_job(session: Session, tenant: TenantRef, job_id: str) -> Job:
    job = get_job(session, tenant, job_id)
    if not JobStatus(job.status).is_final:
        jobstate.request_cancel(session, job_id)
        session.flush()
        session.refresh(job)
    return job


def output_format(job: Job) -> str:
    return (job.params or {}).get("output_format", "png")


def list_outputs(session: Session, settings: Settings, storage: Storage, tenant: TenantRef, job_id: str
                 ) -> OutputList:
    job = get_job(session, tenant, job_id)
    prefix = f"{tenant.id}/"
    webdataset = output_format(job) == "webdataset"
    urls: dict[str, str] = {}  # one presigned URL per object (a shard holds many images)

    def url(key: str) -> str:
        if key not in urls:
            urls[key] = storage.presigned_url(key, settings.presign_expiry_s)
        return urls[key]

    items = []
    for out, row in jobstate.outputs_with_rows(session, job.id):
        if not out.key.startswith(prefix):  # presigned URLs only under the tenant's own prefix
            continue
        items.append(OutputOut(row=out.row, prompt=row.prompt, seed=out.seed, index=out.index, key=out.key,
                               url=url(out.key), width=out.width, height=out.height,
                               member=f"{sample_key(out.row, out.index)}.png" if webdataset else None,
                               init_image=row.init_image, strength=row.strength, mask_image=row.mask_image))
    shards = [ShardOut(shard=sh.shard, key=sh.key, url=url(sh.key), sha256=sh.sha256, bytes=sh.bytes, images=sh.images)
              for sh in jobstate.shards_of(session, job.id) if sh.key.startswith(prefix)]
    manifest = None
    if job.type == JobType.sample.value and job.status == JobStatus.succeeded.value:
        manifest = storage.presigned_url(manifest_key(tenant.id, job.id), settings.presign_expiry_s)
    return OutputList(items=items, manifest_url=manifest, output_format=output_format(job), shards=shards)


CHECKPOINT_DIR = re.compile(r"/checkpoints/step-(\d+)-a(\d+)/([^/]+)$")
METRICS_MAX_BYTES = 1 << 20


def list_checkpoints(session: Session, settings: Settings, storage: Storage, tenant: TenantRef, job_id: str
                     ) -> list[CheckpointOut]:
    """A train job's stored checkpoints (the last ``keep_checkpoints``), oldest first, each with the
    evaluation stored beside it and presigned links to its sample grid and loss curve."""
    job = get_job(session, tenant, job_id)
    if job.type != JobType.train.value:
        return []
    found: dict[tuple[int, int], set[str]] = {}
    for key in storage.list(f"{job_prefix(tenant.id, job.id)}/checkpoints/"):
        m = CHECKPOINT_DIR.search(key)
        if m:
            found.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    latest = (job.checkpoint_key or "").rstrip("/")
    items = []
    for (step, attempt), names in sorted(found.items()):
        prefix = f"{checkpoint_prefix(tenant.id, job.id, step)}-a{attempt}"

        def url(name: str) -> str | None:
            return storage.presigned_url(f"{prefix}/{name}", settings.presign_expiry_s) if name in names else None

        items.append(CheckpointOut(step=step, attempt=attempt, latest=prefix == latest,
                                   metrics=_small_json(storage, f"{prefix}/metrics.json") if "metrics.json" in names else {},
                                   grid_url=url("samples.png"), loss_curve_url=url("loss_curve.png")))
    return items


def _small_json(storage: Storage, key: str) -> dict:
    """A small JSON object written by the worker; anything else (too big, not an object) is left out."""
    buf = io.BytesIO()
    try:
        storage.read_into(key, buf, max_bytes=METRICS_MAX_BYTES)
        value = json.loads(buf.getvalue())
    except (ObjectTooLarge, ObjectNotFound, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def parse_event_types(types: str | None) -> list[str] | None:
    """``"progress,succeeded"`` -> a list; unknown names are a 422 listing the valid ones."""
    if types is None or not types.strip():
        return None
    wanted = [t.strip() for t in types.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in EVENT_TYPES]
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown event type(s) {', '.join(map(repr, unknown))}; "
                       f"valid: {', '.join(EVENT_TYPES)}", [{"field": "types", "message": "unknown event type"}])
    return wanted


def list_events(session: Session, tenant: TenantRef, job_id: str, *, after_id: int, limit: int,
                types: list[str] | None) -> tuple[list[EventOut], int, bool]:
    """A job's events in the order they happened (ascending id), after ``after_id``.

    Returns (events, next_after_id, has_more). A job's events commit in id order (each writer
    locks the job's row first), so polling with ``after_id`` misses none.
    """
    job = get_job(session, tenant, job_id)
    q = select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.id > after_id)
    if types:
        q = q.where(JobEvent.type.in_(types))
    rows = list(session.scalars(q.order_by(JobEvent.id).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    items = [EventOut(id=e.id, type=e.type, data=e.data or {}, created_at=e.created_at) for e in rows]
    return items, (rows[-1].id if rows else after_id), has_more


def list_deliveries(session: Session, tenant: TenantRef, job_id: str, limit: int) -> list[WebhookDeliveryOut]:
    """The job's webhook deliveries (newest first) with how their attempts went."""
    job = get_job(session, tenant, job_id)
    rows = session.execute(
        select(WebhookDelivery, JobEvent.type)
        .join(JobEvent, JobEvent.id == WebhookDelivery.event_id)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    ).all()
    return [WebhookDeliveryOut(id=d.id, event_id=d.event_id, event_type=t, url=d.url, status=d.status,
                               attempts=d.attempts, next_attempt_at=d.next_attempt_at,
                               last_status_code=d.last_status_code, last_error=d.last_error,
                               created_at=d.created_at, last_attempt_at=d.last_attempt_at,
                               delivered_at=d.delivered_at) for d, t in rows]
