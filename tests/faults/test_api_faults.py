"""The API under concurrency and under generated input: one job per Idempotency-Key, and no 5xx
for anything the OpenAPI schema allows."""

from __future__ import annotations

import threading
import uuid

import pytest

from tests.faults.conftest import redis_client


@pytest.mark.slow
def test_11_concurrent_submits_with_one_idempotency_key_make_one_job(fstack, settings):
    """Sixteen clients race over HTTP against a live ``ldmq api`` (no worker): one job row, one
    Celery message, and every client gets the same job. (tests/api/test_jobs_api.py races the
    same way in-process.)"""
    import httpx

    from shared.db import session_scope
    from shared.models import Job

    fstack.start_api()
    key = f"race-{uuid.uuid4().hex[:8]}"
    body = {"model": fstack.model_id, "prompts": [{"prompt": "race", "seed": 1}], "steps": 2}
    barrier = threading.Barrier(16)
    results: list[httpx.Response] = []

    def go():
        with httpx.Client(base_url=fstack.url, timeout=60,
                          headers={"Authorization": f"Bearer {fstack.key}", "Idempotency-Key": key}) as c:
            barrier.wait()
            results.append(c.post("/v1/jobs/sample", json=body))

    threads = [threading.Thread(target=go) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [202] * 16, [r.text for r in results]
    assert sum("Idempotent-Replayed" not in r.headers for r in results) == 1  # one created, 15 replayed
    ids = {r.json()["id"] for r in results}
    assert len(ids) == 1
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(idempotency_key=key).count() == 1
    (job_id,) = ids
    messages = redis_client(settings).lrange("sample", 0, -1)
    assert sum(job_id.encode() in m for m in messages) == 1  # enqueued once, by the request that created it
    # The same key with another body is refused, not a second job.
    r = fstack.http.post("/v1/jobs/sample", json={**body, "steps": 3}, headers={"Idempotency-Key": key})
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"


# ------------------------------------------------------------------------------------------------
# 12. Generated requests against the OpenAPI schema (Schemathesis, on the ASGI app, with a valid
#     key and a real database, broker and S3): no 5xx.
# ------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402

MAX_EXAMPLES = 100  # per operation: about 1,300 requests over the 19 operations


@pytest.fixture(scope="module")
def fuzz_app(migrated_pg, redis_url, s3_endpoint, s3_bucket, tiny_pipeline_dir, tmp_path_factory):
    from api.app import create_app
    from shared.db import session_scope
    from shared.registry import register_pipeline_dir, tenant_by_name
    from shared.security import create_key
    from shared.settings import Settings
    from shared.storage import get_storage

    settings = Settings(database_url=migrated_pg, broker_url=redis_url, storage_url=f"s3://{s3_bucket}/fuzz",
                        s3_endpoint_url=s3_endpoint, var_dir=tmp_path_factory.mktemp("fuzz"), storage_retry_s=2)
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    with session_scope(settings) as s:
        key = create_key(s, name)
        tid = tenant_by_name(s, name).id
        model = register_pipeline_dir(s, get_storage(settings), tid, tiny_pipeline_dir, name="tiny")
    return create_app(settings), key, model.id


@pytest.mark.slow
def test_12_generated_requests_never_get_a_5xx(fuzz_app):
    """Every operation of the OpenAPI schema, up to MAX_EXAMPLES generated requests each (a few
    thousand in all; Schemathesis' pytest plugin is driven by hand, one Hypothesis run per operation)."""
    schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (the test extra)")
    from hypothesis import given
    from schemathesis.checks import not_a_server_error

    app, key, model_id = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    counts: dict[str, int] = {}
    failures: list[str] = []
    def for_operation(label, strategy):
        @given(case=strategy)
        @hsettings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck), print_blob=True)
        def run(case):
            counts[label] = counts.get(label, 0) + 1
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
            if isinstance(case.body, dict):
                case.body.pop("webhook_url", None)  # never send anything anywhere
                if "model" in case.body and case.body.get("prompts"):
                    case.body["model"] = model_id  # reach past the 404 into validation and job creation
            case.call_and_validate(checks=[not_a_server_error])

        return run

    for result in schema.get_all_operations():
        op = result.ok()
        try:
            for_operation(op.label, op.as_strategy())()
        except BaseException as exc:  # noqa: BLE001 - collect every operation's failure, report them all
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append(f"{op.label}: {str(exc)[:3000]}")
    assert not failures, "\n\n".join(failures)
    print(f"\n{sum(counts.values())} generated requests over {len(counts)} operations: {counts}")
    assert len(counts) >= 15 and sum(counts.values()) >= 1500, counts
