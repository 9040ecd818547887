"""GET /v1/usage: the caller's tenant, its weight, quotas, queue and recent GPU-seconds."""

from __future__ import annotations

from api import routing
from api.deps import SessionDep, SettingsDep, TenantDep
from api.routes.jobs import ERRORS
from api.schemas import UsageOut
from api.services import usage as svc

router = routing.router(prefix="/v1", tags=["usage"])


@router.get("/usage", response_model=UsageOut, responses=ERRORS)
def get_usage(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> UsageOut:
    """Weight, quotas (None: unlimited), jobs running and queued, images queued (what
    ``max_queued_images`` bounds) and GPU-seconds over the last 24 h (wall time of runs holding a
    worker)."""
    return svc.tenant_usage(session, settings, tenant)
