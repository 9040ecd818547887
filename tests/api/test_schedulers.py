"""GET /v1/schedulers, scheduler names in sample requests, and what langevin-pc's steps cost."""

import io
import json

from shared.catalog import LANGEVIN_CORRECTOR_STEPS, SCHEDULERS
from shared.db import session_scope
from shared.models import Job


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_list_schedulers_names_every_accepted_one_with_a_line(client, make_tenant):
    _, key = make_tenant()
    r = client.get("/v1/schedulers", headers=auth(key))
    assert r.status_code == 200
    items = r.json()["items"]
    assert [i["name"] for i in items] == list(SCHEDULERS) and "langevin-pc" in SCHEDULERS
    assert all(set(i) == {"name", "description"} and 20 < len(i["description"]) < 200 and "\n" not in i["description"]
               for i in items)
    assert "network evaluations" in next(i["description"] for i in items if i["name"] == "langevin-pc")
    assert client.get("/v1/schedulers").status_code == 401
    assert client.get("/v1/schedulers", headers=auth("nope")).status_code == 401


def test_an_unknown_scheduler_is_a_422_that_lists_the_valid_ones(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample", headers=auth(key),
                    json={"model": model_id, "prompts": [{"prompt": "a"}], "scheduler": "euler"})
    assert r.status_code == 422
    body = json.dumps(r.json())
    assert "scheduler" in body and all(f"'{name}'" in body for name in SCHEDULERS)
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), data={"model": model_id, "scheduler": "langevin"},
                    files={"file": ("p.csv", io.BytesIO(b"prompt\na\n"), "text/csv")})
    assert r.status_code == 422 and all(f"'{name}'" in json.dumps(r.json()) for name in SCHEDULERS)
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(tenant_id=tid).count() == 0


def test_langevin_pc_estimate_counts_the_corrector_evaluations(client, tiny_model):
    _, key, model_id = tiny_model
    prompts = [{"prompt": "a", "num_images": 3}, {"prompt": "b", "steps": 4}]

    def estimate(scheduler):
        r = client.post("/v1/jobs/sample", headers=auth(key), params={"dry_run": "true"},
                        json={"model": model_id, "prompts": prompts, "steps": 10, "scheduler": scheduler})
        assert r.status_code == 200, r.text
        return r.json()

    plain, pc = estimate("ddim"), estimate("langevin-pc")
    assert plain["denoising_steps"] == plain["network_evaluations"] == pc["denoising_steps"] == 3 * 10 + 4
    m = LANGEVIN_CORRECTOR_STEPS
    assert pc["network_evaluations"] == 3 * (10 + m * 9) + (4 + m * 3)
    # Guided (guidance > 1): each evaluation runs the U-Net on the unconditional and conditional half.
    guided = 2 if pc["guidance_scale"] > 1 else 1
    assert pc["unet_steps"] == guided * pc["network_evaluations"]
    assert pc["estimated_gpu_seconds"] == round(guided * pc["network_evaluations"] * pc["seconds_per_step"], 3)
    assert plain["estimated_gpu_seconds"] == round(guided * 34 * plain["seconds_per_step"], 3)


def test_max_steps_bounds_langevin_pc_by_its_network_evaluations(client, settings, tiny_model):
    _, key, model_id = tiny_model
    steps = settings.max_steps  # allowed for one evaluation a step, over the bound with a corrector
    body = {"model": model_id, "prompts": [{"prompt": "a"}], "steps": steps}
    assert client.post("/v1/jobs/sample", headers=auth(key), params={"dry_run": "true"}, json=body).status_code == 200
    r = client.post("/v1/jobs/sample", headers=auth(key), params={"dry_run": "true"},
                    json={**body, "scheduler": "langevin-pc"})
    assert r.status_code == 422
    [detail] = r.json()["error"]["details"]
    assert detail["field"] == "steps" and "network evaluations" in detail["message"] and str(settings.max_steps) in detail["message"]
