"""DELETE /v1/jobs|models|datasets/{id} against real Postgres and an S3 server: the records and
their stored objects go; what another job or model still needs answers 409; another tenant's id
is a 404; when storage fails the record is gone and its objects are retried, never half."""

from __future__ import annotations

import io
import threading
import zipfile

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from shared import deletion, jobstate
from shared.db import session_scope
from shared.models import Job, JobEvent, JobOutput, JobRow, JobWebhook, Model, StorageDeletion
from shared.storage import get_storage, job_prefix, manifest_key, output_key
from tests.conftest import free_port


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


def sample(client, key, model_id, **extra):
    r = client.post("/v1/jobs/sample", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": "a cat"}],
                                                                **extra})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def finish(settings, job_id, status="succeeded", outputs=True):
    """What a worker leaves: stored images and a manifest, output rows, events, a final state."""
    storage = get_storage(settings)
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        tid = job.tenant_id
        claim = jobstate.claim(s, job_id, "test-worker", 60)
        if outputs:
            key = output_key(tid, job_id, 1, 0)
            storage.put_bytes(key, png())
            storage.put_bytes(manifest_key(tid, job_id), b"{}")
            storage.put_bytes(f"{job_prefix(tid, job_id)}/checkpoints/step-00000001-a1/x.json", b"{}")
            s.add(JobOutput(job_id=job_id, row=1, index=0, seed=1, key=key, width=8, height=8, sha256="0" * 64,
                            attempt=claim.attempt))
        jobstate.emit(s, job_id, "started")
        s.execute(Job.__table__.update().where(Job.id == job_id).values(status=status, finished_at=func.now()))
    return tid


def count(settings, entity, *where):
    with session_scope(settings) as s:
        return s.scalar(select(func.count()).select_from(entity).where(*where))


def test_delete_a_final_job_removes_its_objects_and_rows(client, settings, tiny_model, make_tenant):
    tid, key, model_id = tiny_model
    job_id = sample(client, key, model_id, webhook={"url": "https://example.com/hook"})
    storage = get_storage(settings)
    finish(settings, job_id)
    prefix = job_prefix(tid, job_id) + "/"
    assert len(storage.list(prefix)) == 3

    _, other = make_tenant()
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(other)).status_code == 404
    assert len(storage.list(prefix)) == 3  # another tenant's request touched nothing

    r = client.delete(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 204, r.text
    assert storage.list(prefix) == []
    for entity in (Job, JobRow, JobOutput, JobEvent, JobWebhook):
        col = entity.id if entity is Job else entity.job_id
        assert count(settings, entity, col == job_id) == 0, entity
    assert count(settings, StorageDeletion, StorageDeletion.tenant_id == tid) == 0
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(key)).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(key)).status_code == 404
    assert client.get(f"/v1/models/{model_id}", headers=auth(key)).status_code == 200  # the model stays


def test_a_job_that_has_not_ended_is_409_until_canceled(client, settings, tiny_model):
    _, key, model_id = tiny_model
    job_id = sample(client, key, model_id)
    r = client.delete(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_final"
    with session_scope(settings) as s:
        jobstate.claim(s, job_id, "w", 60)
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(key)).status_code == 409  # running
    finish(settings, job_id, "canceled", outputs=False)
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(key)).status_code == 204


def test_a_model_in_use_is_409_and_its_jobs_keep_their_records(client, settings, tiny_model, make_tenant):
    tid, key, model_id = tiny_model
    storage = get_storage(settings)
    with session_scope(settings) as s:
        prefix = s.get(Model, model_id).key + "/"
    assert storage.list(prefix)

    _, other = make_tenant()
    assert client.delete(f"/v1/models/{model_id}", headers=auth(other)).status_code == 404

    job_id = sample(client, key, model_id)  # queued: samples from it
    r = client.delete(f"/v1/models/{model_id}", headers=auth(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use"
    assert {"id": job_id} in r.json()["error"]["details"]
    finish(settings, job_id)

    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "base_model": model_id,
                                                               "steps": 50})
    assert r.status_code == 202, r.text
    train_id = r.json()["id"]
    assert client.delete(f"/v1/models/{model_id}", headers=auth(key)).status_code == 409  # a base model in use
    finish(settings, train_id, "failed", outputs=False)

    with session_scope(settings) as s:  # a model built on it (a LoRA names its base in config)
        s.add(Model(id="lora" + model_id[4:], tenant_id=tid, name="lora", uri="s3://x/", key=f"{tid}/models/lora",
                    config={"base_model": model_id}))
    r = client.delete(f"/v1/models/{model_id}", headers=auth(key))
    assert r.status_code == 409 and {"id": "lora" + model_id[4:]} in r.json()["error"]["details"]
    assert client.delete(f"/v1/models/lora{model_id[4:]}", headers=auth(key)).status_code == 204

    assert client.delete(f"/v1/models/{model_id}", headers=auth(key)).status_code == 204
    assert storage.list(prefix) == []
    assert client.get(f"/v1/models/{model_id}", headers=auth(key)).status_code == 404
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()  # the record stays, unlinked
    assert job["status"] == "succeeded" and job["model_id"] is None
    assert client.get(f"/v1/jobs/{job_id}/outputs", headers=auth(key)).json()["items"]


def test_a_trained_models_artifacts_go_with_the_model_not_the_job(client, settings, tiny_model, tiny_pipeline_dir):
    from shared.registry import register_pipeline_dir

    tid, key, _ = tiny_model
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 50})
    train_id = r.json()["id"]
    finish(settings, train_id, outputs=False)
    storage = get_storage(settings)
    artifact = f"{job_prefix(tid, train_id)}/eval/loss.png"
    checkpoint = f"{job_prefix(tid, train_id)}/checkpoints/step-00000050-a1/unet.safetensors"
    storage.put_bytes(artifact, png())
    storage.put_bytes(checkpoint, b"x")
    with session_scope(settings) as s:
        m = register_pipeline_dir(s, storage, tid, tiny_pipeline_dir, name="trained", job_id=train_id,
                                  metrics={"artifacts": {"loss.png": artifact}})
        trained, prefix = m.id, m.key + "/"

    assert client.delete(f"/v1/jobs/{train_id}", headers=auth(key)).status_code == 204
    assert storage.list(job_prefix(tid, train_id) + "/") == [artifact]  # the checkpoint went; the model's artifact stays
    assert client.get(f"/v1/models/{trained}", headers=auth(key)).json()["artifact_urls"]["loss.png"]

    assert client.delete(f"/v1/models/{trained}", headers=auth(key)).status_code == 204
    assert storage.list(job_prefix(tid, train_id) + "/") == [] and storage.list(prefix) == []


def make_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("metadata.csv", "file_name,text\na.png,a red square\n")
        z.writestr("a.png", png())
    return buf.getvalue()


def test_a_dataset_in_use_is_409_then_its_archive_goes(client, settings, make_tenant):
    tid, key = make_tenant()
    r = client.post("/v1/datasets", headers=auth(key), files={"file": ("d.zip", make_zip(), "application/zip")})
    ds = r.json()["id"]
    storage = get_storage(settings)
    assert storage.list(f"{tid}/datasets/{ds}/")
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": ds, "steps": 50})
    train_id = r.json()["id"]

    _, other = make_tenant()
    assert client.delete(f"/v1/datasets/{ds}", headers=auth(other)).status_code == 404
    r = client.delete(f"/v1/datasets/{ds}", headers=auth(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_in_use"
    finish(settings, train_id, outputs=False)
    assert client.delete(f"/v1/datasets/{ds}", headers=auth(key)).status_code == 204
    assert storage.list(f"{tid}/datasets/{ds}/") == []
    assert client.get(f"/v1/datasets/{ds}", headers=auth(key)).status_code == 404
    with session_scope(settings) as s:
        assert s.get(Job, train_id).dataset_id is None  # the job's record stays


def test_storage_down_the_record_goes_and_the_objects_are_retried(settings, tiny_model):
    """Guarantee: the record and its outbox entry commit together; objects go after the commit.
    With storage down the DELETE still removes the record (204), the objects stay listed in
    ``storage_deletions``, and the sweeper's purge removes them once storage answers."""
    from api.app import create_app

    tid, key, model_id = tiny_model
    down = settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}", "storage_retry_s": 0})
    with TestClient(create_app(down)) as bad:
        job_id = sample(bad, key, model_id)
        finish(settings, job_id)
        prefix = job_prefix(tid, job_id) + "/"
        storage = get_storage(settings)
        assert len(storage.list(prefix)) == 3
        r = bad.delete(f"/v1/jobs/{job_id}", headers=auth(key))
        assert r.status_code == 204, r.text
    assert count(settings, Job, Job.id == job_id) == 0
    assert len(storage.list(prefix)) == 3  # nothing deleted yet, and nothing half: the outbox holds it
    with session_scope(settings) as s:
        pending = s.scalars(select(StorageDeletion).where(StorageDeletion.path == prefix)).one()
        assert pending.attempts == 1 and "Unavailable" in pending.last_error
    deletion.purge_pending(settings, storage)
    assert storage.list(prefix) == []
    assert count(settings, StorageDeletion, StorageDeletion.path == prefix) == 0


def test_a_failed_transaction_deletes_nothing(settings, tiny_model):
    tid, _, model_id = tiny_model
    storage = get_storage(settings)
    with session_scope(settings) as s:
        prefix = s.get(Model, model_id).key + "/"
    try:
        with session_scope(settings) as s:
            deletion.delete_model(s, model_id, tid)
            raise RuntimeError("the request failed after the delete")
    except RuntimeError:
        pass
    assert count(settings, Model, Model.id == model_id) == 1
    assert count(settings, StorageDeletion, StorageDeletion.path == prefix) == 0
    assert storage.list(prefix)


def test_delete_racing_a_train_submit_on_the_base_model(client, settings, tiny_model):
    """Whatever the order: a train job that was accepted has its base model; a deleted model has no
    queued job that needs it."""
    tid, key, _ = tiny_model
    for round_ in range(4):
        with session_scope(settings) as s:
            base = s.scalars(select(Model).where(Model.tenant_id == tid)).first()
            m = Model(tenant_id=tid, name="b", uri=base.uri, key=f"{tid}/models/none-{round_}", config={})
            s.add(m)
            s.flush()
            mid = m.id
        results = {}
        barrier = threading.Barrier(2)

        def submit():
            barrier.wait()
            results["submit"] = client.post("/v1/jobs/train", headers=auth(key), json={
                "dataset": "builtin:digits", "base_model": mid, "steps": 50}).status_code

        def remove():
            barrier.wait()
            results["delete"] = client.delete(f"/v1/models/{mid}", headers=auth(key)).status_code

        threads = [threading.Thread(target=submit), threading.Thread(target=remove)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) in ([202, 409], [204, 404]), results
        if results["submit"] == 202:
            assert count(settings, Model, Model.id == mid) == 1
        # Leave nothing queued for the next round.
        with session_scope(settings) as s:
            s.execute(Job.__table__.update().where(Job.tenant_id == tid, Job.status == "queued")
                      .values(status="canceled"))


def test_a_delete_waits_for_a_train_submit_holding_its_base_model(settings, tiny_model):
    """Deterministic form of the race: the submit's share lock on the base model makes the delete
    wait, and once the submit commits the delete sees the new job and refuses."""
    from api.services.jobs import create_train_job
    from shared.security import TenantRef
    from shared.train_schema import TrainParams

    tid, _, model_id = tiny_model
    tenant = TenantRef(id=tid, name="t")
    outcome = {}
    with session_scope(settings) as submit:
        job = create_train_job(submit, settings, tenant, TrainParams(dataset="builtin:digits", base_model=model_id,
                                                                     steps=50)).job

        def remove():
            try:
                with session_scope(settings) as s:
                    deletion.delete_model(s, model_id, tid)
                outcome["deleted"] = True
            except deletion.InUse as exc:
                outcome["in_use"] = exc.users

        t = threading.Thread(target=remove)
        t.start()
        t.join(1.0)
        assert t.is_alive()  # blocked on the submit's lock
    t.join(10)
    assert outcome == {"in_use": [job.id]}
