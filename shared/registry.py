"""Register a diffusers-format pipeline directory as a model: check it, copy it into the tenant's
prefix in storage, record the row. Used by ``ldmq models import`` and by finished train jobs (a
LoRA train job registers its adapter folder with :func:`register_adapter_dir`).

Every model's ``config`` keeps its content hash under ``CONFIG_SHA256`` (``Storage.prefix_sha256``
of its stored files), computed once when it is stored; for a model registered before there was one,
the worker computes it on first use and keeps it the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.adapters import CONFIG_BASE_MODEL, CONFIG_LORA, check_adapter_dir
from shared.models import Model, Tenant, new_id
from shared.pipelines import check_pipeline_dir
from shared.storage import Storage, model_prefix


CONFIG_SHA256 = "sha256"


class TenantNotFound(LookupError):
    pass


def tenant_by_name(session: Session, name: str) -> Tenant:
    tenant = session.scalars(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        raise TenantNotFound(f"no tenant named {name!r}; create one with `ldmq keys create --tenant {name}`")
    return tenant


def register_pipeline_dir(session: Session, storage: Storage, tenant_id: str, local_dir: Path, *,
                          name: str, job_id: str | None = None, metrics: dict[str, Any] | None = None,
                          extra_config: dict[str, Any] | None = None, model_id: str | None = None) -> Model:
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir} is not a directory")
    index = check_pipeline_dir(local_dir)
    return _store(session, storage, tenant_id, local_dir, {"model_index": index, **(extra_config or {})}, name=name,
                  job_id=job_id, metrics=metrics, model_id=model_id)


def register_adapter_dir(session: Session, storage: Storage, tenant_id: str, local_dir: Path, *, base_model: str,
                         lora: dict[str, Any], name: str, job_id: str | None = None,
                         metrics: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None) -> Model:
    """A LoRA adapter folder (``shared.adapters``) as a model whose config names ``base_model``."""
    local_dir = Path(local_dir)
    check_adapter_dir(local_dir)
    config = {CONFIG_BASE_MODEL: base_model, CONFIG_LORA: lora, **(extra_config or {})}
    return _store(session, storage, tenant_id, local_dir, config, name=name, job_id=job_id, metrics=metrics)


def _store(session: Session, storage: Storage, tenant_id: str, local_dir: Path, config: dict[str, Any], *,
           name: str, job_id: str | None, metrics: dict[str, Any] | None, model_id: str | None = None) -> Model:
    """Upload the checked folder under the new model's prefix and add its row (content hash in config)."""
    model_id = model_id or new_id()
    prefix = model_prefix(tenant_id, model_id)
    storage.upload_dir(local_dir, prefix)
    config = {**config, CONFIG_SHA256: storage.prefix_sha256(prefix)}
    model = Model(id=model_id, tenant_id=tenant_id, name=name, uri=storage.uri(prefix) + "/", key=prefix,
                  job_id=job_id, config=config, metrics=metrics or {})
    session.add(model)
    session.flush()
    return model
