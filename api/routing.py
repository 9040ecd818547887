"""The API's router: sync routes run on a thread, and everything after them on the event loop.

FastAPI runs a sync route on the threadpool and then, for a sync route, validates the response
on the threadpool too, before the dependencies' exit code (our commit) runs. A request's session
holds its connection from the route to the commit, so with a bounded threadpool that second hop
could deadlock: requests holding connections wait for threads while threads (key lookups, new
routes) wait for connections. (Seen: a burst of 200 submits left 40 connections idle in
transaction and the API stalled until pool timeouts.)

So every sync endpoint is wrapped in a coroutine that runs it on the threadpool: the route's
blocking work is one hop, the response is validated on the loop, and the commit waits only for a
thread of its own limiter (``api.deps.get_session``). A request never waits for a route thread
while it holds a connection.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool


def on_thread(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` as a coroutine function that runs it on the threadpool (same signature, so
    FastAPI sees the same parameters)."""

    @functools.wraps(endpoint)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(endpoint, *args, **kwargs)

    return run


class ThreadedRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = on_thread(endpoint)
        super().__init__(path, endpoint, **kwargs)


def router(**kwargs: Any) -> APIRouter:
    """An ``APIRouter`` whose sync endpoints run as :class:`ThreadedRoute`."""
    return APIRouter(route_class=ThreadedRoute, **kwargs)
