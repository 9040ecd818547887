"""GET /v1/jobs/{id}/checkpoints: each stored checkpoint of a train job with its evaluation, sample
grid and loss curve, tenant-scoped."""

from __future__ import annotations

import io

import httpx
from PIL import Image

TINY = {"dataset": "builtin:digits", "steps": 4, "autoencoder_steps": 2, "resolution": 16,
        "autoencoder_channels": [8, 16, 16], "unet_channels": [16, 32], "checkpoint_every": 3, "keep_checkpoints": 2,
        "eval_num_samples": 10, "vlb_timesteps": 2, "eval_steps": 2}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_a_train_jobs_checkpoints_with_their_evaluation(client, settings, make_tenant):
    from worker.jobs.train import run_train
    from worker.runtime.run import run_job

    _, key = make_tenant()
    job_id = client.post("/v1/jobs/train", headers=auth(key), json=TINY).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=auth(key)).json() == {"items": []}
    assert run_job(settings, job_id, "train", lambda run: run_train(settings, run)) == "succeeded"

    items = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=auth(key)).json()["items"]
    assert [i["step"] for i in items] == [3, 6]  # global steps 3 and the last (2 + 4); keep_checkpoints=2
    assert [i["latest"] for i in items] == [False, True] and {i["attempt"] for i in items} == {1}
    last = items[-1]
    assert last["metrics"]["step"] == 6 and "accuracy" in last["metrics"]
    for url in (last["grid_url"], last["loss_curve_url"]):
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "PNG"

    # the final evaluation chose the model's sampling defaults; the model carries them, a bare request uses them
    chosen = last["metrics"]["sampling_defaults"]
    assert chosen["scheduler"] == "dpm-solver++" and chosen["steps"] == 2
    assert chosen["guidance_scale"] in [r["guidance_scale"] for r in last["metrics"]["guidance_sweep"]]
    model_id = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["model_id"]
    assert client.get(f"/v1/models/{model_id}", headers=auth(key)).json()["sampling_defaults"] == chosen
    bare = client.post("/v1/jobs/sample", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": "a"}]})
    assert {f: bare.json()["params"][f] for f in chosen} == chosen
    assert client.post(f"/v1/jobs/{bare.json()['id']}/cancel", headers=auth(key)).status_code == 200

    _, other = make_tenant()
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=auth(other)).status_code == 404


def test_a_sample_job_has_no_checkpoints(client, tiny_model):
    _, key, model_id = tiny_model
    job_id = client.post("/v1/jobs/sample", headers=auth(key),
                         json={"model": model_id, "prompts": [{"prompt": "a"}]}).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=auth(key)).json() == {"items": []}
