"""Datasets: an uploaded archive is validated whole before anything is stored."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from shared.datasets import ARCHIVE_SUFFIXES, DatasetValidationError, inspect_archive
from shared.models import Dataset, new_id
from shared.security import TenantRef
from shared.settings import Settings
from shared.storage import Storage, dataset_key


def create_dataset(session: Session, settings: Settings, storage: Storage, tenant: TenantRef, filename: str, upload,
                   name: str | None) -> Dataset:
    """Validate the uploaded archive (``upload``: bytes, or a seekable binary file such as the
    upload spooled to disk), then store it streamed: the archive is never whole in memory."""
    lower = filename.lower()
    if not lower.endswith(ARCHIVE_SUFFIXES):
        raise ApiError(422, "invalid_archive", f"{filename!r} is not a zip or tar(.gz) archive; "
                       f"valid suffixes: {', '.join(ARCHIVE_SUFFIXES)}")
    try:
        info = inspect_archive(upload, filename, max_images=settings.dataset_max_images,
                               max_uncompressed_bytes=settings.dataset_max_uncompressed_bytes)
    except DatasetValidationError as exc:
        raise ApiError(422, "invalid_dataset", str(exc), list(exc.problems)) from None
    ds_id = new_id()
    suffix = next(s for s in ARCHIVE_SUFFIXES if lower.endswith(s))
    key = dataset_key(tenant.id, ds_id, "archive" + suffix)
    if isinstance(upload, (bytes, bytearray)):
        storage.put_bytes(key, bytes(upload))
    else:
        storage.put_fileobj(key, upload)
    info_dict = info.to_dict()
    ds = Dataset(id=ds_id, tenant_id=tenant.id, name=name or filename, key=key,
                 num_images=info_dict.get("num_images", 0), info=info_dict)
    session.add(ds)
    session.flush()
    return ds


def list_datasets(session: Session, tenant: TenantRef) -> list[Dataset]:
    return list(session.scalars(select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at.desc())))


def get_dataset(session: Session, tenant: TenantRef, dataset_id: str) -> Dataset:
    ds = session.get(Dataset, dataset_id)
    if ds is None or ds.tenant_id != tenant.id:
        raise not_found("dataset", dataset_id)
    return ds
