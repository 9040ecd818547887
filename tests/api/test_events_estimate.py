"""GET /v1/jobs/{id}/events, the CSV/JSON dry run with its estimate, and artifact_urls on models."""

from __future__ import annotations

import io
import json

import httpx
import redis

from shared import jobstate
from shared.db import session_scope
from shared.models import Job, JobStatus, Model
from shared.storage import get_storage


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def upload(client, key, csv_bytes, model, params=None, **form):
    return client.post("/v1/jobs/sample/csv", headers=auth(key), params=params or {},
                       files={"file": ("prompts.csv", io.BytesIO(csv_bytes), "text/csv")}, data={"model": model, **form})


def test_events_in_order_with_after_id_pages_and_type_filter(client, settings, tiny_model, make_tenant):
    _, key, model_id = tiny_model
    job_id = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a"}]}).json()["id"]
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "w", 30)
    for p in (0.25, 0.5, 0.75):
        with session_scope(settings) as s:
            jobstate.set_progress(s, job_id, claim.attempt, p, {"loss": 1 - p})
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, claim.attempt, JobStatus.succeeded)

    r = client.get(f"/v1/jobs/{job_id}/events", headers=auth(key))
    assert r.status_code == 200
    body = r.json()
    assert [e["type"] for e in body["items"]] == ["started", "progress", "progress", "progress", "succeeded"]
    ids = [e["id"] for e in body["items"]]
    assert ids == sorted(ids) and body["next_after_id"] == ids[-1] and body["has_more"] is False
    assert body["items"][2]["data"] == {"progress": 0.5, "loss": 0.5}

    # Pages of two, following next_after_id, give the same events once each.
    seen, after = [], 0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"after_id": after, "limit": 2}).json()
        seen += [e["id"] for e in page["items"]]
        after = page["next_after_id"]
        if not page["has_more"]:
            break
    assert seen == ids
    # Polling past the end: nothing, and the cursor stays.
    end = client.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"after_id": ids[-1]}).json()
    assert end == {"items": [], "next_after_id": ids[-1], "has_more": False}

    losses = client.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"types": "progress"}).json()["items"]
    assert [e["data"]["loss"] for e in losses] == [0.75, 0.5, 0.25]
    r = client.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"types": "progress,bogus"})
    assert r.status_code == 422 and "'bogus'" in r.json()["error"]["message"] and "row_done" in r.json()["error"]["message"]
    assert client.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"after_id": -1}).status_code == 422

    _, other = make_tenant()
    assert client.get(f"/v1/jobs/{job_id}/events", headers=auth(other)).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=auth(other)).status_code == 404


def test_csv_dry_run_validates_and_estimates_without_storing(client, settings, tiny_model, redis_url):
    tid, key, model_id = tiny_model
    q = redis.Redis.from_url(redis_url)
    before = q.llen("sample")
    csv_bytes = b"prompt,num_images,steps\na cat,2,\na dog,1,10\n"
    r = upload(client, key, csv_bytes, model_id, params={"dry_run": "true"}, steps="4")
    assert r.status_code == 200, r.text
    est = r.json()
    # images x steps: 2 x 4 (the form's steps) + 1 x 10 (the row's own)
    assert est["valid"] is True and est["dry_run"] is True and est["model_id"] == model_id
    assert (est["rows"], est["images"], est["denoising_steps"]) == (2, 3, 18)
    assert est["seconds_per_step_source"] == "default"
    # guidance 5 (the default): the U-Net runs twice per image-step
    assert est["unet_steps"] == 36 and est["estimated_gpu_seconds"] == round(36 * est["seconds_per_step"], 3) > 0
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(tenant_id=tid).count() == 0
    assert q.llen("sample") == before

    # A per-model constant in the model's config wins.
    with session_scope(settings) as s:
        m = s.get(Model, model_id)
        m.config = {**m.config, "seconds_per_step": 0.5}
    est = upload(client, key, csv_bytes, model_id, params={"dry_run": "true"}, steps="4").json()
    assert est["seconds_per_step_source"] == "model" and est["estimated_gpu_seconds"] == 18.0

    # A bad CSV or form is the same 422 as a real submit; an unknown model a 404.
    r = upload(client, key, b"prompt,seed\n,x\n", model_id, params={"dry_run": "true"})
    assert r.status_code == 422 and {(d["row"], d["column"]) for d in r.json()["error"]["details"]} == {(1, "prompt"), (1, "seed")}
    r = upload(client, key, csv_bytes, model_id, params={"dry_run": "true"}, scheduler="euler")
    assert r.status_code == 422 and "scheduler" in json.dumps(r.json())
    r = upload(client, key, csv_bytes, model_id, params={"dry_run": "true"}, steps="100000")
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "steps"
    assert upload(client, key, csv_bytes, "nope", params={"dry_run": "true"}).status_code == 404
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(tenant_id=tid).count() == 0
    # Without dry_run the same upload is a job (202).
    r = upload(client, key, csv_bytes, model_id, steps="4")
    assert r.status_code == 202
    client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth(key))  # leave no work for a later worker


def test_json_dry_run(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample", headers=auth(key), params={"dry_run": "true"},
                    json={"model": model_id, "prompts": [{"prompt": "a", "num_images": 3}], "steps": 5})
    assert r.status_code == 200 and r.json()["denoising_steps"] == 15
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(tenant_id=tid).count() == 0


def test_model_artifact_urls_are_presigned_and_tenant_scoped(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    storage = get_storage(settings)
    grid_key = f"{tid}/jobs/j1/eval/samples.png"
    storage.put_bytes(grid_key, b"\x89PNG fake grid", content_type="image/png")
    with session_scope(settings) as s:
        s.get(Model, model_id).metrics = {"fid": 1.0, "artifacts": {"samples.png": grid_key,
                                                                    "stolen.png": "othertenant/jobs/x/eval/a.png"}}
    m = client.get(f"/v1/models/{model_id}", headers=auth(key)).json()
    assert set(m["artifact_urls"]) == {"samples.png"}
    assert httpx.get(m["artifact_urls"]["samples.png"]).content == b"\x89PNG fake grid"
    listed = client.get("/v1/models", headers=auth(key)).json()["items"]
    assert set(listed[0]["artifact_urls"]) == {"samples.png"}
