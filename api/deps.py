"""Request dependencies: the settings, a session whose owner commits, and the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import ApiError
from shared import db
from shared.models import Tenant
from shared.security import authenticate
from shared.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """The owner of the request's session: it commits once the route returns, then runs the
    after-commit actions (enqueueing), so a job row exists before its message."""
    with db.session_scope(settings) as session:
        yield session


# scope="function": the commit happens before the response is sent, so a 202 means "recorded".
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_tenant(request: Request, session: SessionDep) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = authenticate(session, token.strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
