"""Security guarantees that sit on the worker side: a checkpoint holding a pickle is refused
before any byte is read, and CSV manifests cannot smuggle spreadsheet formulas."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle

from shared.db import session_scope
from shared.models import Job
from shared.storage import get_storage, manifest_key

MARKER = "/tmp/ldmq-checkpoint-pickle-was-loaded"


class Marker:
    def __reduce__(self):
        return (open, (MARKER, "w"))


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_a_pickled_checkpoint_is_refused_before_it_is_read(client, settings, make_tenant):
    from worker.runtime.run import run_job
    from worker.jobs.train import run_train

    if os.path.exists(MARKER):
        os.remove(MARKER)
    tid, key = make_tenant()
    r = client.post("/v1/jobs/train", headers=auth(key),
                    json={"dataset": "builtin:digits", "steps": 4, "autoencoder_steps": 2, "resolution": 16,
                          "autoencoder_channels": [8, 16, 16], "unet_channels": [16, 32]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    storage = get_storage(settings)
    prefix = f"{tid}/jobs/{job_id}/checkpoints/step-00000002-a1"
    storage.put_bytes(f"{prefix}/state.json", json.dumps({"stage": "autoencoder", "global_step": 2}).encode())
    storage.put_bytes(f"{prefix}/vae.pt", pickle.dumps(Marker()))
    with session_scope(settings) as s:
        s.get(Job, job_id).checkpoint_key = prefix  # as if an earlier attempt had pointed there

    assert run_job(settings, job_id, "train", lambda run: run_train(settings, run)) == "failed"
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
    assert job.error["code"] == "unsafe_checkpoint" and "vae.pt" in job.error["message"], job.error
    assert not os.path.exists(MARKER)


def test_manifest_csv_neutralises_formula_cells(client, settings, tiny_model):
    from worker.runtime.run import run_job
    from worker.jobs.sample import run_sample

    tid, key, model_id = tiny_model
    prompts = ["=HYPERLINK(\"http://x\")", "+1+1", "-2", "@SUM(A1)", "a plain prompt"]
    r = client.post("/v1/jobs/sample", headers=auth(key),
                    json={"model": model_id, "steps": 2, "scheduler": "ddim",
                          "prompts": [{"prompt": p, "seed": i, "negative_prompt": "=cmd|' /C calc'!A0"}
                                      for i, p in enumerate(prompts)]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert run_job(settings, job_id, "sample", lambda run: run_sample(settings, run)) == "succeeded"
    storage = get_storage(settings)
    rows = list(csv.DictReader(io.StringIO(
        storage.get_bytes(manifest_key(tid, job_id).replace(".json", ".csv")).decode())))
    assert [row["prompt"] for row in rows] == ["'" + p for p in prompts[:4]] + ["a plain prompt"]
    assert all(row["negative_prompt"] == "'=cmd|' /C calc'!A0" for row in rows)
    assert not any(cell[:1] in "=+-@" for row in rows for cell in row.values() if cell)
    # The JSON manifest keeps the prompts exactly as submitted.
    manifest = json.loads(storage.get_bytes(manifest_key(tid, job_id)))
    assert [o["prompt"] for o in manifest["outputs"]] == prompts
