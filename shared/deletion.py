"""Deleting a job, a model or a dataset, and retention: the one place that removes records and
their stored objects (the API's DELETE routes and the sweeper's retention both come here).

What is guaranteed:

- The check ("is anything still using it?") and the row deletion happen in one transaction, with
  the record's row locked (``SELECT … FOR UPDATE``): a job submitted at the same moment either
  commits first (and the delete sees it: 409) or finds the record gone (its insert fails on the
  foreign key, or its locked read of a base model finds nothing).
- In that same transaction the record's stored objects are written to ``storage_deletions`` (an
  outbox). Objects are deleted only after the commit, then their outbox row: a record never
  points at objects already deleted, and objects whose deletion failed (storage down) stay
  listed and are retried by the sweeper (:func:`purge_pending`) until they are gone. If the
  transaction fails, nothing at all is deleted.

What goes:

- a job (only a final one: a queued or running job could still write into its prefix): its row and,
  by the database's cascades, its prompt rows, outputs, events, webhook and deliveries; every
  object under ``<tenant>/jobs/<job>/`` (outputs, manifest, archive shards, checkpoints), except
  the evaluation artifacts that a model it produced still lists (the model owns them; they go with
  the model). The model a train job produced stays.
- a model (not while a queued or running job samples from it or trains on it as its base, nor
  while another model names it as its ``base_model``): its row, every object under its key, and
  its evaluation artifacts. Jobs that used it keep their records (``jobs.model_id`` is set NULL by
  the foreign key).
- a dataset (not while a queued or running train job uses it): its row and its archive. Jobs that
  trained on it keep their records (``jobs.dataset_id`` is set NULL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import (
    FINAL_STATUSES,
    Dataset,
    Job,
    JobStatus,
    JobType,
    Model,
    StorageDeletion,
    utcnow,
)
from shared.settings import Settings
from shared.storage import Storage, StorageError, StorageUnavailable, job_prefix

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.queued.value, JobStatus.running.value)
FINAL = tuple(s.value for s in FINAL_STATUSES)


class NotFound(LookupError):
    """No such record for this tenant."""


class InUse(Exception):
    """The record is still needed: ``code`` for machines, ``reason`` for a person, ``users`` the
    ids of what needs it (at most 20 of each kind)."""

    def __init__(self, code: str, reason: str, users: list[str]):
        super().__init__(reason)
        self.code, self.reason, self.users = code, reason, users


def _owned(tenant_id: str, path: str) -> bool:
    """Only objects under the tenant's own prefix are ever deleted for it."""
    return path.startswith(f"{tenant_id}/") and ".." not in path.split("/")


def _schedule(session: Session, tenant_id: str, paths: Iterable[str], keep: Iterable[str] = ()) -> list[int]:
    rows = [StorageDeletion(tenant_id=tenant_id, path=p, keep=sorted(set(keep)), attempts=0)
            for p in dict.fromkeys(paths) if _owned(tenant_id, p)]
    session.add_all(rows)
    session.flush()
    return [r.id for r in rows]


def _artifact_keys(model: Model) -> list[str]:
    artifacts = (model.metrics or {}).get("artifacts") or {}
    if not isinstance(artifacts, dict):
        return []
    return sorted(k for k in artifacts.values() if isinstance(k, str) and _owned(model.tenant_id, k))


def _locked(session: Session, entity, record_id: str, tenant_id: str | None):
    q = select(entity).where(entity.id == record_id).with_for_update()
    if tenant_id is not None:
        q = q.where(entity.tenant_id == tenant_id)
    found = session.scalars(q).first()
    if found is None:
        raise NotFound(record_id)
    return found


def delete_job(session: Session, job_id: str, tenant_id: str | None = None) -> list[int]:
    """Delete a final job's record and schedule its objects; returns the outbox ids to purge after
    the commit. NotFound (also for another tenant's job), InUse("job_not_final") for a queued or
    running job."""
    job = _locked(session, Job, job_id, tenant_id)
    if job.status not in FINAL:
        raise InUse("job_not_final", f"job {job_id!r} is {job.status}; cancel it and delete it once it has ended",
                    [job_id])
    keep = [k for m in session.scalars(select(Model).where(Model.job_id == job.id, Model.tenant_id == job.tenant_id))
            for k in _artifact_keys(m)]
    ids = _schedule(session, job.tenant_id, [job_prefix(job.tenant_id, job.id) + "/"], keep)
    session.expunge(job)
    # The database cascades to rows, outputs, events, webhook and deliveries (no ORM load of them).
    session.execute(delete(Job).where(Job.id == job.id))
    return ids


def model_users(session: Session, model_id: str) -> list[str]:
    """Queued or running jobs that sample from the model or train on it as their base, and models
    whose config names it as their ``base_model``."""
    jobs = session.scalars(select(Job.id).where(Job.status.in_(ACTIVE), or_(
        Job.model_id == model_id,
        (Job.type == JobType.train.value) & (Job.params["base_model"].as_string() == model_id),
    )).order_by(Job.id).limit(20))
    models = session.scalars(select(Model.id).where(Model.config["base_model"].as_string() == model_id)
                             .order_by(Model.id).limit(20))
    return [*jobs, *models]


def delete_model(session: Session, model_id: str, tenant_id: str | None = None) -> list[int]:
    model = _locked(session, Model, model_id, tenant_id)
    users = model_users(session, model.id)
    if users:
        raise InUse("model_in_use", f"model {model_id!r} is still needed by queued or running jobs or by models "
                                    f"built on it: {', '.join(users)}", users)
    paths = [model.key.rstrip("/") + "/", *_artifact_keys(model)]
    ids = _schedule(session, model.tenant_id, paths)
    session.expunge(model)
    session.execute(delete(Model).where(Model.id == model.id))  # jobs.model_id: SET NULL
    return ids


def delete_dataset(session: Session, dataset_id: str, tenant_id: str | None = None) -> list[int]:
    ds = _locked(session, Dataset, dataset_id, tenant_id)
    users = list(session.scalars(select(Job.id).where(Job.dataset_id == ds.id, Job.status.in_(ACTIVE))
                                 .order_by(Job.id).limit(20)))
    if users:
        raise InUse("dataset_in_use", f"dataset {dataset_id!r} is used by queued or running train jobs: "
                                      f"{', '.join(users)}", users)
    ids = _schedule(session, ds.tenant_id, [ds.key])
    session.expunge(ds)
    session.execute(delete(Dataset).where(Dataset.id == ds.id))  # jobs.dataset_id: SET NULL
    return ids


def purge_pending(settings: Settings, storage: Storage, *, ids: list[int] | None = None, limit: int = 100) -> int:
    """Delete the objects of pending ``storage_deletions`` (the given ``ids``, or the oldest
    ``limit``), each row removed once its objects are gone; returns how many rows were done.

    A row whose deletion fails stays (its ``attempts`` and ``last_error`` updated) for the next
    pass; storage that does not answer ends the pass. Two deleters at once are harmless: deleting
    an object twice is not an error."""
    with session_scope(settings) as s:
        q = select(StorageDeletion).order_by(StorageDeletion.id)
        q = q.where(StorageDeletion.id.in_(ids)) if ids is not None else q.limit(limit)
        pending = [(d.id, d.path, frozenset(d.keep or ())) for d in s.scalars(q)]
    done = 0
    for row_id, path, keep in pending:
        try:
            if path.endswith("/"):
                storage.delete_prefix(path, keep=keep)
            elif path not in keep:
                storage.delete(path)
        except StorageError as exc:
            log.warning("deleting stored objects at %s failed (%s); will retry", path, exc)
            with session_scope(settings) as s:
                row = s.get(StorageDeletion, row_id)
                if row is not None:
                    row.attempts += 1
                    row.last_error = f"{type(exc).__name__}: {exc.public}"
            if isinstance(exc, StorageUnavailable):
                break
            continue
        with session_scope(settings) as s:
            s.execute(delete(StorageDeletion).where(StorageDeletion.id == row_id))
        done += 1
    return done


def expired_jobs(session: Session, days: float, limit: int) -> list[str]:
    """Final jobs that finished more than ``days`` ago (oldest first, at most ``limit``)."""
    cutoff = utcnow() - timedelta(days=days)
    ended = func.coalesce(Job.finished_at, Job.created_at)
    return list(session.scalars(select(Job.id).where(Job.status.in_(FINAL), ended < cutoff, Job.parent_id.is_(None))
                                .order_by(ended, Job.id).limit(limit)))


def apply_retention(settings: Settings, storage: Storage) -> list[str]:
    """One bounded retention pass (``retention_days``; 0 keeps everything): delete up to
    ``retention_batch`` expired final jobs, each in its own transaction, then purge their objects.
    Models and datasets are never removed here."""
    if settings.retention_days <= 0:
        return []
    with session_scope(settings) as s:
        candidates = expired_jobs(s, settings.retention_days, settings.retention_batch)
    deleted, ids = [], []
    for job_id in candidates:
        try:
            with session_scope(settings) as s:
                ids += delete_job(s, job_id)
            deleted.append(job_id)
        except (NotFound, InUse):  # deleted meanwhile (by its tenant), or not final after all
            continue
    if ids:
        purge_pending(settings, storage, ids=ids)
    return deleted
