"""Sample jobs with ``output_format: webdataset`` run in-process against real Postgres and S3: the
shards read back with ``webdataset``, hold what the manifest lists, and a retry rebuilds only the
shards not recorded, keeping one an earlier attempt stored."""

import hashlib
import io
import json
import tarfile
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import delete, update

from shared import jobstate
from shared.db import session_scope
from shared.models import Job, JobOutput, JobShard, utcnow
from shared.storage import get_storage, sample_key, shard_key
from worker.jobs.shards import plan_shards
from tests.worker.test_sampling import run, submit

SHARD = 3


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"wds_shard_images": SHARD})


PROMPTS = [{"prompt": "a cat", "seed": 3, "num_images": 2}, {"prompt": "a dog", "seed": 9, "num_images": 3},
           {"prompt": "a boat", "seed": 11, "num_images": 2}]  # 7 images: shards of 3, 3, 1


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def recorded(settings, job_id):
    with session_scope(settings) as s:
        shards = [(sh.shard, sh.key, sh.sha256, sh.bytes, sh.images, sh.attempt) for sh in jobstate.shards_of(s, job_id)]
        outs = [(o.row, o.index, o.key, o.sha256, o.attempt) for o in
                s.query(JobOutput).filter_by(job_id=job_id).order_by(JobOutput.row, JobOutput.index)]
    return shards, outs


def test_shards_hold_every_image_once_and_read_back_with_webdataset(client, settings, tiny_model, tmp_path):
    import webdataset as wds

    tid, key, model_id = tiny_model
    job_id = submit(client, key, model_id, PROMPTS, output_format="webdataset")
    assert run(settings, job_id) == "succeeded"
    st = get_storage(settings)
    shards, outs = recorded(settings, job_id)
    assert [(n, k, images) for n, k, _, _, images, _ in shards] == [(n, shard_key(tid, job_id, n), c)
                                                                    for n, c in ((0, 3), (1, 3), (2, 1))]
    assert st.list(f"{tid}/jobs/{job_id}/rows/") == []  # no loose PNGs
    assert st.list(f"{tid}/jobs/{job_id}/shards/") == [k for _, k, *_ in shards]
    assert sorted((r, i) for r, i, *_ in outs) == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1)]
    by_key = {k: (digest, size) for _, k, digest, size, *_ in shards}
    samples = {}
    for k, (digest, size) in by_key.items():
        data = st.get_bytes(k)
        assert hashlib.sha256(data).hexdigest() == digest and len(data) == size
        (tmp_path / k.rsplit("/", 1)[1]).write_bytes(data)
    # webdataset groups <key>.png and <key>.json into one sample
    for sample in wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shardshuffle=False):
        samples[sample["__key__"]] = sample
    assert sorted(samples) == sorted(sample_key(r, i) for r, i, *_ in outs)
    for r, i, k, sha, _ in outs:
        s = samples[sample_key(r, i)]
        params = json.loads(s["json"])
        assert hashlib.sha256(s["png"]).hexdigest() == sha == params["sha256"]
        assert params["key"] == k and params["member"] == f"{sample_key(r, i)}.png"
        assert (params["row"], params["index"], params["job_id"]) == (r, i, job_id)
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (32, 32)
        chunk = json.loads(img.text["ldmq"])  # the PNG says how to make it again, as the JSON does
        assert chunk == {k2: v for k2, v in params.items() if k2 not in ("key", "member", "sha256")}
    # The same seeds as PNGs: the same pixels.
    png_job = submit(client, key, model_id, PROMPTS)
    assert run(settings, png_job) == "succeeded"
    _, png_outs = recorded(settings, png_job)
    for (r, i, k, *_), (r2, i2, *_rest) in zip(png_outs, outs):
        assert (r, i) == (r2, i2)
        a = np.asarray(Image.open(io.BytesIO(st.get_bytes(k))))
        b = np.asarray(Image.open(io.BytesIO(samples[sample_key(r, i)]["png"])))
        assert (a == b).all()


def test_manifest_and_outputs_list_the_shards(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    job_id = submit(client, key, model_id, PROMPTS, output_format="webdataset")
    assert run(settings, job_id) == "succeeded"
    shards, outs = recorded(settings, job_id)
    st = get_storage(settings)
    manifest = json.loads(st.get_bytes(f"{tid}/jobs/{job_id}/manifest.json"))
    assert manifest["output_format"] == "webdataset"
    assert [(s["key"], s["sha256"], s["bytes"], s["images"]) for s in manifest["shards"]] == \
        [(k, d, b, n) for _, k, d, b, n, _ in shards]
    assert [(e["row"], e["index"], e["key"], e["sha256"], e["member"]) for e in manifest["outputs"]] == \
        [(r, i, k, d, f"{sample_key(r, i)}.png") for r, i, k, d, _ in outs]
    rows = st.get_bytes(f"{tid}/jobs/{job_id}/manifest.csv").decode().splitlines()
    assert rows[0].split(",")[-1] == "member" and len(rows) == 8
    assert all(shard_key(tid, job_id, 0) in line or shard_key(tid, job_id, 1) in line or
               shard_key(tid, job_id, 2) in line for line in rows[1:])
    body = client.get(f"/v1/jobs/{job_id}/outputs", headers={"Authorization": f"Bearer {key}"}).json()
    assert body["output_format"] == "webdataset"
    assert [(s["key"], s["sha256"], s["images"]) for s in body["shards"]] == [(k, d, n) for _, k, d, _, n, _ in shards]
    assert all(s["url"] for s in body["shards"])
    assert [(o["key"], o["member"]) for o in body["items"]] == [(k, f"{sample_key(r, i)}.png") for r, i, k, *_ in outs]


def test_a_retry_rebuilds_only_the_shards_not_recorded_and_keeps_a_stored_one(client, settings, tiny_model):
    """Attempt 1 recorded shard 0, stored shard 1 but died before recording it, never made shard 2.
    Attempt 2 makes the images of shards 1 and 2 only; shard 1's stored object is kept (its own
    checksums recorded, a GPU may round differently) and shard 2 is built; every image once."""
    tid, key, model_id = tiny_model
    job_id = submit(client, key, model_id, PROMPTS, output_format="webdataset")
    assert run(settings, job_id) == "succeeded"
    st = get_storage(settings)
    first_shards, first_outs = recorded(settings, job_id)
    # Shard 1 as the dead attempt stored it: the same members, other pixels (another GPU's rounding).
    k1, k2 = shard_key(tid, job_id, 1), shard_key(tid, job_id, 2)
    earlier = io.BytesIO()
    with tarfile.open(fileobj=earlier, mode="w") as tar:
        for name, data in sorted(members(st.get_bytes(k1)).items()):
            if name.endswith(".png"):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
                data = buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    st.delete(k1)
    st.put_bytes(k1, earlier.getvalue(), content_type="application/x-tar")
    st.delete(k2)
    with session_scope(settings) as s:  # back to "attempt 1 died after recording shard 0"
        s.execute(delete(JobShard).where(JobShard.job_id == job_id, JobShard.shard > 0))
        s.execute(delete(JobOutput).where(JobOutput.job_id == job_id, JobOutput.key != shard_key(tid, job_id, 0)))
        s.execute(update(Job).where(Job.id == job_id).values(status="running", outputs_count=3, finished_at=None,
                                                             lease_expires_at=utcnow() - timedelta(seconds=5)))
    assert run(settings, job_id) == "succeeded"
    shards, outs = recorded(settings, job_id)
    assert [(n, a) for n, *_, a in shards] == [(0, 1), (1, 2), (2, 2)]
    assert shards[0] == first_shards[0]  # untouched
    assert shards[1][2] == hashlib.sha256(earlier.getvalue()).hexdigest()  # kept, not clobbered
    assert st.get_bytes(k1) == earlier.getvalue()
    stored = {n: hashlib.sha256(d).hexdigest() for n, d in members(earlier.getvalue()).items()}
    assert sorted((r, i) for r, i, *_ in outs) == sorted((r, i) for r, i, *_ in first_outs)  # each once
    for r, i, k, sha, attempt in outs:
        if k == k1:
            assert sha == stored[f"{sample_key(r, i)}.png"] and attempt == 2
        elif k == k2:
            assert attempt == 2 and sha == hashlib.sha256(members(st.get_bytes(k2))[f"{sample_key(r, i)}.png"]).hexdigest()
        else:
            assert attempt == 1
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        assert job.outputs_count == 7 and job.attempts == 2
    assert st.list(f"{tid}/jobs/{job_id}/shards/") == [k for _, k, *_ in shards]


class _Row:
    def __init__(self, row, num_images, steps=None):
        self.row, self.num_images, self.steps, self.guidance_scale = row, num_images, steps, None


def test_a_spread_job_makes_each_shard_once_whichever_piece_makes_it(client, settings, tiny_model):
    """A WebDataset job bigger than a piece is cut at shard boundaries (shared.pieces): each piece
    makes whole shards, stored and recorded under the job whatever order the pieces run in, and the
    images are those the job makes run whole. The dog row has its own steps, so it is made first
    and shard order is not row order: shard 0 is the dog's three images, shard 1 the cat's two and
    the boat's first, shard 2 the boat's second (a piece cut by row order would make other images)."""
    tid, key, model_id = tiny_model
    prompts = [{**p, "steps": 1} if p["prompt"] == "a dog" else p for p in PROMPTS]
    whole = submit(client, key, model_id, prompts, output_format="webdataset")
    assert run(settings, whole) == "succeeded"
    spread_settings = settings.model_copy(update={"sample_piece_images": SHARD})
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(spread_settings)) as c:
        job_id = submit(c, key, model_id, prompts, output_format="webdataset")
    with session_scope(settings) as s:
        parts = [(p.id, p.item_start, p.item_end) for p in
                 s.query(Job).filter_by(parent_id=job_id).order_by(Job.item_start)]
    assert [(a, b) for _, a, b in parts] == [(0, 3), (3, 6), (6, 7)]  # shards of 3, 3 and 1
    made: list[int] = []
    for piece_id, start, _ in reversed(parts):  # the last piece first: shards are not made in order
        assert run(spread_settings, piece_id) == "succeeded"
        made = sorted(made + [start // SHARD])
        assert [n for n, *_ in recorded(settings, job_id)[0]] == made  # its own shard, and only it
    assert run(spread_settings, parts[0][0]) == "skipped"  # a piece ends once
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.outputs_count, job.progress) == ("succeeded", 7, 1.0)
        assert s.query(JobShard).filter(JobShard.job_id.in_([p for p, *_ in parts])).count() == 0
    shards, outs = recorded(settings, job_id)
    assert [(n, k, images) for n, k, _, _, images, _ in shards] == [(n, shard_key(tid, job_id, n), c)
                                                                    for n, c in ((0, 3), (1, 3), (2, 1))]
    st = get_storage(settings)
    assert st.list(f"{tid}/jobs/{job_id}/shards/") == [k for _, k, *_ in shards]
    assert sorted(m for m in members(st.get_bytes(shards[0][1])) if m.endswith(".png")) == \
        [f"{sample_key(2, i)}.png" for i in range(3)]
    # The same images as the job run whole (same rows and seeds), shard for shard: the same members
    # and pixels (the PNGs' text names their own job, so their bytes differ).
    whole_shards, whole_outs = recorded(settings, whole)
    assert [(r, i) for r, i, *_ in outs] == [(r, i) for r, i, *_ in whole_outs]
    for (n, k, *_), (_, wk, *_) in zip(shards, whole_shards):
        mine, theirs = members(st.get_bytes(k)), members(st.get_bytes(wk))
        assert sorted(mine) == sorted(theirs)
        for m in (m for m in mine if m.endswith(".png")):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(mine[m]))),
                                  np.asarray(Image.open(io.BytesIO(theirs[m])))), (n, m)


def test_shard_plan_follows_the_order_images_are_made_in():
    """Rows with their own steps are made in their own batches; a shard takes images in that order,
    so the writer holds one unfinished shard per job at a time."""
    params = {"shard_images": 2, "steps": 10, "guidance_scale": 5.0}
    plan = plan_shards(params, [_Row(1, 2), _Row(2, 1, steps=4), _Row(3, 2)])
    assert plan == {(2, 0): (0, 2), (1, 0): (0, 2), (1, 1): (1, 2), (3, 0): (1, 2), (3, 1): (2, 1)}
