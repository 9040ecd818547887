"""GET /v1/usage: the caller's tenant as the scheduler sees it (weight, quotas, queue, the last
24 h of GPU-seconds). The numbers come from :mod:`shared.usage`, which the scheduler and the
quota check use too, so the dashboard shows what they act on."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from api.errors import not_found
from api.schemas import Quotas, UsageOut
from shared import usage
from shared.models import Tenant, utcnow
from shared.security import TenantRef
from shared.settings import Settings
from shared.tenants import TenantSettings, effective_rate


def tenant_usage(session: Session, settings: Settings, tenant: TenantRef, now: datetime | None = None) -> UsageOut:
    """Read from the tenant's row (not the cached key), so an operator's change shows at once."""
    now = now or utcnow()
    row = session.get(Tenant, tenant.id)
    if row is None:  # deleted since its key was cached
        raise not_found("tenant", tenant.name)
    ts = TenantSettings.of(row)
    rate = effective_rate(ts.rate_per_s, ts.rate_burst, settings)
    work = usage.queued_work(session, tenant.id)
    return UsageOut(
        tenant=ts.name, weight=ts.weight,
        quotas=Quotas(max_running=ts.max_running, max_queued_images=ts.max_queued_images,
                      rate_per_s=rate[0] if rate else None, rate_burst=rate[1] if rate else None),
        jobs_running=work.jobs_running, jobs_queued=work.jobs_queued, images_queued=work.images_queued,
        gpu_seconds_24h=round(usage.tenant_gpu_seconds(session, tenant.id, now), 3),
        window_s=int(usage.USAGE_WINDOW.total_seconds()), as_of=now)
