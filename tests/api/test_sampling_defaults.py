"""Models carry their sampling defaults: a sample job (JSON or CSV) that leaves scheduler, steps or
guidance_scale out uses the model's, else the global ones, and its params show what it uses."""

import io

import pytest

from shared.db import session_scope
from shared.models import Job, JobRow, Model
from shared.sampling_defaults import GLOBAL_DEFAULTS
from tests.conftest import put_dir


def auth(key):
    return {"Authorization": f"Bearer {key}"}


DEFAULTS = {"scheduler": "ddim", "steps": 7, "guidance_scale": 2.5}


@pytest.fixture
def model_with_defaults(settings, tiny_model):
    tid, key, model_id = tiny_model
    with session_scope(settings) as s:
        m = s.get(Model, model_id)
        m.config = {**m.config, "sampling_defaults": DEFAULTS}
    return key, model_id


def sample(client, key, body, **headers):
    return client.post("/v1/jobs/sample", headers={**auth(key), **headers}, json=body)


def used(job):
    return {f: job["params"][f] for f in ("scheduler", "steps", "guidance_scale")}


def cancel(client, key, *jobs):  # no worker here: leave nothing queued
    for j in jobs:
        assert client.post(f"/v1/jobs/{j['id']}/cancel", headers=auth(key)).status_code == 200


def test_a_bare_request_uses_the_models_defaults_and_explicit_values_win(client, model_with_defaults):
    key, model_id = model_with_defaults
    assert client.get(f"/v1/models/{model_id}", headers=auth(key)).json()["sampling_defaults"] == DEFAULTS
    bare = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}]})
    assert bare.status_code == 202, bare.text
    assert used(bare.json()) == DEFAULTS
    explicit = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}], "scheduler": "ddpm", "steps": 3,
                                    "guidance_scale": 1.0})
    assert used(explicit.json()) == {"scheduler": "ddpm", "steps": 3, "guidance_scale": 1.0}
    mixed = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}], "guidance_scale": 4.0})
    assert used(mixed.json()) == {**DEFAULTS, "guidance_scale": 4.0}
    # the dry run reports the same values
    est = client.post("/v1/jobs/sample?dry_run=true", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": "a"}]})
    assert est.status_code == 200, est.text
    assert {f: est.json()[f] for f in DEFAULTS} == DEFAULTS and est.json()["denoising_steps"] == 7
    cancel(client, key, bare.json(), explicit.json(), mixed.json())


def test_a_model_without_defaults_gets_the_global_ones(client, tiny_model):
    _, key, model_id = tiny_model
    assert client.get(f"/v1/models/{model_id}", headers=auth(key)).json()["sampling_defaults"] is None
    r = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}]})
    assert used(r.json()) == GLOBAL_DEFAULTS
    cancel(client, key, r.json())


def test_csv_rows_and_form_fields_resolve_the_same_way(client, settings, model_with_defaults):
    key, model_id = model_with_defaults
    csv = b"prompt,steps,guidance_scale\nown values,3,1.5\nleft out,,\n"

    def upload(**form):
        return client.post("/v1/jobs/sample/csv", headers=auth(key), data={"model": model_id, **form},
                           files={"file": ("p.csv", io.BytesIO(csv), "text/csv")})

    bare = upload()
    assert bare.status_code == 202, bare.text
    assert used(bare.json()) == DEFAULTS
    with session_scope(settings) as s:  # a row's own steps/guidance stay its own; the job's apply to the rest
        rows = s.query(JobRow).filter_by(job_id=bare.json()["id"]).order_by(JobRow.row).all()
        assert [(r.steps, r.guidance_scale) for r in rows] == [(3, 1.5), (None, None)]
    from worker.jobs.provenance import row_steps_guidance

    assert [row_steps_guidance(bare.json()["params"], r) for r in rows] == [(3, 1.5), (7, 2.5)]
    form = upload(steps="9", scheduler="dpm-solver++")
    assert used(form.json()) == {"scheduler": "dpm-solver++", "steps": 9, "guidance_scale": 2.5}
    cancel(client, key, bare.json(), form.json())


def test_idempotency_hashes_the_values_used(client, model_with_defaults):
    """A bare body and one stating the model's defaults make the same job; other values are another request."""
    key, model_id = model_with_defaults
    h = {"Idempotency-Key": "defaults-1"}
    a = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}]}, **h)
    b = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}], **DEFAULTS}, **h)
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    c = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}], "steps": 8}, **h)
    assert c.status_code == 422 and c.json()["error"]["code"] == "idempotency_key_reused"
    cancel(client, key, a.json())


def test_a_default_over_the_deployments_limit_is_a_clear_422(client, settings, model_with_defaults):
    key, model_id = model_with_defaults
    with session_scope(settings) as s:
        m = s.get(Model, model_id)
        m.config = {**m.config, "sampling_defaults": {**DEFAULTS, "steps": settings.max_steps + 1}}
    r = sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}]})
    assert r.status_code == 422 and "model default" in r.text
    assert sample(client, key, {"model": model_id, "prompts": [{"prompt": "a"}], "steps": 2}).status_code == 202
    with session_scope(settings) as s:
        for j in s.query(Job).filter_by(model_id=model_id):
            j.status = "canceled"


def test_an_import_may_state_its_defaults_and_they_are_validated(client, settings, s3_endpoint, s3_bucket,
                                                                 tiny_pipeline_dir, make_tenant):
    _, key = make_tenant()
    put_dir(s3_endpoint, s3_bucket, "incoming/tiny-defaults", tiny_pipeline_dir)
    src = f"s3://{s3_bucket}/incoming/tiny-defaults"
    for bad, says in (({"scheduler": "euler"}, "ddpm"), ({"steps": settings.max_steps + 1}, "limit"),
                      ({"guidance_scale": 51}, "50"), ({}, "at least one"), ({"steps": 5, "sampler": "x"}, "sampler")):
        r = client.post("/v1/models", headers=auth(key), json={"source": src, "sampling_defaults": bad})
        assert r.status_code == 422 and says in r.text, (bad, r.text)
    with session_scope(settings) as s:
        assert s.query(Model).filter(Model.name == "tiny-defaults").count() == 0  # nothing half stored
    r = client.post("/v1/models", headers=auth(key), json={"source": src, "sampling_defaults": {"guidance_scale": 3}})
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["sampling_defaults"] == {"scheduler": None, "steps": None, "guidance_scale": 3.0}
    job = sample(client, key, {"model": model["id"], "prompts": [{"prompt": "a"}]})
    assert used(job.json()) == {**GLOBAL_DEFAULTS, "guidance_scale": 3.0}
    cancel(client, key, job.json())
