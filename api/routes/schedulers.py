"""``GET /v1/schedulers``: every sampler name a sample job accepts, with one line on each (from
``shared.catalog``, where the API validates them and the worker builds them)."""

from __future__ import annotations

from api import routing
from api.deps import TenantDep
from api.routes.jobs import ERRORS
from api.schemas import SchedulerList, SchedulerOut
from shared.catalog import SCHEDULER_DESCRIPTIONS, SCHEDULERS

router = routing.router(prefix="/v1/schedulers", tags=["schedulers"])


@router.get("", response_model=SchedulerList, responses=ERRORS)
async def list_schedulers(tenant: TenantDep) -> SchedulerList:  # no I/O: answered on the event loop
    return SchedulerList(items=[SchedulerOut(name=n, description=SCHEDULER_DESCRIPTIONS[n]) for n in SCHEDULERS])
