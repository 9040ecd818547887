"""Key layout: everything a tenant owns lives under its own prefix."""

from __future__ import annotations


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"{tenant_id}/jobs/{job_id}"


def output_key(tenant_id: str, job_id: str, row: int, index: int) -> str:
    return f"{job_prefix(tenant_id, job_id)}/rows/{row:06d}/{index:03d}.png"


def shard_key(tenant_id: str, job_id: str, shard: int) -> str:
    """A WebDataset tar shard of a sample job (``output_format: webdataset``)."""
    return f"{job_prefix(tenant_id, job_id)}/shards/{shard:06d}.tar"


def sample_key(row: int, index: int) -> str:
    """An image's WebDataset sample key inside its shard (its members are ``<key>.png`` and
    ``<key>.json``); no dot, as WebDataset splits a member name at its first dot."""
    return f"{row:06d}-{index:03d}"


def manifest_key(tenant_id: str, job_id: str) -> str:
    return f"{job_prefix(tenant_id, job_id)}/manifest.json"


def model_prefix(tenant_id: str, model_id: str) -> str:
    return f"{tenant_id}/models/{model_id}"


def dataset_key(tenant_id: str, dataset_id: str, filename: str) -> str:
    return f"{tenant_id}/datasets/{dataset_id}/{filename}"


def input_image_key(tenant_id: str, image_id: str) -> str:
    """An uploaded input image (an init image or a mask, ``POST /v1/images``), its bytes as sent."""
    return f"{tenant_id}/images/{image_id}"


def checkpoint_prefix(tenant_id: str, job_id: str, step: int) -> str:
    return f"{job_prefix(tenant_id, job_id)}/checkpoints/step-{step:08d}"
