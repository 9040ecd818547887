"""Request and response schemas of the REST contract (``docs/api.md``), separate from
the ORM models. Limits that depend on settings are checked in the service layer."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.catalog import (
    DEFAULT_STRENGTH, DEFAULT_OUTPUT_FORMAT, OUTPUT_FORMATS, PRIORITY_HELP, PRIORITY_MAX, PRIORITY_MIN, OutputFormat, SchedulerName,
)
from shared.models import JobStatus, JobType
from shared.sampling_defaults import GLOBAL_DEFAULTS, GUIDANCE_MAX, SamplingDefaults
from shared.train_schema import TrainParams
from shared.webhooks import DEFAULT_WEBHOOK_EVENTS, SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_EVENTS, check_url

JOB_STATUSES = tuple(s.value for s in JobStatus)
JOB_TYPES = tuple(t.value for t in JobType)
SEED_MAX = 2**31 - 1
# A prompt's fields that only mean something with an init_image.
IMAGE_FIELDS_NEEDING_INIT = ("strength", "mask_image")


def _no_control_chars(v: str) -> str:
    """NUL and other control characters (tab and newlines aside) have no place in a prompt."""
    bad = sorted({f"U+{ord(c):04X}" for c in v if (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 0x7F})
    if bad:
        raise ValueError(f"prompt contains control characters: {', '.join(bad)}")
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplePrompt(Strict):
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    num_images: int = Field(default=1, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    steps: int | None = Field(default=None, ge=1)
    init_image: str | None = Field(default=None, min_length=1, max_length=64, description=(
        "An input image id (POST /v1/images): image-to-image from it, or inpainting with mask_image."))
    strength: float | None = Field(default=None, gt=0, le=1, description=(
        f"How much of the init image is redrawn, in (0, 1]: sampling starts at t ≈ strength·T and runs "
        f"⌊strength·steps⌋ steps; default {DEFAULT_STRENGTH} with an init_image. Needs init_image."))
    mask_image: str | None = Field(default=None, min_length=1, max_length=64, description=(
        "An input image id: inpainting; white (≥ 50% grey) is redrawn, black kept. Needs init_image."))

    def used_strength(self) -> float | None:
        """The strength the row uses (what the job's row records): its own, else the default with an
        init image; None without one."""
        if self.init_image is None:
            return None
        return self.strength if self.strength is not None else DEFAULT_STRENGTH

    @model_validator(mode="after")
    def _image_fields_need_init(self) -> "SamplePrompt":
        for name in IMAGE_FIELDS_NEEDING_INIT:
            if getattr(self, name) is not None and self.init_image is None:
                raise ValueError(f"{name} needs init_image (an input image id from POST /v1/images)")
        return self

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty")
        return _no_control_chars(v)

    @field_validator("negative_prompt")
    @classmethod
    def _clean_negative(cls, v: str | None) -> str | None:
        return None if v is None else _no_control_chars(v)


class WebhookSpec(Strict):
    """Where to POST a job's events. Each POST is signed with the tenant's webhook secret
    (``GET /v1/webhooks/secret``): ``X-Ldmq-Signature: sha256=<hex HMAC-SHA256 of
    "<X-Ldmq-Timestamp>.<body>">``. Delivery is at least once; order by ``event_id``."""

    url: str = Field(min_length=1, max_length=2000, description="http(s) URL that receives the POSTs.")
    events: list[str] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS),
        description=f"Which events to send, a subset of {', '.join(WEBHOOK_EVENTS)}; "
                    f"default: {', '.join(DEFAULT_WEBHOOK_EVENTS)}.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return check_url(v)

    @field_validator("events")
    @classmethod
    def _known_events(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"events must name at least one of: {', '.join(WEBHOOK_EVENTS)}")
        unknown = [e for e in v if e not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(f"unknown event(s) {', '.join(map(repr, unknown))}; valid: {', '.join(WEBHOOK_EVENTS)}")
        return list(dict.fromkeys(v))  # de-duplicated, order kept


_UNSET = " Left out (null): the model's sampling_defaults, else {}."


class SampleRequest(Strict):
    """A sample job. ``scheduler``, ``steps`` and ``guidance_scale`` left out (null) take the model's
    ``sampling_defaults``, else the global defaults (``shared.sampling_defaults``); the job's
    ``params`` hold the values used."""

    model: str = Field(min_length=1, description="A model id.")
    prompts: list[SamplePrompt] = Field(min_length=1)
    scheduler: SchedulerName | None = Field(default=None, description="Sampler." + _UNSET.format(
        GLOBAL_DEFAULTS["scheduler"]))
    steps: int | None = Field(default=None, ge=1, description="Denoising steps." + _UNSET.format(GLOBAL_DEFAULTS["steps"]))
    guidance_scale: float | None = Field(default=None, ge=0, le=GUIDANCE_MAX, description="Classifier-free guidance."
                                         + _UNSET.format(GLOBAL_DEFAULTS["guidance_scale"]))
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    max_attempts: int | None = Field(default=None, ge=1, le=10)
    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description=PRIORITY_HELP)
    webhook: WebhookSpec | None = None
    output_format: OutputFormat = Field(default=DEFAULT_OUTPUT_FORMAT, description=(
        f"One of {', '.join(OUTPUT_FORMATS)}: a PNG per image, or WebDataset tar shards (<row>-<index>.png and "
        ".json per image, LDMQ_WDS_SHARD_IMAGES images a shard)."))


class TrainRequest(TrainParams):
    """The body of ``POST /v1/jobs/train``: the training parameters plus an optional webhook and
    priority. Both are kept beside the job, not in its params (the worker reads those as TrainParams)."""

    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description=PRIORITY_HELP)
    webhook: WebhookSpec | None = None

    def train_params(self) -> TrainParams:
        return TrainParams.model_validate(self.model_dump(exclude={"webhook", "priority"}))


class QuotaVerdict(BaseModel):
    """A job's images against the tenant's ``max_queued_images`` (None: no quota)."""

    max_queued_images: int | None
    images_queued: int = Field(description="The tenant's images queued or in progress, not yet made.")
    images_requested: int
    would_exceed: bool


class SampleEstimate(BaseModel):
    """The answer of a dry run: the request is valid; nothing was stored or enqueued."""

    valid: bool = True
    dry_run: bool = True
    model_id: str
    rows: int
    images: int
    denoising_steps: int = Field(description="Sum over images of their sampling steps.")
    network_evaluations: int = Field(description="Sum over images of the U-Net evaluations their steps cost: "
                                                 "one a step, more with langevin-pc (see GET /v1/schedulers).")
    unet_steps: int = Field(description="denoising_steps with each guided image's counted twice (guidance > 1 runs "
                                        "the U-Net on the unconditional and the conditional half).")
    seconds_per_step: float = Field(description="Seconds of one unguided U-Net step of one image (measured: a "
                                                "batch-step's seconds over the batch).")
    seconds_per_step_source: str = Field(description="'measured' (timings workers recorded; 'measured, scaled for "
                                                     "guidance' when only the other kind of step was), 'model' (the "
                                                     "model's config.seconds_per_step) or 'default' (a setting).")
    measurement: dict[str, Any] | None = Field(default=None, description="The measured figure used: device, "
                                               "batch_size, size, samples (steps measured); null without one.")
    estimated_gpu_seconds: float = Field(description="Measured: model batches × steps × seconds per batch-step, per "
                                                     "(steps, guidance) group; else unet_steps × seconds_per_step.")
    scheduler: str
    steps: int
    guidance_scale: float
    quota: QuotaVerdict | None = Field(default=None, description=(
        "Whether the tenant's queued-images quota would refuse this job now (a submit checks again)."))


class Quotas(BaseModel):
    """A tenant's limits as they apply now (None: unlimited)."""

    max_running: int | None
    max_queued_images: int | None
    rate_per_s: float | None = Field(description="Requests per second to /v1 (the tenant's own, else the "
                                                 "deployment's LDMQ_RATE_PER_S).")
    rate_burst: int | None = Field(description="Requests at once before the rate applies.")


class UsageOut(BaseModel):
    """GET /v1/usage: the caller's tenant, its weight, quotas, queue and recent use."""

    tenant: str
    weight: float
    quotas: Quotas
    jobs_running: int
    jobs_queued: int
    images_queued: int = Field(description="Images of queued and running sample jobs not yet made, plus one "
                                           "per queued or running train job (what max_queued_images bounds).")
    gpu_seconds_24h: float = Field(description="Wall time of the tenant's runs holding a worker over the last "
                                               "24 h (co-batched jobs each count their own).")
    window_s: int
    as_of: datetime


class TrainEstimate(BaseModel):
    """The answer of a train dry run: the request is valid; nothing was stored or enqueued."""

    valid: bool = True
    dry_run: bool = True
    dataset: str
    total_steps: int = Field(description="Global steps: autoencoder (unless fine-tuning) + U-Net.")
    estimated_gpu_seconds: float = Field(description="Sum over parts of units × seconds_each.")
    source: str = Field(description="'measured', 'default' or 'partly measured' (some parts measured).")
    parts: list[dict[str, Any]] = Field(description="Per kind (train_autoencoder, train_unet, eval_autoencoder, "
                                                    "eval_unet): units (steps or evaluations), seconds_each, source, "
                                                    "device.")


class ImportModelRequest(Strict):
    source: str = Field(description="s3://bucket/prefix of a diffusers-format pipeline directory")
    name: str | None = None
    sampling_defaults: SamplingDefaults | None = Field(
        default=None, description="What sample jobs of this model use when they leave scheduler, steps or "
                                  "guidance_scale out (steps within the deployment's max_steps).")


class QueueOut(BaseModel):
    """Where a queued job stands under the scheduling policy: an estimate (docs/api.md "Scheduling")."""

    jobs_ahead: int = Field(description="Queued jobs of the same type expected to start before this one.")
    images_ahead: int = Field(description="Their images (train jobs count 0).")
    exact: bool = Field(description="False when a tenant's queue was too long to read whole (then 'at least').")
    estimated_start_at: datetime | None = Field(description=(
        "Now + images ahead × a seconds-per-image figure / the jobs of this type running now; null for train jobs."))
    workers: int = Field(description="Jobs of this type running now (the estimate's stand-in for free capacity).")


class JobOut(BaseModel):
    id: str
    type: str
    status: str
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: dict[str, Any] | None
    params: dict[str, Any]
    model_id: str | None
    outputs_count: int
    attempts: int
    progress_detail: dict[str, Any] = Field(default_factory=dict)
    total_items: int = 0
    priority: int = 0
    webhook: WebhookSpec | None = None
    queue: QueueOut | None = Field(default=None, description=(
        "A queued job's place (GET /v1/jobs/{id} only; null otherwise and in lists)."))
    estimated_seconds: float | None = Field(default=None, description=(
        "GPU-seconds of the work a queued or running job still has (its own, not the jobs ahead of it), "
        "as a dry run estimates them; null once final."))


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class OutputOut(BaseModel):
    row: int
    prompt: str
    seed: int
    index: int
    key: str = Field(description="The PNG's key; for webdataset, the key of the shard that holds it.")
    url: str = Field(description="Presigned URL of that object.")
    width: int
    height: int
    member: str | None = Field(default=None, description="webdataset: the PNG's name inside its shard.")
    init_image: str | None = Field(default=None, description="The row's init image id (image-to-image, inpainting).")
    strength: float | None = Field(default=None, description="The strength the row used (with init_image).")
    mask_image: str | None = Field(default=None, description="The row's mask image id (inpainting).")


class ShardOut(BaseModel):
    shard: int
    key: str
    url: str = Field(description="Presigned URL of the tar.")
    sha256: str
    bytes: int
    images: int


class OutputList(BaseModel):
    items: list[OutputOut]
    manifest_url: str | None
    output_format: str = DEFAULT_OUTPUT_FORMAT
    shards: list[ShardOut] = Field(default_factory=list, description="webdataset: the stored shards, in order.")


class CheckpointOut(BaseModel):
    step: int = Field(description="Global step (autoencoder + U-Net) the checkpoint was written at.")
    attempt: int = Field(description="The job attempt that wrote it.")
    latest: bool = Field(description="The checkpoint a resumed run starts from.")
    metrics: dict[str, Any] = Field(description="The evaluation stored with it (losses, accuracy, Fréchet, VLB …); "
                                                "empty when it was not evaluated.")
    grid_url: str | None = Field(description="Presigned URL of its sample grid (PNG), if any.")
    loss_curve_url: str | None = Field(description="Presigned URL of the loss curve up to it (PNG), if any.")


class CheckpointList(BaseModel):
    items: list[CheckpointOut]


class ModelOut(BaseModel):
    id: str
    name: str
    uri: str
    created_at: datetime
    job_id: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    sampling_defaults: SamplingDefaults | None = Field(
        default=None, description="What a sample job of this model uses for scheduler, steps and guidance_scale "
                                  "it leaves out: chosen by the training job's evaluation, or stated at import.")
    artifact_urls: dict[str, str] = Field(
        default_factory=dict, description="Presigned links to metrics['artifacts'] (loss curve, sample grid...).")


class ModelFileOut(BaseModel):
    path: str = Field(description="Relative path inside the pipeline folder (e.g. unet/config.json).")
    sha256: str
    url: str = Field(description="Presigned URL (expires after LDMQ_PRESIGN_EXPIRY_S).")


class ModelFiles(BaseModel):
    model_id: str
    sha256: str | None = Field(description="The model's content hash: SHA-256 over its files' sorted "
                                           "'path NUL sha256 LF' lines (null for a model stored before hashes).")
    items: list[ModelFileOut]


class ModelList(BaseModel):
    items: list[ModelOut]


class EventOut(BaseModel):
    id: int
    type: str
    data: dict[str, Any]
    created_at: datetime


class EventList(BaseModel):
    items: list[EventOut]
    next_after_id: int = Field(description="Pass as after_id to continue (the last id seen, or the after_id given).")
    has_more: bool = Field(description="True when the page was full: more events may follow at once.")


class WebhookDeliveryOut(BaseModel):
    id: int
    event_id: int
    event_type: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None


class WebhookDeliveryList(BaseModel):
    items: list[WebhookDeliveryOut]


class WebhookSecretOut(BaseModel):
    secret: str
    algorithm: str = "hmac-sha256"
    signature_header: str = SIGNATURE_HEADER
    timestamp_header: str = TIMESTAMP_HEADER
    signed_payload: str = "<X-Ldmq-Timestamp>.<raw request body>"
    previous_valid_until: datetime | None = Field(default=None, description=(
        "After a rotation: until then deliveries also carry a signature made with the previous secret."))


class ImageOut(BaseModel):
    """An uploaded input image (an init image or a mask)."""

    id: str
    width: int
    height: int
    format: str = Field(description="PNG or JPEG, as read from the bytes")
    bytes: int
    sha256: str
    created_at: datetime


class DatasetOut(BaseModel):
    id: str
    name: str
    num_images: int
    created_at: datetime
    info: dict[str, Any]


class DatasetList(BaseModel):
    items: list[DatasetOut]


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorBody(BaseModel):
    error: ErrorInfo


class SchedulerOut(BaseModel):
    name: str
    description: str


class SchedulerList(BaseModel):
    items: list[SchedulerOut]
