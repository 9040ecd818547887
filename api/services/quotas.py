"""A tenant's queued-images quota (``max_queued_images``, set by ``ldmq tenants set``), checked
when a job is submitted: over it, a 429 ``quota_exceeded`` and nothing stored.

The check and the insert are one transaction with the tenant's row locked
(:func:`shared.tenants.lock_queued_images_quota`), so N submits racing for the last free images
cannot all pass: each counts after the one before it committed. Only tenants with a quota take
the lock; the others' submits never wait on each other. What counts: :mod:`shared.usage`.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.errors import ApiError
from api.schemas import QuotaVerdict
from shared import tenants, usage
from shared.models import Tenant
from shared.security import TenantRef


def lock_queued_images(session: Session, tenant: TenantRef) -> int | None:
    """The tenant's ``max_queued_images`` with its row locked until the commit (None: no quota, no lock)."""
    return tenants.lock_queued_images_quota(session, tenant.id)


def check_queued_images(session: Session, tenant: TenantRef, limit: int | None, images: int) -> None:
    """429 ``quota_exceeded`` when ``images`` more would take the tenant past ``limit`` (from
    :func:`lock_queued_images`, in this transaction); the message says the limit and the count."""
    if limit is None:
        return
    queued = usage.queued_work(session, tenant.id).images_queued
    if queued + images > limit:
        raise ApiError(429, "quota_exceeded",
                       f"this job's {images} image(s) would take the tenant over its quota of {limit} queued images: "
                       f"{queued} are queued or in progress; wait for them to finish, or cancel some",
                       [{"quota": "max_queued_images", "limit": limit, "current": queued, "requested": images,
                         "message": f"{queued} + {images} > {limit}"}])


def queued_images_verdict(session: Session, tenant: TenantRef, images: int) -> QuotaVerdict:
    """What :func:`check_queued_images` would say now, without locking (a dry run)."""
    row = session.get(Tenant, tenant.id)
    limit = row.max_queued_images if row is not None else None
    queued = usage.queued_work(session, tenant.id).images_queued
    return QuotaVerdict(max_queued_images=limit, images_queued=queued, images_requested=images,
                        would_exceed=limit is not None and queued + images > limit)
