"""Request and response schemas of the REST contract (``../shared/spec/api.md``), separate from
the ORM models. Limits that depend on settings are checked in the service layer."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEDULERS = ("ddpm", "ddim", "dpm-solver++")
SchedulerName = Literal["ddpm", "ddim", "dpm-solver++"]
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
JOB_TYPES = ("train", "sample")
SEED_MAX = 2**31 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplePrompt(Strict):
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    num_images: int = Field(default=1, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    steps: int | None = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty")
        return v


class SampleRequest(Strict):
    model: str = Field(min_length=1, description="A model id.")
    prompts: list[SamplePrompt] = Field(min_length=1)
    scheduler: SchedulerName = "dpm-solver++"
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=5.0, ge=0, le=50)
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    max_attempts: int | None = Field(default=None, ge=1, le=10)


class ImportModelRequest(Strict):
    source: str = Field(description="s3://bucket/prefix of a diffusers-format pipeline directory")
    name: str | None = None


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


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class OutputOut(BaseModel):
    row: int
    prompt: str
    seed: int
    index: int
    key: str
    url: str
    width: int
    height: int


class OutputList(BaseModel):
    items: list[OutputOut]
    manifest_url: str | None


class ModelOut(BaseModel):
    id: str
    name: str
    uri: str
    created_at: datetime
    job_id: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]


class ModelList(BaseModel):
    items: list[ModelOut]


class DatasetOut(BaseModel):
    id: str
    name: str
    num_images: int
    created_at: datetime
    info: dict[str, Any]


class DatasetList(BaseModel):
    items: list[DatasetOut]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    message: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorBody(BaseModel):
    error: ErrorInfo
