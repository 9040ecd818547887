"""LoRA models through the real job code and servers: a LoRA train job stores an adapter that names
its base (which then cannot be deleted) and that plain diffusers loads; sampling many LoRA models and
their base loads the base once, gives each model its own images, and never packs two adapters into
one batch."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from shared.adapters import ADAPTER_WEIGHTS
from shared.db import session_scope
from shared.models import Job, JobOutput, Model
from shared.registry import register_adapter_dir
from shared.storage import get_storage
from worker.jobs import sample as sample_job
from worker.jobs.sample import load_pipeline, run_sample
from worker.jobs.train import run_train
from worker.runtime.run import run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"dataset": "builtin:digits", "method": "lora", "steps": 4, "batch_size": 8, "resolution": 16,
        "learning_rate": 1e-2, "warmup_steps": 1, "checkpoint_every": 2, "eval_num_samples": 10, "eval_steps": 2,
        "vlb_timesteps": 2, "validation_prompts": ["a handwritten digit one"]}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def fresh_cache(monkeypatch):
    """The worker process's pipeline cache, empty, so that a test counts its own base loads."""
    monkeypatch.setattr(sample_job, "_CACHE", None)


def unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    z = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    context = torch.randn(2, 16, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def test_a_lora_job_stores_an_adapter_that_plain_diffusers_loads(client, settings, tiny_model, tiny_pipeline_dir,
                                                                  tmp_path, fresh_cache):
    from diffusers import StableDiffusionPipeline

    _, key, base_id = tiny_model
    r = client.post("/v1/jobs/train", headers=auth(key), json={**LORA, "base_model": base_id})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert run_job(settings, job_id, "train", lambda run: run_train(settings, run)) == "succeeded"
    with session_scope(settings) as s:
        model = s.query(Model).filter_by(job_id=job_id).one()
    assert model.config["base_model"] == base_id
    assert model.config["lora"] == {"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert model.metrics["trained_params"] < model.metrics["unet_params"] / 20
    shown = client.get(f"/v1/models/{model.id}", headers=auth(key)).json()
    assert shown["config"]["base_model"] == base_id

    storage = get_storage(settings)
    stored = storage.list(model.key.rstrip("/") + "/")
    assert [k.rsplit("/", 1)[1] for k in stored] == [ADAPTER_WEIGHTS]
    adapter = storage.download_dir(model.key, tmp_path / "adapter")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    base_out = unet_out(pipe.unet)
    pipe.load_lora_weights(adapter)
    theirs = unet_out(pipe.unet)
    ours = unet_out(load_pipeline(settings, model, "cpu").unet)  # the sample job's path
    assert (ours - base_out).abs().max() > 1e-4  # the trained adapter changes the U-Net
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # The base cannot go while the LoRA model needs it; the LoRA model can, then the base.
    r = client.delete(f"/v1/models/{base_id}", headers=auth(key))
    assert r.status_code == 409 and {"id": model.id} in r.json()["error"]["details"]
    assert client.delete(f"/v1/models/{model.id}", headers=auth(key)).status_code == 204
    assert client.delete(f"/v1/models/{base_id}", headers=auth(key)).status_code == 204


def test_lora_train_requests_are_checked(client, settings, tiny_model, tmp_path):
    tid, key, base_id = tiny_model
    r = client.post("/v1/jobs/train", headers=auth(key), json={**LORA})
    assert r.status_code == 422 and "give base_model" in r.text
    r = client.post("/v1/jobs/train", headers=auth(key),
                    json={**LORA, "base_model": base_id, "lora_target_modules": ["to_q", "mid_block"]})
    assert r.status_code == 422 and "'mid_block'" in r.text and "time_emb_proj" in r.text
    r = client.post("/v1/jobs/train", headers=auth(key), json={**LORA, "base_model": base_id, "lora_rank": 0})
    assert r.status_code == 422
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"not read")
    with session_scope(settings) as s:
        lora = register_adapter_dir(s, get_storage(settings), tid, adapter, base_model=base_id,
                                    lora={"rank": 4, "alpha": 4.0, "target_modules": ["to_q"]}, name="l").id
    for method in ("lora", "full"):
        r = client.post("/v1/jobs/train", headers=auth(key), json={**LORA, "method": method, "base_model": lora})
        assert r.status_code == 422 and "is a LoRA adapter" in r.text, method
    with session_scope(settings) as s:
        assert s.query(Job).filter(Job.tenant_id == tid).count() == 0  # nothing half stored


def stored_lora(settings, tid, base_id, base_dir, tmp_path, seed) -> str:
    """A LoRA model of ``base_id`` with a random, clearly non-trivial adapter."""
    from tests.worker.test_lora import random_adapter

    d = random_adapter(base_dir, tmp_path / f"lora{seed}", seed=seed)
    with session_scope(settings) as s:
        return register_adapter_dir(s, get_storage(settings), tid, d, base_model=base_id, name=f"lora{seed}",
                                    lora={"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}).id


def submit(client, key, model_id, seed=5):
    r = client.post("/v1/jobs/sample", headers=auth(key), json={
        "model": model_id, "prompts": [{"prompt": "a digit", "seed": seed, "num_images": 2}], "steps": 2,
        "scheduler": "ddim"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def images(settings, job_id) -> list[bytes]:
    storage = get_storage(settings)
    with session_scope(settings) as s:
        keys = [o.key for o in s.query(JobOutput).filter_by(job_id=job_id).order_by(JobOutput.index)]
    return [Image.open(io.BytesIO(storage.get_bytes(k))).tobytes() for k in keys]


def sample(settings, job_id) -> dict:
    result = {}
    assert run_job(settings, job_id, "sample", lambda r: result.update(run_sample(settings, r)) or result) == "succeeded"
    return result


def test_many_lora_models_share_one_loaded_base(client, settings, tiny_model, tiny_pipeline_dir, tmp_path,
                                                fresh_cache):
    tid, key, base_id = tiny_model
    cfg = settings.model_copy(update={"sample_batch_size": 4, "cobatch_max_items": 8})
    loras = [stored_lora(settings, tid, base_id, tiny_pipeline_dir, tmp_path, seed) for seed in range(3)]

    def made_by(model_id: str) -> list[bytes]:
        job_id = submit(client, key, model_id)
        sample(cfg, job_id)
        return images(cfg, job_id)

    first_base = made_by(base_id)
    made = {m: made_by(m) for m in loras}
    again_base, again_lora = made_by(base_id), made_by(loras[1])

    assert sample_job.pipeline_cache(cfg).loads == 1  # the base, once, for all five jobs
    assert again_base == first_base  # adapters switched off give the base's pixels again
    assert again_lora == made[loras[1]]  # deterministic per seed, whatever ran in between
    outs = [first_base, *made.values()]
    assert all(a != b for i, a in enumerate(outs) for b in outs[i + 1:])  # every adapter changes the images

    # A run packs queued jobs of its own LoRA model only, never another adapter's.
    mine, other, mine_too = submit(client, key, loras[0], 6), submit(client, key, loras[2], 6), submit(client, key, loras[0], 7)
    assert sample(cfg, mine)["packed_jobs"] == [mine_too]
    assert sample(cfg, other)["packed_jobs"] == []
    assert images(cfg, other) != images(cfg, mine)
    assert sample_job.pipeline_cache(cfg).loads == 1
