"""What a worker loads is checked where it is loaded: a base model whose stored folder gained code
after it was registered (or a model stored before the checks existed) is refused, not imported."""

from __future__ import annotations

import os

from shared.db import session_scope
from shared.models import Job, Model
from shared.storage import get_storage

MARKER = "/tmp/ldmq-custom-component-was-imported"


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_a_base_model_with_code_is_refused_on_the_worker(client, settings, tiny_model):
    from worker.jobs.train import run_train
    from worker.runtime.run import run_job

    if os.path.exists(MARKER):
        os.remove(MARKER)
    tid, key, model_id = tiny_model
    storage = get_storage(settings)
    with session_scope(settings) as s:
        prefix = s.get(Model, model_id).key
    # Tampered with in the bucket, after registration: a custom component that would run on import.
    storage.put_bytes(f"{prefix}/unet/evil.py", f"open({MARKER!r}, 'w')\n".encode())
    r = client.post("/v1/jobs/train", headers=auth(key), json={
        "dataset": "builtin:digits", "base_model": model_id, "steps": 2, "resolution": 32, "checkpoint_every": 50})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert run_job(settings, job_id, "train", lambda run: run_train(settings, run)) == "failed"
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
    assert job.error["code"] == "unsafe_model" and "code files are refused" in job.error["message"], job.error
    assert prefix not in job.error["message"]
    assert not os.path.exists(MARKER)
