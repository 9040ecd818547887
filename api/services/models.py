"""Models: list, get, and import a diffusers-format pipeline already in the bucket."""

from __future__ import annotations

import io

from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.schemas import ModelFileOut, ModelFiles, ModelOut
from shared.models import Model, new_id
from shared.security import TenantRef
from shared.pipelines import PipelineRejected, check_pipeline_files
from shared.registry import CONFIG_SHA256
from shared.sampling_defaults import CONFIG_KEY, SamplingDefaults, model_defaults
from shared.settings import Settings
from shared.storage import ObjectTooLarge, S3Storage, Storage, model_prefix


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
                    config=m.config or {}, metrics=m.metrics or {}, artifact_urls=urls,
                    sampling_defaults=model_defaults(m.config))


def model_files(storage: Storage, settings: Settings, model: Model) -> ModelFiles:
    """The model's stored files (its diffusers folder), each with its SHA-256 and a presigned URL,
    and the model's content hash, so a client can download and check them. Only keys under the
    model's own prefix, inside its tenant's, are listed (one HEAD each for the checksum: a pipeline
    holds tens of files, at most ``model_import_max_files`` when imported)."""
    prefix = model.key.rstrip("/") + "/"
    if not prefix.startswith(f"{model.tenant_id}/"):
        raise ApiError(404, "not_found", f"model {model.id!r} has no files of its tenant's")
    items = []
    for key in storage.list(prefix):
        items.append(ModelFileOut(path=key[len(prefix):], sha256=storage.checksum(key) or "",
                                  url=storage.presigned_url(key, settings.presign_expiry_s)))
    return ModelFiles(model_id=model.id, sha256=(model.config or {}).get(CONFIG_SHA256), items=items)


def list_models(session: Session, tenant: TenantRef) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.tenant_id == tenant.id).order_by(Model.created_at.desc())))


def import_sources(settings: Settings) -> list[tuple[str, str]]:
    """The operator's ``LDMQ_MODEL_IMPORT_SOURCES`` as (bucket, key prefix ending in "/") pairs."""
    out = []
    for item in settings.model_import_sources.split(","):
        parsed = urlparse(item.strip())
        if parsed.scheme == "s3" and parsed.netloc:
            path = parsed.path.strip("/")
            out.append((parsed.netloc, f"{path}/" if path else ""))
    return out


def _may_import(settings: Settings, storage: Storage, tenant: TenantRef, bucket: str, prefix: str) -> bool:
    """From the tenant's own prefix in ldmq's storage, or from a location the operator listed."""
    within = prefix + "/"
    if isinstance(storage, S3Storage) and bucket == storage.bucket and within.startswith(storage.full_key(f"{tenant.id}/")):
        return True
    return any(bucket == b and within.startswith(p) for b, p in import_sources(settings))


def import_model(session: Session, settings: Settings, storage: Storage, tenant: TenantRef, source: str,
                 name: str | None, defaults: SamplingDefaults | None = None) -> Model:
    """Copy a diffusers pipeline folder into the tenant's models, after checking it whole.

    ``defaults``: the model's sampling defaults, if the importer states them (422 when their steps
    are over ``max_steps``; checked before anything is read). Refused, with the same 404 whether the location is empty or full: anything outside the tenant's
    own prefix and the operator's import sources (so a tenant learns nothing of another's files).
    Refused with 422: more than ``model_import_max_files`` files, any file that fails the pipeline
    check (paths, pickles, code, classes; ``shared.pipelines``), or more than
    ``model_import_max_bytes`` bytes (counted while copying; what was copied is removed). Objects are
    copied one at a time through a temporary file, never whole in the API's memory.
    """
    if defaults is not None and defaults.steps is not None and defaults.steps > settings.max_steps:
        raise ApiError(422, "invalid_request", "sampling_defaults are invalid",
                       [{"field": "sampling_defaults.steps",
                         "message": f"steps {defaults.steps} is over this deployment's limit {settings.max_steps}"}])
    parsed = urlparse(source)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ApiError(422, "invalid_source", "source must be s3://bucket/prefix of a pipeline directory")
    src_prefix = parsed.path.strip("/")
    not_found = ApiError(404, "not_found", f"nothing to import at {source}")
    if not src_prefix or not _may_import(settings, storage, tenant, parsed.netloc, src_prefix):
        raise not_found
    src = S3Storage(parsed.netloc, "", endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                    retry_s=settings.storage_retry_s)
    keys = src.list(src_prefix + "/")
    if not keys:
        raise not_found
    if len(keys) > settings.model_import_max_files:
        raise ApiError(422, "invalid_pipeline", f"the source holds {len(keys)} files; an import may hold at most "
                                                f"{settings.model_import_max_files}")
    rel = [k[len(src_prefix) + 1:] for k in keys]
    try:
        config = check_pipeline_files(rel, _small_object(src, src_prefix, "model_index.json", rel),
                                      read_config=lambda r: _small_object(src, src_prefix, r, rel) or b"")
    except PipelineRejected as exc:
        raise ApiError(422, "invalid_pipeline", "the source is not an acceptable pipeline directory",
                       [{"message": p} for p in exc.problems]) from None
    model_id = new_id()
    prefix = model_prefix(tenant.id, model_id)
    try:
        storage.copy_prefix(src, src_prefix, prefix, keys=keys, max_bytes=settings.model_import_max_bytes)
    except ObjectTooLarge:
        raise ApiError(422, "invalid_pipeline", f"the source holds more than {settings.model_import_max_bytes} "
                                                "bytes, the most an import may copy") from None
    model = Model(id=model_id, tenant_id=tenant.id, name=name or src_prefix.rsplit("/", 1)[-1],
                  uri=storage.uri(prefix) + "/", key=prefix,
                  config={"model_index": config, "source": source, CONFIG_SHA256: storage.prefix_sha256(prefix),
                          **({CONFIG_KEY: defaults.stored()} if defaults is not None else {})})
    session.add(model)
    session.flush()
    return model


CONFIG_MAX_BYTES = 1 << 20


def _small_object(src: Storage, prefix: str, rel: str, present: list[str]) -> bytes | None:
    """A config file of the source (None if absent); one over 1 MiB is refused, not read whole."""
    if rel not in present:
        return None
    buf = io.BytesIO()
    try:
        src.read_into(f"{prefix}/{rel}", buf, max_bytes=CONFIG_MAX_BYTES)
    except ObjectTooLarge:
        raise ApiError(422, "invalid_pipeline", f"{rel} is larger than {CONFIG_MAX_BYTES} bytes") from None
    return buf.getvalue()
