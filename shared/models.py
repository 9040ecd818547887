"""SQLAlchemy 2 typed ORM models: the database is the record of truth for every job.

A Celery message only wakes a worker up; the worker claims the job here with a conditional UPDATE
that bumps ``attempts`` (the fencing token) and takes a lease (``lease_owner``, ``lease_expires_at``).
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from shared.catalog import SCHED_AGING_S_DEFAULT

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(DateTime):
    """Timezone-aware everywhere; SQLite stores naive values, so re-attach UTC on the way out."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def result_processor(self, dialect, coltype):  # type: ignore[override]
        parent = super().result_processor(dialect, coltype)

        def process(value):
            if parent is not None:
                value = parent(value)
            if isinstance(value, datetime) and value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            return value

        return process


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType, datetime: UTCDateTime()}


class JobType(str, enum.Enum):
    train = "train"
    sample = "sample"


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(128))
    # After a rotation the old secret still signs deliveries (beside the new one) until this time.
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(128))
    webhook_secret_previous_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Scheduling, set by the operator (``ldmq tenants set``): a share of the fleet by ``weight``
    # (weighted fair share over recent usage), and quotas; None means unlimited.
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    max_running: Mapped[int | None] = mapped_column(Integer)
    max_queued_images: Mapped[int | None] = mapped_column(Integer)
    rate_per_s: Mapped[float | None] = mapped_column(Float)
    rate_burst: Mapped[int | None] = mapped_column(Integer)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """A bearer key, stored as its SHA-256 (keys are 256-bit random, so no slow KDF is needed)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


def sched_key(created_at: datetime, priority: int, aging_s: float) -> float:
    """A job's place in its tenant's queue (lower runs first): its submission time in epoch
    seconds, moved ``priority × aging_s`` seconds earlier. Ordering by it is ordering by the
    effective priority ``priority + waited / aging_s``: higher priority first, FIFO among equals,
    and a job that has waited ``aging_s`` longer than another has gained one level on it, so
    nothing starves. Stored (and indexed) because ``waited`` grows for every row at the same
    rate: the order never changes while jobs wait, so the claim reads it from an index."""
    return created_at.timestamp() - int(priority) * float(aging_s)


def _default_sched_key(context) -> float:
    """The ORM default for rows created without one (tests, tools): the default aging. The API
    sets it from ``Settings.sched_aging_s``."""
    params = context.get_current_parameters()
    created = params.get("created_at") or utcnow()
    return sched_key(created, params.get("priority") or 0, SCHED_AGING_S_DEFAULT)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        # The claim's probe: a tenant's best queued job of a type is the first entry (see
        # shared.scheduler). Partial, so it holds only the queue, not every job ever run.
        Index("ix_jobs_claim", "tenant_id", "type", "sched_key", postgresql_where=text("status = 'queued'"),
              sqlite_where=text("status = 'queued'")),
        # A spread job's pieces (shared.pieces); partial: most jobs are not pieces.
        Index("ix_jobs_parent_id", "parent_id", postgresql_where=text("parent_id IS NOT NULL"),
              sqlite_where=text("parent_id IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    # −10..10: within one tenant, higher runs first (FIFO among equals, with aging).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))

    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    total_items: Mapped[int] = mapped_column(Integer, default=0)
    outputs_count: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    # Where the claim puts it within its tenant's queue (see sched_key); set after created_at and
    # priority, whose values the default reads.
    sched_key: Mapped[float] = mapped_column(Float, default=_default_sched_key, server_default="0")
    # Epoch seconds up to which the run holding the job has been charged to its tenant's fair-share
    # usage (shared.scheduler.charge): set by the claim, moved on by each heartbeat and the end.
    charged_s: Mapped[float | None] = mapped_column(Float)
    # The part of that time its tenant is charged: 1 for a run of its own; a sample job packed
    # with others into one run's batches gets its share of the images (shared.jobstate.share_charge).
    charge_share: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")

    # Leases and fencing: ``attempts`` is bumped by every claim and is the fencing token.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    checkpoint_key: Mapped[str | None] = mapped_column(Text)

    # Spread sample jobs (shared.pieces): a job split at submit has ``pieces`` > 0 and is never
    # claimed itself; each piece is a child row (``parent_id``) that makes the job's images
    # ``[item_start, item_end)`` (positions in the job's rows' images, in row order) and has its
    # own lease, attempts and fencing token. 0 and NULLs: a job that runs whole.
    pieces: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_start: Mapped[int | None] = mapped_column(Integer)
    item_end: Mapped[int | None] = mapped_column(Integer)

    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    rows: Mapped[list[JobRow]] = relationship(
        back_populates="job", order_by="JobRow.row", cascade="all, delete-orphan"
    )


class TenantUsage(Base):
    """A tenant's recent GPU-seconds for fair share: ``usage_s`` as of ``updated_s`` (epoch
    seconds), decaying by half every ``Settings.sched_half_life_s``. One small row per tenant, so
    the claim reads every tenant's standing in the statement that takes the job. The ledger is
    kept decayed (not as a log of charges) because a claim must read it in a fraction of a
    millisecond; ``GET /v1/usage``'s 24-hour figure is computed from job times instead."""

    __tablename__ = "tenant_usage"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    usage_s: Mapped[float] = mapped_column(Float, default=0.0)
    updated_s: Mapped[float] = mapped_column(Float, default=0.0)


class JobRow(Base):
    """One prompt row of a sample job (1-based ``row``, as in the CSV); seeds are fixed at submit."""

    __tablename__ = "job_rows"
    __table_args__ = (UniqueConstraint("job_id", "row", name="uq_job_rows_job_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    row: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    num_images: Mapped[int] = mapped_column(Integer, default=1)
    guidance_scale: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int | None] = mapped_column(Integer)
    # Image-to-image / inpainting: input image ids (``InputImage``, the job's tenant's, checked at
    # submit) and the strength used (the default filled in when the request left it out).
    init_image: Mapped[str | None] = mapped_column(String(32))
    strength: Mapped[float | None] = mapped_column(Float)
    mask_image: Mapped[str | None] = mapped_column(String(32))

    job: Mapped[Job] = relationship(back_populates="rows")


class JobOutput(Base):
    """One stored image. (job, row, index) is unique: an output is never recorded twice."""

    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "row", "index", name="uq_job_outputs_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    row: Mapped[int] = mapped_column(Integer)
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobShard(Base):
    """One WebDataset tar shard of a sample job (``output_format: webdataset``): a fixed set of its
    images, stored create-only under a deterministic key and recorded here once, in the transaction
    that records its images (``job_outputs`` rows whose ``key`` is the shard's)."""

    __tablename__ = "job_shards"
    __table_args__ = (UniqueConstraint("job_id", "shard", name="uq_job_shards_shard"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    shard: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    images: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """An append-only log of what happened to a job (an outbox): webhooks, the dashboard and
    loss curves read it. Written in the same transaction as the state change it reports."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


EVENT_TYPES = ("started", "progress", "row_done", "checkpoint", "succeeded", "failed", "canceled", "requeued",
               "preempted")


class JobWebhook(Base):
    """Where to POST a job's events and which of them (set at submit, one per job).

    ``scanned_through`` is this job's cursor into the ``job_events`` outbox for the delivery loop
    (``shared.processes.webhook_sender``); ``done`` is set once the job's final event has been
    scanned, so the loop only ever looks at jobs whose webhooks can still fire.
    """

    __tablename__ = "job_webhooks"
    __table_args__ = (Index("ix_job_webhooks_done", "done"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]] = mapped_column(default=list)
    scanned_through: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event to POST to one URL, and how its attempts went (``pending`` -> ``delivered`` |
    ``failed``). ``next_attempt_at`` is both the back-off and the lease of a sender that took it."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "url", name="uq_webhook_deliveries_event_url"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job_id_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("job_events.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]


WEBHOOK_DELIVERY_STATUSES = ("pending", "delivered", "failed")


class Model(Base):
    """A diffusers-format text-to-image pipeline in storage (trained here or imported)."""

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    uri: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """An uploaded archive of captioned images (validated whole before it is stored)."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(Text)
    num_images: Mapped[int] = mapped_column(Integer)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InputImage(Base):
    """An uploaded input image (an init image for image-to-image, or an inpainting mask): a PNG or
    JPEG checked from its bytes, stored once as sent under the tenant's prefix, referenced by id from
    prompt rows (``JobRow.init_image`` / ``mask_image``)."""

    __tablename__ = "input_images"
    __table_args__ = (Index("ix_input_images_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StorageDeletion(Base):
    """Stored objects whose record is gone, still to be removed (an outbox of deletions).

    Written in the transaction that deletes the record (a job, model or dataset), so a record never
    goes without its objects being scheduled, and never points at objects already gone. ``path``
    ending in "/" is a prefix (every key under it, except those in ``keep``), else one key. The
    deleter removes the objects after the commit and then this row; a failure leaves the row, and
    the sweeper retries it (``shared.deletion.purge_pending``)."""

    __tablename__ = "storage_deletions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    keep: Mapped[list[Any]] = mapped_column(default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StepTiming(Base):
    """Measured seconds per unit of work, as workers saw them (an exponentially weighted average).

    One row per (kind, model_key, size, batch, guidance, device). ``kind``: ``denoise`` (one
    denoising step of one model batch of ``batch`` images, with classifier-free guidance when
    ``guidance``: the U-Net then runs on twice the batch), ``train_autoencoder`` / ``train_unet`` (one
    optimisation step of ``batch`` images), ``eval_autoencoder`` / ``eval_unet`` (one evaluation at a
    checkpoint). ``model_key``: a model id for sampling, a fingerprint of the cost-bearing train
    parameters for training (``shared.estimates``). ``size``: ``WxH`` in pixels. ``device``: ``cpu`` or
    ``cuda:<device name>``. No foreign key: a timing outlives its model (it is only a figure)."""

    __tablename__ = "step_timings"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_key: Mapped[str] = mapped_column(String(80), primary_key=True)
    size: Mapped[str] = mapped_column(String(32), primary_key=True)
    batch: Mapped[int] = mapped_column(Integer, primary_key=True)
    guidance: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    device: Mapped[str] = mapped_column(String(120), primary_key=True)
    seconds: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
