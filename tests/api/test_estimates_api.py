"""Estimates from measured timings: sample and train dry runs, a queued job's estimated_seconds,
and the timings a real (in-process) sample and train run record."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select

from api.services.estimates import job_estimated_seconds
from shared import estimates
from shared.db import session_scope
from shared.models import Job, StepTiming
from shared.train_schema import TrainParams

TINY_TRAIN = {"dataset": "builtin:digits", "steps": 4, "autoencoder_steps": 2, "resolution": 16, "batch_size": 8,
              "autoencoder_channels": [8, 16, 16], "unet_channels": [16, 32], "checkpoint_every": 3,
              "keep_checkpoints": 2, "eval_num_samples": 10, "vlb_timesteps": 2, "eval_steps": 2}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def dry_sample(client, key, body):
    r = client.post("/v1/jobs/sample", headers=auth(key), params={"dry_run": "true"}, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def record(settings, **figure):
    with session_scope(settings) as s:
        estimates.record(s, **figure)


def test_a_sample_dry_run_uses_the_measured_batch_step_and_counts_guidance(client, settings, tiny_model):
    _, key, model_id = tiny_model
    body = {"model": model_id, "steps": 5, "prompts": [{"prompt": "a", "num_images": 6}]}
    est = dry_sample(client, key, body)  # nothing measured yet: the default, guided image-steps twice
    assert est["seconds_per_step_source"] == "default" and est["measurement"] is None
    assert est["unet_steps"] == 60 and est["estimated_gpu_seconds"] == pytest.approx(60 * est["seconds_per_step"])

    record(settings, kind="denoise", model_key=model_id, size="32x32", batch=4, guidance=True, device="cpu",
           seconds=0.2, units=10)
    est = dry_sample(client, key, body)
    # 6 images in batches of 4: 2 batches (the last padded) x 5 steps x 0.2 s
    assert est["seconds_per_step_source"] == "measured" and est["estimated_gpu_seconds"] == pytest.approx(2.0)
    assert est["measurement"] == {"device": "cpu", "batch_size": 4, "size": "32x32", "samples": 10}
    assert est["seconds_per_step"] == pytest.approx(0.1 / 4)  # unguided, one image

    # Unguided rows were never measured: half the guided figure, and the source says so.
    body["prompts"].append({"prompt": "b", "num_images": 1, "guidance_scale": 1.0, "steps": 10})
    est = dry_sample(client, key, body)
    assert est["seconds_per_step_source"] == "measured, scaled for guidance"
    assert est["estimated_gpu_seconds"] == pytest.approx(2.0 + 1 * 10 * 0.1)
    record(settings, kind="denoise", model_key=model_id, size="32x32", batch=4, guidance=False, device="cpu",
           seconds=0.08, units=10)
    est = dry_sample(client, key, body)
    assert est["seconds_per_step_source"] == "measured" and est["estimated_gpu_seconds"] == pytest.approx(2.0 + 0.8)
    # Another size was never measured for this model: not this figure.
    est = dry_sample(client, key, {**body, "width": 64, "height": 64})
    assert est["seconds_per_step_source"] == "default"


def test_a_queued_jobs_estimated_seconds_is_its_dry_run(client, settings, tiny_model):
    _, key, model_id = tiny_model
    record(settings, kind="denoise", model_key=model_id, size="32x32", batch=2, guidance=True, device="cpu",
           seconds=0.5, units=4)
    body = {"model": model_id, "steps": 3, "prompts": [{"prompt": "a", "num_images": 3}, {"prompt": "b", "steps": 2}]}
    want = dry_sample(client, key, body)["estimated_gpu_seconds"]
    assert want == pytest.approx(2 * 3 * 0.5 + 1 * 2 * 0.5)
    job = client.post("/v1/jobs/sample", headers=auth(key), json=body).json()
    assert job["status"] == "queued" and job["estimated_seconds"] == pytest.approx(want)
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).json()["estimated_seconds"] == pytest.approx(want)
    listed = client.get("/v1/jobs", headers=auth(key)).json()["items"]
    assert [j["estimated_seconds"] for j in listed if j["id"] == job["id"]] == [pytest.approx(want)]
    with session_scope(settings) as s:
        row = s.get(Job, job["id"])
        assert job_estimated_seconds(s, row) == pytest.approx(want)
        row.progress = 0.5  # a requeued job that had done half: half is left
        assert job_estimated_seconds(s, row) == pytest.approx(want / 2)
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key))
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).json()["estimated_seconds"] is None


def test_a_train_dry_run_validates_like_a_submit_and_stores_nothing(client, settings, make_tenant):
    tid, key = make_tenant()
    body = {**TINY_TRAIN, "steps": 5, "unet_channels": [24, 48], "attention_heads": 4}  # an architecture no test ran
    r = client.post("/v1/jobs/train", headers=auth(key), params={"dry_run": "true"}, json=body)
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["valid"] and est["dry_run"] and est["source"] == "default" and est["total_steps"] == 7
    units = {p["kind"]: p["units"] for p in est["parts"]}
    # autoencoder: global steps 1-2, no multiple of 3: its last only; U-Net 3-7: at 3, 6 and its last (7)
    assert units == {"train_autoencoder": 2, "eval_autoencoder": 1, "train_unet": 5, "eval_unet": 3}
    assert est["estimated_gpu_seconds"] == pytest.approx(sum(p["units"] * p["seconds_each"] for p in est["parts"]), rel=1e-3)
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(tenant_id=tid).count() == 0
    r = client.post("/v1/jobs/train", headers=auth(key), params={"dry_run": "true"}, json={**body, "dataset": "nope"})
    assert r.status_code == 404
    r = client.post("/v1/jobs/train", headers=auth(key), params={"dry_run": "true"}, json={**body, "steps": 10**6})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "steps"

    keys = estimates.train_keys(TrainParams(**body))
    record(settings, kind="train_unet", model_key=keys["train_unet"], size="16x16", batch=8, guidance=False,
           device="cpu", seconds=0.25, units=5)
    est = client.post("/v1/jobs/train", headers=auth(key), params={"dry_run": "true"}, json=body).json()
    assert est["source"] == "partly measured"
    unet = next(p for p in est["parts"] if p["kind"] == "train_unet")
    assert (unet["source"], unet["seconds_each"], unet["device"]) == ("measured", 0.25, "cpu")
    job = client.post("/v1/jobs/train", headers=auth(key), json=body).json()
    assert job["estimated_seconds"] == pytest.approx(est["estimated_gpu_seconds"])


def test_real_runs_record_their_timings_and_dry_runs_then_use_them(client, settings, tiny_model):
    from worker.jobs.sample import run_sample
    from worker.jobs.train import run_train
    from worker.runtime.run import run_job

    _, key, model_id = tiny_model
    job = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "steps": 3, "scheduler": "ddim", "prompts": [{"prompt": "a", "num_images": 3}]}).json()
    assert run_job(settings, job["id"], "sample", lambda r: run_sample(settings, r)) == "succeeded"
    with session_scope(settings) as s:
        rows = list(s.scalars(select(StepTiming).where(StepTiming.model_key == model_id)))
    assert [(r.kind, r.size, r.guidance, r.device, r.samples) for r in rows] == [("denoise", "32x32", True, "cpu", 3)]
    assert rows[0].seconds > 0
    assert dry_sample(client, key, {"model": model_id, "steps": 3, "prompts": [{"prompt": "x"}]})[
        "seconds_per_step_source"] == "measured"

    keys = estimates.train_keys(TrainParams(**TINY_TRAIN))
    with session_scope(settings) as s:  # the session's database is shared: start this architecture afresh
        s.execute(delete(StepTiming).where(StepTiming.model_key.in_(keys.values())))
    job = client.post("/v1/jobs/train", headers=auth(key), json=TINY_TRAIN).json()
    assert run_job(settings, job["id"], "train", lambda r: run_train(settings, r)) == "succeeded"
    with session_scope(settings) as s:
        got = {r.kind: r.samples for r in s.scalars(select(StepTiming).where(StepTiming.model_key.in_(keys.values())))}
    est = client.post("/v1/jobs/train", headers=auth(key), params={"dry_run": "true"}, json=TINY_TRAIN).json()
    # What the loop did (steps, evaluations) is what the estimate counts, and every part is measured.
    assert got == {p["kind"]: p["units"] for p in est["parts"]} == {
        "train_autoencoder": 2, "train_unet": 4, "eval_autoencoder": 1, "eval_unet": 2}
    assert est["source"] == "measured"
