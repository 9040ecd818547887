"""Hostile request bodies: CSV floods, enormous headers, unknown form fields, oversized and
malformed bodies, requests over the deployment's limits. Each is a clear 4xx, within the time and
memory bounds stated, and nothing is stored."""

from __future__ import annotations

import time
import tracemalloc

from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import Job


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def jobs_of(settings) -> int:
    with session_scope(settings) as s:
        return s.scalar(select(func.count()).select_from(Job))


def post_csv(client, key, model_id, data: bytes, **form):
    return client.post("/v1/jobs/sample/csv", headers=auth(key), files={"file": ("p.csv", data, "text/csv")},
                       data={"model": model_id, **form})


def test_a_flood_of_bad_rows_gets_a_bounded_answer(client, settings, tiny_model):
    _, key, model_id = tiny_model
    before = jobs_of(settings)
    data = b"prompt,seed\n" + b"a,not-a-number\n" * 10_000
    clock = time.perf_counter()
    r = post_csv(client, key, model_id, data)
    elapsed = time.perf_counter() - clock
    assert r.status_code == 422
    details = r.json()["error"]["details"]
    assert len(details) == 101 and details[-1]["more"] == 9_900
    assert details[0] == {"row": 1, "column": "seed", "message": "seed: 'not-a-number' is not an integer"}
    assert elapsed < 20, f"{elapsed:.1f} s for 10,000 bad rows"
    assert jobs_of(settings) == before


def test_a_header_of_many_columns_is_linear(client, settings, tiny_model):
    """200,000 unknown or repeated columns (1.2 MB): a quadratic check would take minutes."""
    _, key, model_id = tiny_model
    header = b",".join([b"prompt"] + [b"x%d" % (i % 100_000) for i in range(200_000)])
    clock = time.perf_counter()
    r = post_csv(client, key, model_id, header + b"\n" + b"a" + b"," * 200_000 + b"\n")
    assert r.status_code == 422 and len(r.json()["error"]["details"]) <= 101
    assert time.perf_counter() - clock < 20


def test_an_unknown_form_field_names_the_valid_ones(client, settings, tiny_model):
    _, key, model_id = tiny_model
    before = jobs_of(settings)
    r = post_csv(client, key, model_id, b"prompt\na\n", prority="10", step="5")
    assert r.status_code == 422
    err = r.json()["error"]
    assert "'prority'" in err["message"] and "'step'" in err["message"] and "valid: file, model" in err["message"]
    assert {d["field"] for d in err["details"]} == {"prority", "step"}
    assert jobs_of(settings) == before


def test_an_oversized_body_is_refused_unread(client, settings, tiny_model):
    _, key, model_id = tiny_model
    big = b"prompt\n" + b"a\n" * (settings.max_body_bytes // 2 + 1)
    tracemalloc.start()
    try:
        r = post_csv(client, key, model_id, big)
    finally:
        tracemalloc.stop()
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_malformed_json_bodies_are_4xx_in_the_envelope(client, tiny_model):
    _, key, _ = tiny_model
    for body in (b"{", b"[]", b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\xff\xfe"):
        r = client.post("/v1/jobs/sample", headers={**auth(key), "Content-Type": "application/json"}, content=body)
        assert r.status_code in (400, 422) and r.json()["error"]["code"], (body[:20], r.status_code)


def test_a_train_job_over_the_deployments_limits_is_refused(client, settings, make_tenant):
    _, key = make_tenant()
    before = jobs_of(settings)
    r = client.post("/v1/jobs/train", headers=auth(key), json={
        "dataset": "builtin:digits", "steps": settings.train_max_steps, "batch_size": settings.train_max_batch_size + 1,
        "checkpoint_every": 1, "eval_num_samples": settings.train_max_eval_samples + 1})
    assert r.status_code == 422
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert fields == {"steps", "batch_size", "checkpoint_every", "eval_num_samples"}
    assert jobs_of(settings) == before


def test_max_attempts_cannot_be_raised_past_the_operators_limit(client, settings, tiny_model):
    _, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a"}], "max_attempts": settings.max_attempts_limit + 1})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "max_attempts"


def test_metrics_can_be_put_behind_a_token(settings):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings.model_copy(update={"metrics_token": "s3cret-scrape"}))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"})
        assert r.status_code == 200 and "ldmq_" in r.text
    with TestClient(create_app(settings)) as c:  # off by default: compose and k8s scrape inside the network
        assert c.get("/metrics").status_code == 200
