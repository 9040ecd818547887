"""``output_format`` validation and ``GET /v1/jobs/{id}/archive`` against the real app, Postgres
and the S3 server: the archive is a valid tar, byte-identical to the stored objects, streamed with
bounded memory, and another tenant's job is a 404."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tracemalloc

import pytest

from shared import jobstate
from shared.db import session_scope
from shared.models import Job, JobStatus
from shared.storage import get_storage, manifest_key, output_key, shard_key

CSV = b"prompt,seed\na cat,1\na dog,2\n"


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def count_jobs(settings) -> int:
    with session_scope(settings) as s:
        return s.query(Job).count()


def test_unknown_output_format_is_a_422_listing_the_valid_ones(client, settings, tiny_model):
    _, key, model_id = tiny_model
    before = count_jobs(settings)
    r = client.post("/v1/jobs/sample", headers=auth(key),
                    json={"model": model_id, "prompts": [{"prompt": "a"}], "output_format": "tiff"})
    assert r.status_code == 422, r.text
    text = json.dumps(r.json()["error"])
    assert "output_format" in text and "'png'" in text and "'webdataset'" in text
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), files={"file": ("p.csv", CSV, "text/csv")},
                    data={"model": model_id, "output_format": "zip"})
    assert r.status_code == 422, r.text
    text = json.dumps(r.json()["error"])
    assert "output_format" in text and "'png'" in text and "'webdataset'" in text
    assert count_jobs(settings) == before  # nothing stored


def test_output_format_is_kept_with_the_shard_size(client, settings, tiny_model):
    _, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample/csv", headers=auth(key), files={"file": ("p.csv", CSV, "text/csv")},
                    data={"model": model_id, "output_format": "webdataset"})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["output_format"] == "webdataset"
    assert r.json()["params"]["shard_images"] == settings.wds_shard_images
    r = client.post("/v1/jobs/sample", headers=auth(key), json={"model": model_id, "prompts": [{"prompt": "a"}]})
    assert r.json()["params"]["output_format"] == "png" and "shard_images" not in r.json()["params"]


def play_worker(settings, tenant_id, job_id, objects: dict[tuple[int, int], bytes], *, shards=None, finish=True):
    """Store and record the job's outputs as the worker would (PNG keys, or one shard holding all),
    write a manifest, and succeed the job."""
    storage = get_storage(settings)
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "w", 30)
    records = []
    for (row, index), data in objects.items():
        key = shard_key(tenant_id, job_id, 0) if shards else output_key(tenant_id, job_id, row, index)
        digest = storage.put_bytes(key, data) if not shards else hashlib.sha256(data).hexdigest()
        records.append(dict(row=row, index=index, seed=row, key=key, width=8, height=8, sha256=digest))
    with session_scope(settings) as s:
        if shards:
            digest = storage.put_bytes(shard_key(tenant_id, job_id, 0), shards)
            jobstate.record_shard(s, job_id, claim.attempt, shard=0, key=shard_key(tenant_id, job_id, 0),
                                  sha256=digest, size=len(shards), records=records)
        else:
            jobstate.record_outputs(s, job_id, claim.attempt, records)
    if finish:
        storage.put_bytes(manifest_key(tenant_id, job_id), json.dumps({"job_id": job_id}).encode())
        storage.put_bytes(manifest_key(tenant_id, job_id).replace(".json", ".csv"), b"row,index\n")
        with session_scope(settings) as s:
            jobstate.finish(s, job_id, claim.attempt, JobStatus.succeeded)


def sample_job(client, key, model_id, n, **kw) -> str:
    r = client.post("/v1/jobs/sample", headers=auth(key),
                    json={"model": model_id, "prompts": [{"prompt": f"p{i}"} for i in range(n)], **kw})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:  # raises on a truncated archive
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_archive_is_every_output_and_the_manifest_byte_for_byte(client, settings, tiny_model, make_tenant):
    tid, key, model_id = tiny_model
    job_id = sample_job(client, key, model_id, 3)
    objects = {(r, 0): bytes([r]) * (1000 * r + 7) for r in (1, 2, 3)}  # sizes off the 512-byte blocks
    play_worker(settings, tid, job_id, objects)
    r = client.get(f"/v1/jobs/{job_id}/archive", headers=auth(key))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar"
    assert f'filename="{job_id}.tar"' in r.headers["content-disposition"]
    got = untar(r.content)
    st = get_storage(settings)
    prefix = f"{tid}/jobs/{job_id}/"
    keys = [output_key(tid, job_id, row, 0) for row in (1, 2, 3)] + [prefix + "manifest.json", prefix + "manifest.csv"]
    assert list(got) == [f"{job_id}/{k[len(prefix):]}" for k in keys]
    for k in keys:
        assert got[f"{job_id}/{k[len(prefix):]}"] == st.get_bytes(k)
    # Another tenant: 404, as for every other route of a job.
    _, other = make_tenant()
    r = client.get(f"/v1/jobs/{job_id}/archive", headers=auth(other))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_archive_of_a_webdataset_job_holds_its_shards(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    job_id = sample_job(client, key, model_id, 2, output_format="webdataset")
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for name in ("000001-000.png", "000002-000.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"png"))
    play_worker(settings, tid, job_id, {(1, 0): b"png", (2, 0): b"png"}, shards=shard.getvalue())
    got = untar(client.get(f"/v1/jobs/{job_id}/archive", headers=auth(key)).content)
    assert list(got) == [f"{job_id}/shards/000000.tar", f"{job_id}/manifest.json", f"{job_id}/manifest.csv"]
    assert got[f"{job_id}/shards/000000.tar"] == shard.getvalue()


def test_archive_of_a_running_job_has_what_is_recorded_and_a_train_job_has_none(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    job_id = sample_job(client, key, model_id, 2)
    play_worker(settings, tid, job_id, {(1, 0): b"one"}, finish=False)
    got = untar(client.get(f"/v1/jobs/{job_id}/archive", headers=auth(key)).content)
    assert got == {f"{job_id}/rows/000001/000.png": b"one"}  # no manifest yet
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 5})
    r = client.get(f"/v1/jobs/{r.json()['id']}/archive", headers=auth(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_a_sample_job"


def test_archive_streams_with_bounded_memory(client, settings, tiny_model):
    """40 MiB of objects through the archive stream from the S3 server: the peak of Python's
    allocations stays at a few chunks (the stream is consumed as a client would, not kept)."""
    from api.services.archive import CHUNK_BYTES, archive_entries, tar_stream
    from shared.security import TenantRef

    tid, key, model_id = tiny_model
    job_id = sample_job(client, key, model_id, 4)
    big = 10 * 2**20
    objects = {(r, 0): hashlib.sha256(bytes([r])).digest() * (big // 32) for r in (1, 2, 3, 4)}
    play_worker(settings, tid, job_id, objects)
    storage = get_storage(settings)
    with session_scope(settings) as s:
        entries = archive_entries(s, storage, TenantRef(id=tid, name="t"), job_id)
    stored = {name: hashlib.sha256(storage.get_bytes(k)).hexdigest() for name, k in entries}
    del objects
    total, h = 0, hashlib.sha256()
    tracemalloc.start()
    try:
        for chunk in tar_stream(storage, entries):
            total += len(chunk)
            h.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 4 * big
    assert peak < 16 * CHUNK_BYTES, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.0f} MiB archive"
    # And the same stream, kept whole this time, is a tar of exactly the stored bytes.
    data = b"".join(tar_stream(storage, entries))
    assert hashlib.sha256(data).hexdigest() == h.hexdigest()
    assert {n: hashlib.sha256(b).hexdigest() for n, b in untar(data).items()} == stored


def test_an_object_lost_midway_cuts_the_stream_before_the_end_blocks(client, settings, tiny_model):
    from api.services.archive import archive_entries, tar_stream
    from shared.security import TenantRef
    from shared.storage import ObjectNotFound

    tid, key, model_id = tiny_model
    job_id = sample_job(client, key, model_id, 2)
    play_worker(settings, tid, job_id, {(1, 0): b"one", (2, 0): b"two"})
    storage = get_storage(settings)
    with session_scope(settings) as s:
        entries = archive_entries(s, storage, TenantRef(id=tid, name="t"), job_id)
    storage.delete(output_key(tid, job_id, 2, 0))
    got = []
    with pytest.raises(ObjectNotFound):
        for chunk in tar_stream(storage, entries):
            got.append(chunk)
    assert got and not b"".join(got).endswith(b"\0" * 1024)
