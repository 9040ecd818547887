"""Webhook routes: the signing secret (deliveries themselves are under /v1/jobs/{id})."""

from __future__ import annotations

from api import routing
from api.deps import SessionDep, SettingsDep, TenantDep
from api.routes.jobs import ERRORS
from api.schemas import WebhookSecretOut
from api.services import webhooks as svc

router = routing.router(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret", response_model=WebhookSecretOut, responses=ERRORS)
def get_webhook_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecretOut:
    """The tenant's HMAC-SHA256 key: verify ``X-Ldmq-Signature`` against ``"<X-Ldmq-Timestamp>.<body>"``."""
    return svc.webhook_secret(session, tenant)


@router.post("/secret/rotate", response_model=WebhookSecretOut, responses=ERRORS)
def rotate_webhook_secret(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> WebhookSecretOut:
    """A new signing secret. For ``LDMQ_WEBHOOK_SECRET_GRACE_S`` (a day by default) every delivery
    carries two signatures, ``sha256=<new>, sha256=<old>``: a receiver that still checks the old
    secret keeps accepting deliveries until it switches."""
    return svc.rotate_secret(session, settings, tenant)
