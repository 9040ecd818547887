"""One typed settings object for every ldmq process (env prefix ``LDMQ_``, also read from ``.env``).

The embedded defaults need no server: SQLite and a local object folder under ``./var`` and a
file-system Celery transport, so ``ldmq demo`` runs on a bare machine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.catalog import SCHED_AGING_S_DEFAULT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LDMQ_", env_file=".env", extra="ignore")

    var_dir: Path = Field(default=Path("var"), description="Where embedded defaults keep their state.")
    database_url: str = Field(default="", description="SQLAlchemy URL; default: SQLite under var_dir.")
    broker_url: str = Field(default="", description="Celery broker URL; default: file-system transport.")
    storage_url: str = Field(default="", description="s3://bucket/prefix or file:///path.")
    s3_endpoint_url: str | None = Field(default=None, description="For MinIO or another S3 server.")
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint as clients reach it, when it differs from s3_endpoint_url (compose: the "
        "API and workers use http://minio:9000, a browser http://localhost:9000). Presigned URLs are signed for "
        "this host: a URL signed for one host does not verify on another.",
    )
    s3_region: str = "us-east-1"
    presign_expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)

    # Limits on what a client may send.
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    dataset_max_bytes: int = Field(default=2 * 1024**3, ge=1024, description=(
        "The largest dataset upload (POST /v1/datasets): spooled to disk and stored streamed, so it may be "
        "far larger than max_body_bytes, which bounds every other request."))
    dataset_max_uncompressed_bytes: int = Field(default=2 * 1024**3, ge=1024, description=(
        "The most bytes a dataset archive may hold once uncompressed (counted while reading, too)."))
    dataset_max_images: int = Field(default=50_000, ge=1)
    csv_max_rows: int = Field(default=10_000, ge=1)
    prompt_max_chars: int = Field(default=1000, ge=1)
    max_images_per_row: int = Field(default=16, ge=1)
    max_images_per_job: int = Field(default=50_000, ge=1)
    max_steps: int = Field(default=1000, ge=1, description=(
        "The most network evaluations one image may cost: its steps, or more with langevin-pc's corrector."))
    max_image_size: int = Field(default=1024, ge=8)
    input_image_max_bytes: int = Field(default=8 * 2**20, ge=1024, description=(
        "The largest input image upload (POST /v1/images: an init image or a mask), in bytes; beyond: 413."))
    input_image_max_pixels: int = Field(default=2048 * 2048, ge=64, description=(
        "The most pixels (width x height) an input image may declare; checked from its header before it is "
        "decoded (a decompression bomb of a few KB can declare gigapixels). Beyond: 413. Jobs resize inputs to "
        "their own width x height, which max_image_size already bounds."))
    model_import_sources: str = Field(default="", description=(
        "Comma-separated s3://bucket/prefix/ locations a tenant may import pipelines from, besides its "
        "own prefix in ldmq's storage (e.g. an operator's shared model library)."))
    model_import_max_bytes: int = Field(default=16 * 2**30, ge=1, description=(
        "The most bytes one model import may copy (counted as they arrive)."))
    model_import_max_files: int = Field(default=200, ge=1, description="The most files one model import may hold.")
    api_threads: int = Field(default=8, ge=1, le=200, description=(
        "Threads the API runs blocking work on (sync routes, commits, key lookups); requests beyond them wait "
        "their turn on the event loop. Commits have as many threads again, of their own."))
    auth_cache_s: float = Field(default=5.0, ge=0, description=(
        "How long the API remembers a valid API key (by its SHA-256) before asking the database again: a "
        "revoked key stops working within this many seconds. 0: every request asks the database."))
    stream_poll_s: float = Field(default=1.0, gt=0, le=60, description=(
        "How often an open GET /v1/jobs/{id}/stream asks the database for new events (one indexed query "
        "on a pooled connection, none held in between)."))
    stream_heartbeat_s: float = Field(default=15.0, gt=0, description=(
        "A comment line is sent on a quiet stream this often, so proxies do not close it as idle."))
    stream_max_s: float = Field(default=1800.0, gt=0, description=(
        "The longest one stream stays open; the client then reconnects with Last-Event-ID and misses nothing."))
    stream_max_per_tenant: int = Field(default=16, ge=1, description=(
        "Streams one tenant may hold open at once, per API process (beyond: 429 with Retry-After)."))
    webhook_secret_grace_s: float = Field(default=24 * 3600, ge=0, description=(
        "After POST /v1/webhooks/secret/rotate, how long deliveries are also signed with the old secret."))
    metrics_token: str = Field(default="", description=(
        "When set, GET /metrics answers only requests with Authorization: Bearer <this token>."))
    auth_failure_burst: int = Field(default=10, ge=1, description=(
        "Failed authentications a client address may make in a burst before it is answered 429."))
    auth_failure_per_minute: float = Field(default=20.0, gt=0, description=(
        "The rate at which a client address regains failed attempts once the burst is spent."))
    rate_per_s: float | None = Field(default=None, gt=0, description=(
        "Requests per second a tenant may make to /v1 (a token bucket shared by every API process), for "
        "tenants without a rate of their own (`ldmq tenants set --rate`). Unset: unlimited."))
    rate_burst: int | None = Field(default=None, ge=1, description=(
        "Requests a tenant may make at once before its rate applies, for tenants without a burst of their "
        "own. Unset: one second's worth of the rate (at least 1)."))
    ratelimit_redis_url: str = Field(default="", description=(
        "The Redis that holds the request-rate buckets (tenants' rates, failed authentications) so every API "
        "process shares them. Default: the broker's URL when it is a redis:// one; otherwise (the embedded "
        "default) each API process keeps its own buckets."))

    # Jobs and leases (the database is the record of truth; a Celery message is a wake-up call).
    lease_seconds: int = Field(default=60, ge=2)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    max_attempts_limit: int = Field(default=5, ge=1, description=(
        "The most attempts a request may ask for (its max_attempts); a request cannot raise this."))
    # Bounds on what one train job may cost, which a request cannot raise (422 beyond them).
    train_max_steps: int = Field(default=200_000, ge=1, description="autoencoder_steps + steps of one train job")
    train_max_batch_size: int = Field(default=512, ge=1)
    train_max_resolution: int = Field(default=512, ge=8)
    train_max_checkpoints: int = Field(default=200, ge=1, description=(
        "The most checkpoints one job may write: (autoencoder + U-Net steps) / checkpoint_every (each is an "
        "upload and, by default, an evaluation)."))
    train_max_eval_samples: int = Field(default=1000, ge=10)
    train_max_keep_checkpoints: int = Field(default=10, ge=1)
    sample_time_limit_s: int = Field(default=6 * 3600, ge=1, description="Soft limit: the run is asked to stop.")
    train_time_limit_s: int = Field(default=48 * 3600, ge=1, description="Soft limit: the run is asked to stop.")
    stop_grace_s: float = Field(default=30.0, gt=0, description=(
        "How long a run asked to stop (cancel, shutdown, lost lease, soft time limit) may take before its "
        "process is killed; soft limit + this = the hard time limit."))
    requeue_after_s: float = Field(default=600.0, gt=0, description=(
        "Re-send a queued job's message after this long, where the broker cannot be inspected."))
    orphan_grace_s: float = Field(default=10.0, gt=0, description=(
        "A queued job that no broker holds for this long is re-enqueued by the sweeper."))
    sweep_interval_s: float = Field(default=15.0, gt=0)
    progress_event_min_s: float = Field(default=1.0, ge=0, description=(
        "A running job's progress is written to its row at every report, but a `progress` event (what "
        "GET /v1/jobs/{id}/stream, webhooks and the dashboard read) at most once this many seconds per "
        "job, plus at a job's or a training stage's last step. 0: every report."))
    retention_days: float = Field(default=0, ge=0, description=(
        "Delete final jobs (succeeded, failed, canceled) that finished more than this many days ago: their "
        "records, outputs, manifests and checkpoints, as DELETE /v1/jobs/{id} does (a trained model and its "
        "evaluation artifacts stay; models and datasets are never removed by retention). Applied by the "
        "sweeper. 0 = keep forever."))
    retention_batch: int = Field(default=100, ge=1, description=(
        "The most jobs one sweeper pass deletes for retention, and the most pending object deletions it "
        "retries (a backlog drains over several passes)."))
    storage_retry_s: float = Field(default=30.0, ge=0, description=(
        "How long an object-storage call retries (with backoff) on connection errors and 5xx before failing."))

    # Scheduling (shared.scheduler): which queued job a woken worker takes.
    sched_half_life_s: float = Field(default=3600.0, gt=0, description=(
        "Fair share: a tenant's charged GPU-seconds count half after this long. Short: shares even out "
        "over the last minutes (a tenant idle for an hour comes back with a clean slate); long: over days."))
    sched_aging_s: float = Field(default=SCHED_AGING_S_DEFAULT, gt=0, description=(
        "Within a tenant: seconds of waiting worth one priority level (effective priority = priority + "
        "waited / this), so a low-priority job is not passed by later work for ever. Applies to jobs "
        "submitted after a change."))
    sched_running_charge_s: float = Field(default=30.0, ge=0, description=(
        "Fair share: each job a tenant runs counts this many GPU-seconds ahead of what it has used, so "
        "that workers freeing up at once are spread over tenants by weight rather than all going to the "
        "one that has used least (a claim has no cost yet when the next worker asks)."))
    preempt_after_s: float | None = Field(default=None, ge=0, description=(
        "Preemption at checkpoints (off when unset or 0): a running train job yields at its next checkpoint "
        "(given back like a SIGTERM: attempt refunded, resumed from that checkpoint later) once queued work "
        "of the same type that the policy would claim before it has waited this many seconds, and the run "
        "itself has run at least this long: the tenant's own higher-priority job, or another tenant's that "
        "is under-served (lower fair-share standing). Off by default: a switch costs a checkpoint's reload "
        "and the steps since it, worth paying only where a wait of hours behind a long training is worse; "
        "this many seconds bounds how often a worker slot can change hands (e.g. 600: at most one switch "
        "per job per 10 minutes)."))
    sched_seconds_per_image: float = Field(default=2.0, gt=0, description=(
        "What a queued job's estimated start assumes one image costs a worker (GET /v1/jobs/{id} queue)."))

    # Worker.
    worker_device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    pipeline_cache_size: int = Field(default=4, ge=1, description="at most this many loaded pipelines per worker")
    pipeline_cache_mb: int = Field(default=0, ge=0, description=(
        "Memory the cached pipelines' weights may take, MiB; the least recently used go first. "
        "0 = auto: half the GPU's memory, or a quarter of the machine's RAM on a CPU"))
    sample_batch_size: int = Field(default=16, ge=0, description=(
        "Images per model batch (a model's own sample_batch_size wins); 0 = found from free memory: "
        "on a GPU a probe batch measures the peak memory an image takes and the batch fills 80% of "
        "what is free (at most 64); on a CPU, where memory is not measured, 32"))
    cobatch_max_items: int = Field(
        default=64, ge=0,
        description="Pack other queued jobs of the same model into a sample run while the images of the "
                    "run stay under this many (0: one job per run)")
    sample_piece_images: int = Field(default=128, ge=0, description=(
        "Images per piece of a spread sample job (shared.pieces): a job with more images is split at submit "
        "into pieces of this many, which idle workers claim and run at once. Size it so that a piece takes "
        "seconds to a minute on a worker's device: long enough that a claim, a pipeline lookup and the "
        "piece's last partial batch are small beside it, short enough that several workers share a job and "
        "a killed worker loses little. 128: ~3 s for the tiny test model on 2 CPU cores (40 images/s), ~1 "
        "minute for a 512-px SD model at 20 steps on one datacenter GPU. A job with output_format "
        "webdataset is split at shard boundaries (a shard's images are made by one run): pieces of as many "
        "whole shards as fit in this many images, at least one. 0: never split"))
    sample_streams: int = Field(default=0, ge=0, description=(
        "Model batches a sample run computes at once, each on its own thread; 0 = auto: 1 on a GPU, "
        "2 on a CPU with 2+ cores (side by side, a small model uses the cores better than one batch "
        "split across them; tiny model on 2 cores: 70 vs 48 images/s)"))
    worker_threads: int = Field(default=0, ge=0, description=(
        "torch threads (per sample stream); 0 = torch's default, or the CPU's cores / sample streams"))
    wds_shard_images: int = Field(default=1000, ge=1, le=100_000, description=(
        "Images per WebDataset tar shard of a sample job with output_format webdataset (the last shard holds the "
        "rest). Fixed in the job's params when it is submitted, so a retry rebuilds the same shards. A shard is "
        "spooled on the worker's disk until its last image is made, then uploaded in one PUT."))
    worker_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: float16 on CUDA, float32 on CPU")
    worker_channels_last: bool = Field(default=False, description="channels_last U-Net/VAE (often faster on GPU)")
    worker_compile: bool = Field(default=False, description="torch.compile the U-Net (slow first batch)")
    train_devices: Literal["auto"] | PositiveInt = Field(default="auto", description=(
        "Ranks one train job trains on, data-parallel (docs/distributed-training.md): auto = every visible "
        "CUDA device (1 on a CPU worker); N = N CUDA devices (cuda:0..N-1), or N gloo processes on a CPU "
        "worker (tests, benchmarks). Never more ranks than the job's batch has examples"))

    @field_validator("var_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'ldmq.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        """Folder of the file-system transport used when no broker URL is set."""
        return self.var_dir / "broker"

    @property
    def effective_ratelimit_redis_url(self) -> str | None:
        """Where the rate buckets live: ``ratelimit_redis_url``, else a Redis broker, else None (per process)."""
        if self.ratelimit_redis_url:
            return self.ratelimit_redis_url
        broker = self.effective_broker_url
        return broker if broker.startswith(("redis://", "rediss://")) else None

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or (self.var_dir / "objects").as_uri()


@lru_cache
def get_settings() -> Settings:
    return Settings()
