"""Models: list, get, and import a diffusers-format pipeline already in the bucket."""

from __future__ import annotations

from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.schemas import ModelOut
from shared.models import Model, new_id
from shared.security import TenantRef
from shared.pipelines import PipelineRejected, check_pipeline_files
from shared.settings import Settings
from shared.storage import S3Storage, Storage, model_prefix


def artifact_urls(m: Model, storage: Storage, expires_s: int) -> dict[str, str]:
    """Presigned links to the model's evaluation artifacts (``metrics["artifacts"]``: name -> key),
    only for keys under the model's tenant's own prefix."""
    artifacts = (m.metrics or {}).get("artifacts") or {}
    if not isinstance(artifacts, dict):
        return {}
    prefix = f"{m.tenant_id}/"
    return {name: storage.presigned_url(key, expires_s) for name, key in sorted(artifacts.items())
            if isinstance(key, str) and key.startswith(prefix) and ".." not in key.split("/")}


def model_out(m: Model, storage: Storage | None = None, settings: Settings | None = None) -> ModelOut:
    urls = artifact_urls(m, storage, settings.presign_expiry_s) if storage is not None and settings is not None else {}
    return ModelOut(id=m.id, name=m.name, uri=m.uri, created_at=m.created_at, job_id=m.job_id,
                    config=m.config or {}, metrics=m.metrics or {}, artifact_urls=urls)


def list_models(session: Session, tenant: TenantRef) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.tenant_id == tenant.id).order_by(Model.created_at.desc())))


def import_model(session: Session, settings: Settings, storage: Storage, tenant: TenantRef, source: str,
                 name: str | None) -> Model:
    parsed = urlparse(source)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ApiError(422, "invalid_source", "source must be s3://bucket/prefix of a pipeline directory")
    src = S3Storage(parsed.netloc, "", endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    src_prefix = parsed.path.strip("/")
    # Inside ldmq's own storage, a tenant may import only from under its own prefix.
    if isinstance(storage, S3Storage) and storage.bucket == src.bucket:
        own = storage._key(f"{tenant.id}/")
        root = storage.prefix + "/" if storage.prefix else ""
        if src_prefix.startswith(root) and not (src_prefix + "/").startswith(own):
            raise ApiError(404, "not_found", f"nothing to import at {source}")
    keys = src.list(src_prefix + "/")
    if not keys:
        raise ApiError(422, "invalid_source", f"no objects under {source}")
    rel = [k[len(src_prefix) + 1:] for k in keys]
    index = src.get_bytes(src_prefix + "/model_index.json", verify=False) if "model_index.json" in rel else None
    try:
        config = check_pipeline_files(rel, index)
    except PipelineRejected as exc:
        raise ApiError(422, "invalid_pipeline", "the source is not an acceptable pipeline directory",
                       [{"message": p} for p in exc.problems]) from None
    model_id = new_id()
    prefix = model_prefix(tenant.id, model_id)
    storage.copy_prefix(src, src_prefix, prefix)
    model = Model(id=model_id, tenant_id=tenant.id, name=name or src_prefix.rsplit("/", 1)[-1],
                  uri=storage.uri(prefix) + "/", key=prefix, config={"model_index": config, "source": source})
    session.add(model)
    session.flush()
    return model
