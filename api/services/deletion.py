"""DELETE of jobs, models and datasets: the checks and the deletion are ``shared.deletion``'s (the
sweeper's retention uses them too); here they become answers (404, 409) and the objects are
removed once the request's transaction has committed."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from shared import deletion
from shared.db import after_commit
from shared.security import TenantRef
from shared.settings import Settings
from shared.storage import get_storage


def _delete(session: Session, settings: Settings, tenant: TenantRef, what: str, record_id: str,
            fn: Callable[[Session, str, str | None], list[int]]) -> None:
    try:
        ids = fn(session, record_id, tenant.id)
    except deletion.NotFound:
        raise not_found(what, record_id) from None
    except deletion.InUse as exc:
        raise ApiError(409, exc.code, exc.reason, [{"id": u} for u in exc.users]) from None
    # After the commit (never before: a row must not point at deleted objects). A failure here
    # leaves the outbox rows, and the sweeper deletes the objects later.
    after_commit(session, lambda: deletion.purge_pending(settings, get_storage(settings), ids=ids))


def delete_job(session: Session, settings: Settings, tenant: TenantRef, job_id: str) -> None:
    """A final job: its record and stored objects. A queued or running job: 409 (cancel it first)."""
    _delete(session, settings, tenant, "job", job_id, deletion.delete_job)


def delete_model(session: Session, settings: Settings, tenant: TenantRef, model_id: str) -> None:
    """409 while a queued or running job or another model needs it."""
    _delete(session, settings, tenant, "model", model_id, deletion.delete_model)


def delete_dataset(session: Session, settings: Settings, tenant: TenantRef, dataset_id: str) -> None:
    """409 while a queued or running train job uses it."""
    _delete(session, settings, tenant, "dataset", dataset_id, deletion.delete_dataset)
