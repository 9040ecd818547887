"""LoRA on a base pipeline (worker/model/lora.py, the lora method of worker/model/training.py): only
the adapter trains, checkpoints hold it and resume exactly, the export is an adapter that plain
diffusers loads, and switching adapters on one pipeline gives each model's own U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.adapters import ADAPTER_WEIGHTS
from shared.train_schema import LORA_TARGET_MODULES, TrainParams
from worker.model.data import load_dataset
from worker.model.lora import add_lora, save_adapter, use_adapter
from worker.model.pipelines import load_pipeline_dir
from worker.model.training import TrainHooks, TrainingStopped, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6


def lora_params(**overrides) -> TrainParams:
    fields = dict(dataset="builtin:digits", base_model="m_base", method="lora", steps=STEPS, batch_size=8,
                  resolution=16, learning_rate=1e-2, warmup_steps=1, checkpoint_every=3, keep_checkpoints=3,
                  eval_at_checkpoints=False, eval_num_samples=10, eval_steps=2, vlb_timesteps=2,
                  validation_prompts=["a handwritten digit one"], seed=3)
    fields.update(overrides)
    return TrainParams(**fields)


class Recorder:
    def __init__(self, stop_at: int | None = None, resume_from: Path | None = None):
        self.losses: dict[int, float] = {}
        self.saved: list[tuple[int, Path]] = []
        self.stop_at, self.resume_from = stop_at, resume_from

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            progress=lambda info: self.losses.__setitem__(info["step"], info["loss"]),
            should_stop=lambda: bool(self.stop_at and self.losses and max(self.losses) >= self.stop_at),
            save_checkpoint=lambda step, path: self.saved.append((step, Path(path))),
            latest_checkpoint=lambda: self.resume_from,
        )


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("builtin:digits", resolution=16)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_pipeline_dir, dataset):
    rec = Recorder()
    result = train(lora_params(), workdir=tmp_path_factory.mktemp("lora"), dataset=dataset,
                   base_model_dir=tiny_pipeline_dir, hooks=rec.hooks(), progress_every=1)
    return rec, result


def unet_out(unet, seed: int = 0) -> torch.Tensor:
    """ε_θ of a fixed noisy latent, time and conditioning: what an adapter changes."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    z = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    context = torch.randn(2, 16, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def test_only_the_adapter_trains_and_the_export_is_the_adapter_alone(lora_run, tiny_pipeline_dir):
    rec, result = lora_run
    assert sorted(rec.losses) == list(range(1, STEPS + 1))  # U-Net steps only: no autoencoder stage
    m = result.metrics
    assert 0 < m["trained_params"] < m["unet_params"] / 20
    files = [f.name for f in result.pipeline_dir.iterdir()]
    assert files == [ADAPTER_WEIGHTS] and (result.pipeline_dir / ADAPTER_WEIGHTS).stat().st_size < 100_000
    weights = load_file(result.pipeline_dir / ADAPTER_WEIGHTS)
    assert weights and all(".lora." in k and k.startswith("unet.") for k in weights)
    ranks = {v.shape[0] for k, v in weights.items() if k.endswith("lora.down.weight")}
    assert ranks == {4}
    # every adapted layer's B moved off its zero start
    ups = [v for k, v in weights.items() if k.endswith("lora.up.weight")]
    assert ups and all(v.abs().max() > 0 for v in ups)


def test_checkpoints_hold_the_adapter_and_its_optimizer_state(lora_run):
    rec, result = lora_run
    assert [s for s, _ in rec.saved] == [3, 6]
    final = rec.saved[-1][1]
    names = {f.name for f in final.iterdir()}
    assert {"unet_lora.safetensors", "optimizer.safetensors", "ema_unet.safetensors", "rng.safetensors"} <= names
    assert "unet.safetensors" not in names and "vae.safetensors" not in names
    adapter = load_file(final / "unet_lora.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    n_params = sum(v.numel() for v in adapter.values())
    assert n_params == result.metrics["trained_params"]
    ema = load_file(final / "ema_unet.safetensors")
    assert len(ema) == len(adapter)  # the EMA is over the adapter too
    state = json.loads((final / "state.json").read_text())
    assert state["params"]["method"] == "lora" and state["params"]["lora_alpha"] == 4.0


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_lora_run(lora_run, tiny_pipeline_dir, dataset, tmp_path):
    full, full_result = lora_run
    a = Recorder(stop_at=2)
    with pytest.raises(TrainingStopped):
        train(lora_params(), workdir=tmp_path / "a", dataset=dataset, base_model_dir=tiny_pipeline_dir,
              hooks=a.hooks(), progress_every=1)
    b = Recorder(resume_from=a.saved[-1][1])
    result = train(lora_params(), workdir=tmp_path / "b", dataset=dataset, base_model_dir=tiny_pipeline_dir,
                   hooks=b.hooks(), progress_every=1)
    assert min(b.losses) == 3 and all(loss == full.losses[s] for s, loss in b.losses.items())
    ours, theirs = load_file(result.pipeline_dir / ADAPTER_WEIGHTS), load_file(full_result.pipeline_dir / ADAPTER_WEIGHTS)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_with_another_rank_is_refused(lora_run, tiny_pipeline_dir, dataset, tmp_path):
    rec, _ = lora_run
    with pytest.raises(ValueError, match="lora_rank"):
        train(lora_params(lora_rank=8), workdir=tmp_path, dataset=dataset, base_model_dir=tiny_pipeline_dir,
              hooks=Recorder(resume_from=rec.saved[-1][1]).hooks())


def random_adapter(base_dir: Path, out: Path, seed: int, **params) -> Path:
    """An adapter with B drawn at random (a trained one starts at B = 0): a clearly non-trivial ΔW."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    torch.manual_seed(seed)
    add_lora(unet, lora_params(**params))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    return save_adapter(unet.eval(), out)


def test_every_offered_target_module_loads_in_plain_diffusers(tiny_pipeline_dir, tmp_path):
    """All the target modules ldmq accepts, with α = 2r: diffusers' load_lora_weights gives the U-Net
    ldmq trained (the α/r scaling travels in the file's metadata)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    params = dict(lora_target_modules=list(LORA_TARGET_MODULES), lora_rank=2, lora_alpha=4.0)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    torch.manual_seed(1)
    add_lora(unet, lora_params(**params))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    ours = unet_out(unet.eval())
    save_adapter(unet, tmp_path / "adapter")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(tmp_path / "adapter")
    theirs = unet_out(pipe.unet)
    assert (ours - base).abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in pipe.unet.named_parameters() if ".lora_A." in n}
    assert {m.split(".")[-1] for m in LORA_TARGET_MODULES} == adapted


def test_switching_adapters_on_one_pipeline(tiny_pipeline_dir, tmp_path):
    pipe = load_pipeline_dir(tiny_pipeline_dir, "cpu", dtype="float32")
    base = unet_out(pipe.unet)
    use_adapter(pipe, None)  # nothing loaded yet: the plain base
    assert torch.equal(unet_out(pipe.unet), base)
    dirs = {f"lora{i}": random_adapter(tiny_pipeline_dir, tmp_path / f"a{i}", seed=i) for i in range(2)}
    outs = {}
    for name, d in dirs.items():
        use_adapter(pipe, name, d)
        outs[name] = unet_out(pipe.unet)
        assert pipe.get_active_adapters() == [name]
    assert (outs["lora0"] - base).abs().max() > 0.1 and (outs["lora0"] - outs["lora1"]).abs().max() > 0.1
    use_adapter(pipe, None)
    assert torch.equal(unet_out(pipe.unet), base)  # disabled adapters compute W x alone, bit for bit
    use_adapter(pipe, "lora0")  # loaded already: no folder needed
    assert torch.equal(unet_out(pipe.unet), outs["lora0"])
    with pytest.raises(ValueError, match="not loaded"):
        use_adapter(pipe, "lora9")


def test_at_most_max_adapters_stay_loaded(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("worker.model.lora.MAX_ADAPTERS", 2)
    pipe = load_pipeline_dir(tiny_pipeline_dir, "cpu", dtype="float32")
    d = random_adapter(tiny_pipeline_dir, tmp_path / "a", seed=0)
    for name in ("x", "y", "x", "z"):  # x used again before z: y is the least recently used
        use_adapter(pipe, name, d)
    assert sorted(pipe.get_list_adapters()["unet"]) == ["x", "z"]


def test_a_checkpoint_from_before_the_lora_fields_still_resumes():
    """Its params lack method and the lora_* fields: they had their defaults (full fine-tuning)."""
    from worker.model.checkpoint import check_resumable

    now = TrainParams(dataset="builtin:digits", steps=5)
    old = {k: v for k, v in now.model_dump(mode="json").items() if k != "method" and not k.startswith("lora_")}
    check_resumable({"params": old}, now)
    with pytest.raises(ValueError, match="method"):
        check_resumable({"params": old}, lora_params())
