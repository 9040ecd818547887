"""Sample jobs run in-process against real Postgres and S3: outputs, determinism, resume."""

import io

import pytest
from PIL import Image

from shared.catalog import SCHEDULERS
from shared.db import session_scope
from shared.models import Job, JobOutput
from shared.storage import get_storage
from worker.runtime.run import run_job
from worker.jobs.sample import run_sample


def submit(client, key, model_id, prompts, **kw):
    r = client.post("/v1/jobs/sample", headers={"Authorization": f"Bearer {key}"},
                    json={"model": model_id, "prompts": prompts, "steps": 2, "scheduler": "ddim", **kw})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def run(settings, job_id):
    return run_job(settings, job_id, "sample", lambda r: run_sample(settings, r))


def pixels(settings, key):
    """An output's decoded pixels (its PNG bytes also hold the job's own id and parameters)."""
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(get_storage(settings).get_bytes(key)))).tobytes()


def outputs(settings, job_id):
    with session_scope(settings) as s:
        return [(o.row, o.index, o.seed, o.key, o.sha256) for o in
                s.query(JobOutput).filter_by(job_id=job_id).order_by(JobOutput.row, JobOutput.index)]


def test_sample_job_end_to_end_in_process(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    job_id = submit(client, key, model_id, [{"prompt": "a cat", "seed": 3, "num_images": 2}, {"prompt": "a dog", "seed": 9}])
    assert run(settings, job_id) == "succeeded"
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        assert job.status == "succeeded" and job.progress == 1.0 and job.outputs_count == 3 and job.attempts == 1
    outs = outputs(settings, job_id)
    assert [(r, i, seed) for r, i, seed, *_ in outs] == [(1, 0, 3), (1, 1, 4), (2, 0, 9)]
    st = get_storage(settings)
    for _, _, _, key_, _ in outs:
        assert key_.startswith(f"{tid}/jobs/{job_id}/rows/")
        img = Image.open(io.BytesIO(st.get_bytes(key_)))
        assert img.format == "PNG" and img.size == (32, 32)
    # The same row and seed in another job give the same pixels.
    job2 = submit(client, key, model_id, [{"prompt": "a cat", "seed": 3}])
    assert run(settings, job2) == "succeeded"
    assert pixels(settings, outputs(settings, job2)[0][3]) == pixels(settings, outs[0][3])
    # A second delivery of the same message does nothing.
    assert run(settings, job_id) == "skipped"
    assert len(outputs(settings, job_id)) == 3
    r = client.get(f"/v1/jobs/{job_id}/outputs", headers={"Authorization": f"Bearer {key}"}).json()
    assert len(r["items"]) == 3 and r["manifest_url"]


def test_resume_skips_rows_already_recorded(client, settings, tiny_model):
    """A run that dies after some rows: the next attempt makes only the rest, none twice."""
    from datetime import timedelta

    from shared import jobstate
    from shared.models import utcnow

    _, key, model_id = tiny_model
    job_id = submit(client, key, model_id, [{"prompt": f"p{i}", "seed": i} for i in range(3)])
    with session_scope(settings) as s:
        c = jobstate.claim(s, job_id, "dead-worker", 1)
        jobstate.record_output(s, job_id, c.attempt, row=1, index=0, seed=0, key="x", width=32, height=32, sha256="0" * 64)
        s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=5)
    assert run(settings, job_id) == "succeeded"
    outs = outputs(settings, job_id)
    assert [(r, i) for r, i, *_ in outs] == [(1, 0), (2, 0), (3, 0)]
    assert outs[0][3] == "x"  # the first attempt's row was kept, not redone
    with session_scope(settings) as s:
        assert s.get(Job, job_id).attempts == 2


def test_an_earlier_attempts_object_is_kept_not_clobbered(client, settings, tiny_model):
    """An attempt that uploaded a PNG and died before recording it (or a stale run still
    uploading): the next run's create-only write keeps that object and records its checksum, so
    the record always matches the bytes stored (a different GPU may round pixels differently)."""
    import hashlib

    from shared.storage import output_key

    tid, key, model_id = tiny_model
    job_id = submit(client, key, model_id, [{"prompt": "a cat", "seed": 5}, {"prompt": "a dog", "seed": 6}])
    st = get_storage(settings)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    earlier = buf.getvalue()
    st.put_bytes(output_key(tid, job_id, 1, 0), earlier, content_type="image/png")
    assert run(settings, job_id) == "succeeded"
    outs = outputs(settings, job_id)
    assert outs[0][4] == hashlib.sha256(earlier).hexdigest()
    assert st.get_bytes(outs[0][3]) == earlier  # get_bytes verifies the stored checksum
    assert outs[1][4] == hashlib.sha256(st.get_bytes(outs[1][3])).hexdigest()


def test_cancel_requested_stops_between_steps(client, settings, tiny_model):
    from shared import jobstate

    _, key, model_id = tiny_model
    job_id = submit(client, key, model_id, [{"prompt": "p", "seed": 1}])
    with session_scope(settings) as s:
        s.get(Job, job_id)  # queued
    calls = []

    def work(run):
        with session_scope(settings) as s:
            jobstate.request_cancel(s, job_id)
        calls.append(1)
        run.poll_cancel()

    assert run_job(settings, job_id, "sample", work) == "canceled"
    with session_scope(settings) as s:
        assert s.get(Job, job_id).status == "canceled"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_each_scheduler_runs(client, settings, tiny_model, scheduler):
    _, key, model_id = tiny_model
    job_id = submit(client, key, model_id, [{"prompt": "p", "seed": 1}], scheduler=scheduler)
    assert run(settings, job_id) == "succeeded"
    [(_, _, _, key_, _)] = outputs(settings, job_id)
    assert Image.open(io.BytesIO(get_storage(settings).get_bytes(key_))).size == (32, 32)
    with session_scope(settings) as s:
        assert s.get(Job, job_id).params["scheduler"] == scheduler


@pytest.mark.parametrize("scheduler", ["dpm-solver++", "langevin-pc", "ddpm"])  # ddpm: Algorithm 2's own loop
def test_batched_images_are_bit_identical_to_single(tiny_pipeline_dir, scheduler):
    """Padding every batch to one fixed size makes an image independent of its batch-mates (the
    corrector's step size and noise are per image too; Algorithm 2 draws its noise per image)."""
    from worker.model.pipelines import load_pipeline_dir
    from worker.model.schedulers import make_scheduler
    from worker.runtime.outputs import png_bytes, to_uint8
    from worker.model.sampling import EmbeddingCache, Item, generate

    pipe = load_pipeline_dir(tiny_pipeline_dir)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    emb = EmbeddingCache(pipe, "cpu")
    items = [Item(r, 0, 1000 + r, f"prompt {r % 3}", "", 4.0, 3) for r in range(6)]
    batched = generate(pipe, items, batch_size=8, width=32, height=32, device="cpu", embeddings=emb)
    for k in (0, 3, 5):
        alone = generate(pipe, [items[k]], batch_size=8, width=32, height=32, device="cpu", embeddings=emb)
        assert png_bytes(to_uint8(alone)[0]) == png_bytes(to_uint8(batched)[k])
        assert (alone[0] == batched[k]).all()
    assert emb.misses == 4 and emb.hits > 0  # 3 prompts + the empty negative prompt, encoded once each


def test_queued_jobs_of_the_same_model_share_batches(client, settings, tiny_model):
    """Cross-job micro-batching: one run packs three small jobs into one model batch, finishes all
    three, and every image is the same as when its job ran alone."""
    from shared.models import JobEvent

    _, key, model_id = tiny_model
    packed = settings.model_copy(update={"sample_batch_size": 8, "cobatch_max_items": 8})
    ids = [submit(client, key, model_id, [{"prompt": f"job {j} row {r}", "seed": 10 * j + r} for r in range(2)])
           for j in range(3)]
    result = {}

    def work(r):
        result.update(run_sample(packed, r))
        return result

    assert run_job(packed, ids[0], "sample", work) == "succeeded"
    assert result["batches"] == 1 and sorted(result["packed_jobs"]) == sorted(ids[1:])
    with session_scope(settings) as s:
        for jid in ids:
            job = s.get(Job, jid)
            assert job.status == "succeeded" and job.outputs_count == 2 and job.attempts == 1
            assert job.charge_share == pytest.approx(1 / 3)  # one batch run, charged once: 2 of 6 images each
            types = [e.type for e in s.query(JobEvent).filter_by(job_id=jid)]
            assert types.count("succeeded") == 1
    # The packed jobs' own messages arrive later and do nothing.
    assert run(packed, ids[1]) == "skipped"
    # Alone, job 2's images are bit-identical to what the packed run made.
    alone = submit(client, key, model_id, [{"prompt": f"job 2 row {r}", "seed": 20 + r} for r in range(2)])
    solo = settings.model_copy(update={"sample_batch_size": 8, "cobatch_max_items": 0})
    assert run(solo, alone) == "succeeded"
    assert ([pixels(settings, o[3]) for o in outputs(settings, alone)]
            == [pixels(settings, o[3]) for o in outputs(settings, ids[2])])


def test_model_streams_change_no_pixel_and_keep_the_order(client, settings, tiny_model):
    """Two batches computed side by side (each with its own scheduler) give the same images, under
    the same keys, as one stream; progress still counts up to the end."""
    _, key, model_id = tiny_model
    prompts = [{"prompt": f"stream row {r}", "seed": 50 + r} for r in range(10)]
    shas = {}
    for n in (1, 2):
        cfg = settings.model_copy(update={"sample_batch_size": 4, "sample_streams": n, "worker_threads": 1})
        job_id = submit(client, key, model_id, prompts)
        result = {}
        assert run_job(cfg, job_id, "sample", lambda r, cfg=cfg: result.update(run_sample(cfg, r)) or result) == "succeeded"
        assert result["streams"] == n and result["batches"] == 3
        with session_scope(settings) as s:
            assert s.get(Job, job_id).progress == 1.0
        shas[n] = [(o[0], o[1], pixels(settings, o[3])) for o in outputs(settings, job_id)]
    assert len(shas[2]) == 10 and shas[2] == shas[1]


def test_plan_streams():
    from shared.settings import Settings
    from worker.jobs.sample import plan_streams

    assert plan_streams(Settings(sample_streams=3, worker_threads=2), "cpu") == (3, 2)
    streams, threads = plan_streams(Settings(), "cpu")
    assert streams >= 1 and threads >= 1
    assert plan_streams(Settings(), "cuda")[0] == 1


def test_fit_batch_fills_the_free_memory_it_is_given():
    from worker.model.sampling import AUTO_BATCH_CAP, fit_batch

    mib = 2**20
    assert fit_batch(1024 * mib, 100 * mib) == 8  # 80 % of 1 GiB / 100 MiB
    assert fit_batch(1024 * mib, 100 * mib, streams=2) == 4
    assert fit_batch(80 * 1024 * mib, 100 * mib) == AUTO_BATCH_CAP
    assert fit_batch(50 * mib, 100 * mib) == 1  # never 0: one image is tried, and fails clearly if it cannot fit
    assert fit_batch(1024 * mib, 0) == AUTO_BATCH_CAP


def test_auto_batch_size_on_cpu_runs_and_is_fixed_per_worker(client, settings, tiny_model):
    from worker.model import sampling

    _, key, model_id = tiny_model
    auto = settings.model_copy(update={"sample_batch_size": 0})
    job_id = submit(client, key, model_id, [{"prompt": f"auto {r}", "seed": r} for r in range(3)])
    result = {}
    assert run_job(auto, job_id, "sample", lambda r: result.update(run_sample(auto, r)) or result) == "succeeded"
    assert result["batches"] == 1 and len(outputs(settings, job_id)) == 3
    sizes = {k: v for k, v in sampling._AUTO_SIZES.items() if k[0] == model_id}
    assert list(sizes.values()) == [sampling.CPU_AUTO_BATCH]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_auto_batch_size_on_cuda_is_measured(tiny_pipeline_dir):
    import torch

    from worker.model.pipelines import load_pipeline_dir
    from worker.model.schedulers import make_scheduler
    from worker.model.sampling import EmbeddingCache, Item, auto_batch_size, generate

    pipe = load_pipeline_dir(tiny_pipeline_dir, "cuda")
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    emb = EmbeddingCache(pipe, "cuda")
    probed = []

    def probe(n):
        probed.append(n)
        generate(pipe, [Item(1, 0, 1, "p", "", 3.0, 1)], batch_size=n, width=32, height=32, device="cuda",
                 embeddings=emb)

    size = auto_batch_size("cuda", ("tiny", 32, 32, 1), probe)
    assert probed == [2] and 1 <= size <= 64
    assert auto_batch_size("cuda", ("tiny", 32, 32, 1), probe) == size and probed == [2]  # once per worker
    torch.cuda.empty_cache()


def test_each_png_and_the_manifest_say_how_to_make_the_image_again(client, settings, tiny_model):
    """Every PNG carries its parameters (image tools' ``parameters`` text and the exact ``ldmq``
    JSON), and the manifest (JSON and CSV) lists the same for every image."""
    import csv
    import json

    import diffusers
    import torch

    from shared.models import Model
    from shared.storage import manifest_key

    tid, key, model_id = tiny_model
    with session_scope(settings) as s:
        model_sha = s.get(Model, model_id).config["sha256"]
    job_id = submit(client, key, model_id, [{"prompt": "a cat", "negative_prompt": "blurry", "seed": 7, "num_images": 2},
                                            {"prompt": "a dog", "seed": 9, "steps": 3, "guidance_scale": 1.0}],
                    guidance_scale=4.5)
    assert run(settings, job_id) == "succeeded"
    st = get_storage(settings)
    versions = {"torch": str(torch.__version__), "diffusers": diffusers.__version__}
    chunks = [Image.open(io.BytesIO(st.get_bytes(o[3]))).text for o in outputs(settings, job_id)]
    made = [json.loads(c["ldmq"]) for c in chunks]
    assert [(m["row"], m["index"], m["seed"], m["prompt"], m["negative_prompt"], m["steps"], m["guidance_scale"])
            for m in made] == [(1, 0, 7, "a cat", "blurry", 2, 4.5), (1, 1, 8, "a cat", "blurry", 2, 4.5),
                               (2, 0, 9, "a dog", "", 3, 1.0)]
    for m in made:
        assert m["job_id"] == job_id and m["model_id"] == model_id and m["model_sha256"] == model_sha
        assert (m["scheduler"], m["width"], m["height"], m["dtype"], m["device"]) == ("ddim", 32, 32, "float32", "cpu")
        assert {k: m["versions"][k] for k in versions} == versions and m["versions"]["ldmq"]
    assert chunks[1]["parameters"] == (
        "a cat\nNegative prompt: blurry\n"
        f"Steps: 2, Sampler: DDIM, CFG scale: 4.5, Seed: 8, Size: 32x32, Model hash: {model_sha[:10]}, "
        f"Model: {model_id}, Version: ldmq {made[1]['versions']['ldmq']}")
    assert chunks[2]["parameters"].startswith("a dog\nSteps: 3, Sampler: DDIM, CFG scale: 1, Seed: 9,")

    manifest = json.loads(st.get_bytes(manifest_key(tid, job_id)))["outputs"]
    fields = ("model_id", "model_sha256", "scheduler", "steps", "guidance_scale", "seed", "width", "height",
              "negative_prompt", "dtype", "device", "versions")
    assert [{k: e[k] for k in fields} for e in manifest] == [
        {k: m[k] if k != "negative_prompt" else m[k] or None for k in fields} for m in made]
    rows = list(csv.DictReader(io.StringIO(st.get_bytes(manifest_key(tid, job_id).replace(".json", ".csv")).decode())))
    assert [(r["seed"], r["model_sha256"], r["scheduler"], r["steps"], r["guidance_scale"], r["torch_version"],
             r["diffusers_version"], r["ldmq_version"]) for r in rows] == [
        (str(m["seed"]), model_sha, "ddim", str(m["steps"]), str(m["guidance_scale"]), *(
            m["versions"][k] for k in ("torch", "diffusers", "ldmq"))) for m in made]


def test_a_model_stored_before_content_hashes_gets_one_on_first_use(client, settings, tiny_model):
    import json

    from shared.models import Model

    tid, key, model_id = tiny_model
    with session_scope(settings) as s:
        m = s.get(Model, model_id)
        registered = m.config["sha256"]
        m.config = {k: v for k, v in m.config.items() if k != "sha256"}  # as a model registered earlier
    job_id = submit(client, key, model_id, [{"prompt": "p", "seed": 1}])
    assert run(settings, job_id) == "succeeded"
    with session_scope(settings) as s:
        assert s.get(Model, model_id).config["sha256"] == registered
    png = get_storage(settings).get_bytes(outputs(settings, job_id)[0][3])
    assert json.loads(Image.open(io.BytesIO(png)).text["ldmq"])["model_sha256"] == registered
