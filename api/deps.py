"""Request dependencies: the settings, a session whose owner commits, and the caller's tenant.

The dependencies are ``async``: FastAPI runs a sync dependency on the threadpool, and each hop
there costs the event loop a thread hand-off (six per submit before; two now: the route itself and
the commit). Nothing here blocks the loop: a session opens its connection lazily, inside the route,
and the commit and the key lookup run on threads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import KeyCache, bearer_token
from api.errors import ApiError
from shared import db
from shared.security import TenantRef, authenticate
from shared.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_session(request: Request, settings: SettingsDep) -> AsyncIterator[Session]:
    """The owner of the request's session: it commits once the route returns, then runs the
    after-commit actions (enqueueing), so a job row exists before its message.

    The commit waits for a thread of its own limiter, not the routes': a session holds its
    connection from the route to the commit, and with one shared limiter a burst of new routes
    could hold every thread, each waiting for a connection that only a queued commit would free."""
    session = db.new_session(settings)
    try:
        yield session
    except BaseException:
        await _end(request, session, db.abort)
        raise
    await _end(request, session, db.finish)


async def _end(request: Request, session: Session, end) -> None:
    """``end`` (commit or roll back) on a commit thread, or just close a session that did nothing."""
    if db.is_idle(session):
        session.close()
    else:
        await anyio.to_thread.run_sync(end, session, limiter=request.app.state.commit_limiter)


# scope="function": the commit happens before the response is sent, so a 202 means "recorded".
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def lookup_tenant(settings: Settings, key: str) -> TenantRef | None:
    with db.session_scope(settings) as session:
        return authenticate(session, key)


async def get_tenant(request: Request, settings: SettingsDep) -> TenantRef:
    found = getattr(request.state, "tenant", None)  # checked by api.auth.AuthFirst before the body was read
    if found is not None:
        return found
    key = bearer_token(request.headers.get("authorization", ""))
    cache: KeyCache = request.app.state.key_cache
    tenant = cache.get(key)
    if tenant is None:
        tenant = await run_in_threadpool(lookup_tenant, settings, key)
        if tenant is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        cache.put(key, tenant)
    return tenant


TenantDep = Annotated[TenantRef, Depends(get_tenant)]
