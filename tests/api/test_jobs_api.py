"""The REST contract against real Postgres, Redis and an S3 server (no worker here)."""

import io
import json

import redis

from shared.db import session_scope
from shared.models import Job, JobRow
from tests.conftest import race


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def upload(client, key, csv_bytes, model, **form):
    return client.post("/v1/jobs/sample/csv", headers=auth(key),
                       files={"file": ("prompts.csv", io.BytesIO(csv_bytes), "text/csv")},
                       data={"model": model, **form})


def test_auth_required_and_bad_key(client):
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.get("/v1/jobs", headers=auth("ldmq_nope_nope"))
    assert r.status_code == 401


def test_revoked_key_is_refused_once_the_key_cache_expires(client, settings, make_tenant):
    from shared.security import revoke_key

    cache = client.app.state.key_cache
    now = [1000.0]
    cache._clock = lambda: now[0]
    _, key = make_tenant()
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200
    with session_scope(settings) as s:
        assert revoke_key(s, key.split("_")[1])
    now[0] += settings.auth_cache_s - 0.5
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200  # still remembered
    now[0] += 0.5
    r = client.get("/v1/jobs", headers=auth(key))
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid or revoked API key"


def test_revocation_is_immediate_without_the_key_cache(settings, make_tenant):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from shared.security import revoke_key

    _, key = make_tenant()
    with TestClient(create_app(settings.model_copy(update={"auth_cache_s": 0}))) as c:
        assert c.get("/v1/jobs", headers=auth(key)).status_code == 200
        with session_scope(settings) as s:
            assert revoke_key(s, key.split("_")[1])
        assert c.get("/v1/jobs", headers=auth(key)).status_code == 401


def test_sample_job_is_recorded_and_enqueued(client, settings, tiny_model, redis_url):
    _, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a cat", "num_images": 2, "seed": 7}, {"prompt": "a dog"}],
        "scheduler": "ddim", "steps": 3})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["type"] == "sample" and job["model_id"] == model_id
    assert job["attempts"] == 0 and job["progress"] == 0
    with session_scope(settings) as s:
        rows = s.query(JobRow).filter_by(job_id=job["id"]).order_by(JobRow.row).all()
        assert [(r.row, r.prompt, r.num_images) for r in rows] == [(1, "a cat", 2), (2, "a dog", 1)]
        assert rows[0].seed == 7 and rows[1].seed is not None  # seeds fixed at submit
    # The wake-up message is in the Redis list of the sample queue, naming the job.
    msgs = redis.Redis.from_url(redis_url).lrange("sample", 0, -1)
    assert any(job["id"] in json.loads(m)["headers"].get("argsrepr", "") for m in msgs)


def test_get_list_and_tenant_isolation(client, tiny_model, make_tenant):
    _, key, model_id = tiny_model
    ids = []
    for i in range(3):
        r = client.post("/v1/jobs/sample", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": f"p{i}"}]})
        ids.append(r.json()["id"])
    page1 = client.get("/v1/jobs?limit=2", headers=auth(key)).json()
    assert [j["id"] for j in page1["items"]] == ids[::-1][:2]
    page2 = client.get(f"/v1/jobs?limit=2&cursor={page1['next_cursor']}", headers=auth(key)).json()
    assert [j["id"] for j in page2["items"]] == [ids[0]] and page2["next_cursor"] is None
    assert client.get("/v1/jobs?status=bogus", headers=auth(key)).status_code == 422

    _, other = make_tenant()
    assert client.get(f"/v1/jobs/{ids[0]}", headers=auth(other)).status_code == 404
    assert client.get(f"/v1/jobs/{ids[0]}/outputs", headers=auth(other)).status_code == 404
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(other)).status_code == 404
    assert client.get("/v1/jobs", headers=auth(other)).json()["items"] == []
    assert client.get(f"/v1/models/{model_id}", headers=auth(other)).status_code == 404
    r = client.post("/v1/jobs/sample", headers=auth(other), json={"model": model_id, "prompts": [{"prompt": "x"}]})
    assert r.status_code == 404


def test_cancel_queued_job(client, tiny_model):
    _, key, model_id = tiny_model
    job = client.post("/v1/jobs/sample", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": "x"}]}).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key))
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).json()
    assert again["status"] == "canceled" and again["finished_at"] == r.json()["finished_at"]


def test_idempotency_key(client, settings, tiny_model):
    _, key, model_id = tiny_model
    body = {"model": model_id, "prompts": [{"prompt": "same"}]}
    h = {**auth(key), "Idempotency-Key": "abc-1"}
    a = client.post("/v1/jobs/sample", headers=h, json=body)
    b = client.post("/v1/jobs/sample", headers=h, json=body)
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    assert b.headers.get("Idempotent-Replayed") == "true"
    c = client.post("/v1/jobs/sample", headers=h, json={**body, "steps": 3})
    assert c.status_code == 422 and c.json()["error"]["code"] == "idempotency_key_reused"


def test_concurrent_submits_with_one_idempotency_key_make_one_job(client, settings, tiny_model):
    _, key, model_id = tiny_model
    body = {"model": model_id, "prompts": [{"prompt": "race"}]}
    h = {**auth(key), "Idempotency-Key": "race-key"}
    results = race(8, lambda: client.post("/v1/jobs/sample", headers=h, json=body))
    assert all(r.status_code == 202 for r in results), [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(idempotency_key="race-key").count() == 1


def test_every_create_path_has_the_same_idempotency(client, settings, tiny_model):
    """The CSV upload and the train submit replay, refuse a reused key and refuse a key over 200
    characters as the JSON sample submit does; racing trains with one key make one job."""
    _, key, model_id = tiny_model

    def csv_upload(headers, **form):
        return client.post("/v1/jobs/sample/csv", headers=headers, data={"model": model_id, **form},
                           files={"file": ("prompts.csv", io.BytesIO(b"prompt\na cat\n"), "text/csv")})

    h = {**auth(key), "Idempotency-Key": "csv-key"}
    a, b = csv_upload(h), csv_upload(h)
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    assert "Idempotent-Replayed" not in a.headers and b.headers.get("Idempotent-Replayed") == "true"
    c = csv_upload(h, steps="3")
    assert c.status_code == 422 and c.json()["error"]["code"] == "idempotency_key_reused"

    long = {**auth(key), "Idempotency-Key": "k" * 201}
    for r in (client.post("/v1/jobs/sample", headers=long, json={"model": model_id, "prompts": [{"prompt": "x"}]}),
              csv_upload(long),
              client.post("/v1/jobs/train", headers=long, json={"dataset": "builtin:digits", "steps": 5})):
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_idempotency_key", r.text

    h = {**auth(key), "Idempotency-Key": "train-race"}
    results = race(4, lambda: client.post("/v1/jobs/train", headers=h, json={"dataset": "builtin:digits", "steps": 5}))
    assert all(r.status_code == 202 for r in results), [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(idempotency_key="train-race").count() == 1
    for job_id in {a.json()["id"], results[0].json()["id"]}:  # no worker here: leave nothing queued
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200


def test_csv_upload_creates_job(client, settings, tiny_model):
    _, key, model_id = tiny_model
    r = upload(client, key, b"prompt,seed,num_images\na cat,1,2\na dog,2,1\n", model_id, steps="4", scheduler="ddpm")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["params"]["steps"] == 4 and job["params"]["scheduler"] == "ddpm" and job["total_items"] == 3


def test_csv_errors_list_every_cell_and_store_nothing(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    r = upload(client, key, b"prompt,seed,num_images,colour\n,x,-1,red\n", model_id)
    assert r.status_code == 422
    details = r.json()["error"]["details"]
    assert {"column": "colour"}.items() <= details[0].items()
    r = upload(client, key, b"prompt,seed,num_images\n,x,-1\nok,1,1\n", model_id)
    assert r.status_code == 422
    cells = {(d["row"], d["column"]) for d in r.json()["error"]["details"]}
    assert cells == {(1, "prompt"), (1, "seed"), (1, "num_images")}
    assert upload(client, key, b"\xff\xfe\x00", model_id).status_code == 422
    assert upload(client, key, b"", model_id).status_code == 422
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(tenant_id=tid).count() == 0


def test_csv_bad_form_fields(client, tiny_model):
    _, key, model_id = tiny_model
    r = upload(client, key, b"prompt\na\n", model_id, scheduler="euler")
    assert r.status_code == 422 and "scheduler" in json.dumps(r.json())
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), files={"file": ("p.csv", b"prompt\na\n", "text/csv")})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "model"


def test_body_over_limit_is_413(settings, tiny_model):
    from fastapi.testclient import TestClient

    from api.app import create_app

    _, key, model_id = tiny_model
    small = settings.model_copy(update={"max_body_bytes": 2048})
    with TestClient(create_app(small)) as c:
        r = upload(c, key, b"prompt\n" + b"a long prompt\n" * 400, model_id)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_sample_request_limits(client, settings, tiny_model):
    _, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": "x" * 5000}]})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["row"] == 1
    r = client.post("/v1/jobs/sample", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": "x"}], "bogus": 1})
    assert r.status_code == 422
    r = client.post("/v1/jobs/sample", headers=auth(key), json={"model": "nope", "prompts": [{"prompt": "x"}]})
    assert r.status_code == 404


def test_train_job_validation(client, tiny_model):
    _, key, _ = tiny_model
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 5})
    assert r.status_code == 202 and r.json()["type"] == "train"
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "nope"})
    assert r.status_code in (404, 422)
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "unknown_option": 1})
    assert r.status_code == 422


def test_models_list_and_get(client, tiny_model):
    _, key, model_id = tiny_model
    items = client.get("/v1/models", headers=auth(key)).json()["items"]
    assert [m["id"] for m in items] == [model_id]
    m = client.get(f"/v1/models/{model_id}", headers=auth(key)).json()
    assert m["uri"].startswith("s3://") and m["uri"].endswith("/") and "model_index" in m["config"]


def test_requests_are_counted_by_route_template_and_status(client, tiny_model):
    from prometheus_client.parser import text_string_to_metric_families

    def counts():
        return {(x.labels["method"], x.labels["route"], x.labels["status"]): x.value
                for f in text_string_to_metric_families(client.get("/metrics").text) for x in f.samples
                if x.name == "ldmq_http_requests_total"}

    _, key, model_id = tiny_model
    before = counts()
    assert client.get("/v1/jobs/nope", headers=auth(key)).status_code == 404
    assert client.get("/no/such/path").status_code == 404
    assert client.get(f"/v1/models/{model_id}", headers=auth(key)).status_code == 200
    after = counts()

    def grew(label):
        return after.get(label, 0) - before.get(label, 0)

    assert grew(("GET", "/v1/jobs/{job_id}", "404")) == 1  # the template, not the id
    assert grew(("GET", "unmatched", "404")) == 1
    assert grew(("GET", "/v1/models/{model_id}", "200")) == 1


def test_ops_routes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    assert "ldmq_jobs" in client.get("/metrics").text
    assert client.get("/openapi.json").json()["paths"]["/v1/jobs/sample/csv"]
    assert client.get("/docs").status_code == 200


def test_priority_is_stored_shown_and_bounded(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    body = {"model": model_id, "prompts": [{"prompt": "a"}]}
    r = client.post("/v1/jobs/sample", headers=auth(key), json={**body, "priority": 7})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["priority"] == 7 and "priority" not in job["params"]
    assert client.post("/v1/jobs/sample", headers=auth(key), json=body).json()["priority"] == 0
    r = upload(client, key, b"prompt\na\n", model_id, priority="-3")
    assert r.status_code == 202 and r.json()["priority"] == -3
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 2, "priority": 10})
    assert r.status_code == 202 and r.json()["priority"] == 10 and "priority" not in r.json()["params"]
    with session_scope(settings) as s:
        before = s.query(Job).filter_by(tenant_id=tid).count()
        assert s.get(Job, job["id"]).priority == 7
    for bad in (11, -11, "high"):
        r = client.post("/v1/jobs/sample", headers=auth(key), json={**body, "priority": bad})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"].endswith("priority"), r.text
    r = upload(client, key, b"prompt\na\n", model_id, priority="99")
    assert r.status_code == 422 and "priority" in json.dumps(r.json())
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "priority": -20})
    assert r.status_code == 422
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(tenant_id=tid).count() == before
