"""A burst of concurrent submits on a small threadpool: every request answered, no connection left
in a transaction (a request once waited for a thread while holding a connection: see api/routing)."""

import asyncio

import httpx
from sqlalchemy import text

from api.app import create_app
from shared.db import get_engine


async def _burst(app, key: str, body: dict, n: int) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ldmq.test", timeout=60) as client:
            headers = {"Authorization": f"Bearer {key}"}
            return await asyncio.gather(*[client.post("/v1/jobs/sample", json=body, headers=headers) for _ in range(n)])


def test_a_burst_of_submits_neither_deadlocks_nor_leaks_connections(settings, tiny_model):
    _, key, model_id = tiny_model
    small = settings.model_copy(update={"api_threads": 2})
    body = {"model": model_id, "prompts": [{"prompt": "a cat", "seed": 1}], "steps": 2}
    # 120 concurrent requests, a cold key cache, 2 route threads, 40 connections: before the fix
    # this stalled until the pool timed out and answered 503s.
    responses = asyncio.run(asyncio.wait_for(_burst(create_app(small), key, body, 120), timeout=90))
    assert [r.status_code for r in responses] == [202] * 120
    assert len({r.json()["id"] for r in responses}) == 120
    engine = get_engine(settings)
    assert engine.pool.checkedout() == 0
    with engine.connect() as conn:
        stuck = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND state = 'idle in transaction'")).scalar_one()
    assert stuck == 0
