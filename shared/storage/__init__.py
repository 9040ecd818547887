"""Object storage behind one interface: S3 (``s3.py``) and ``file://`` (``file.py``), chosen by
the storage URL; the interface and its errors are in ``base.py``, the key layout in ``keys.py``.

Keys are relative to the storage root (``s3://bucket/prefix`` or ``file:///dir``). Every object
carries its SHA-256 (S3 user metadata, or a sidecar file) and reads verify it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from shared.settings import Settings, get_settings
from shared.storage.base import (
    ChecksumMismatch,
    ObjectExists,
    ObjectNotFound,
    ObjectTooLarge,
    Storage,
    StorageError,
    StorageUnavailable,
    UnsafeKey,
    content_sha256,
    sha256_hex,
)
from shared.storage.file import FileStorage
from shared.storage.keys import (
    checkpoint_prefix,
    dataset_key,
    input_image_key,
    job_prefix,
    manifest_key,
    model_prefix,
    output_key,
    sample_key,
    shard_key,
)
from shared.storage.s3 import S3Storage

__all__ = [
    "ChecksumMismatch", "FileStorage", "ObjectExists", "ObjectNotFound", "ObjectTooLarge", "S3Storage", "Storage", "StorageError",
    "StorageUnavailable", "UnsafeKey", "checkpoint_prefix", "content_sha256", "dataset_key", "get_storage", "input_image_key", "job_prefix", "manifest_key",
    "model_prefix", "output_key", "sample_key", "sha256_hex", "shard_key", "storage_from_url",
]


def storage_from_url(url: str, settings: Settings | None = None) -> Storage:
    settings = settings or get_settings()
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 URL needs a bucket: {url!r}")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                         retry_s=settings.storage_retry_s, public_endpoint_url=settings.s3_public_endpoint_url)
    if parsed.scheme == "file":
        return FileStorage(Path(parsed.path))
    raise ValueError(f"unknown storage URL scheme {parsed.scheme!r} in {url!r}; valid: s3://bucket/prefix, file:///path")


@lru_cache(maxsize=8)
def _cached(url: str, endpoint: str | None, region: str, retry_s: float, public_endpoint: str | None) -> Storage:
    return storage_from_url(url, Settings(s3_endpoint_url=endpoint, s3_region=region, storage_retry_s=retry_s,
                                          s3_public_endpoint_url=public_endpoint))


def get_storage(settings: Settings | None = None) -> Storage:
    settings = settings or get_settings()
    return _cached(settings.effective_storage_url, settings.s3_endpoint_url, settings.s3_region,
                   settings.storage_retry_s, settings.s3_public_endpoint_url)
