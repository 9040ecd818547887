"""The training loop (worker/model/training.py) on a tiny configuration: 16×16 digits, a 60k-parameter
autoencoder and a small U-Net, a few dozen steps."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shared.train_schema import TrainParams
from worker.model.data import load_dataset
from worker.model.parts import encode_captions
from worker.model.training import TrainHooks, TrainingStopped, train

AE_STEPS, UNET_STEPS = 12, 30


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_params(**overrides) -> TrainParams:
    fields = dict(
        dataset="builtin:digits",
        steps=UNET_STEPS,
        autoencoder_steps=AE_STEPS,
        batch_size=16,
        learning_rate=2e-3,
        autoencoder_learning_rate=3e-3,
        warmup_steps=3,
        autoencoder_warmup_steps=2,
        resolution=16,
        autoencoder_channels=[8, 16, 16],
        unet_channels=[16, 32],
        checkpoint_every=10,
        keep_checkpoints=2,
        eval_at_checkpoints=False,
        eval_num_samples=10,
        eval_steps=4,
        vlb_timesteps=3,
        validation_prompts=["a handwritten digit one", "a handwritten digit seven"],
        seed=7,
    )
    fields.update(overrides)
    return TrainParams(**fields)


class Recorder:
    """Hooks that record progress and checkpoints, can stop at a global step, and resume from a dir."""

    def __init__(self, stop_at: int | None = None, resume_from: Path | None = None):
        self.progress: list[dict] = []
        self.steps: list[tuple[str, float]] = []
        self.evals: list[tuple[str, float]] = []
        self.saved: list[tuple[int, Path]] = []
        self.stop_at, self.resume_from = stop_at, resume_from

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            progress=self.progress.append,
            step_done=lambda stage, seconds: self.steps.append((stage, seconds)),
            evaluated=lambda stage, seconds: self.evals.append((stage, seconds)),
            should_stop=lambda: bool(self.stop_at and self.progress and self.progress[-1]["step"] >= self.stop_at),
            save_checkpoint=lambda step, path: self.saved.append((step, Path(path))),
            latest_checkpoint=lambda: self.resume_from,
        )

    def losses(self) -> dict[int, float]:
        return {p["step"]: p["loss"] for p in self.progress}


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("builtin:digits", resolution=16)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, dataset):
    rec = Recorder()
    result = train(
        tiny_params(), workdir=tmp_path_factory.mktemp("full"), dataset=dataset, base_model_dir=None,
        hooks=rec.hooks(), progress_every=1,
    )
    return rec, result


def test_losses_go_down_and_progress_is_reported(full_run):
    rec, result = full_run
    ae = [p["loss"] for p in rec.progress if p["stage"] == "autoencoder"]
    unet = [p["loss"] for p in rec.progress if p["stage"] == "unet"]
    assert len(ae) == AE_STEPS and len(unet) == UNET_STEPS
    # one step_done per optimisation step (the worker's step-duration metric), with its wall time
    assert [st for st, _ in rec.steps] == ["autoencoder"] * AE_STEPS + ["unet"] * UNET_STEPS
    assert all(sec > 0 for _, sec in rec.steps)
    # eval_at_checkpoints off: each stage is evaluated once, at its end (timed, for estimates)
    assert [st for st, _ in rec.evals] == ["autoencoder", "unet"] and all(sec > 0 for _, sec in rec.evals)
    assert np.mean(ae[-3:]) < 0.7 * np.mean(ae[:3])
    assert np.mean(unet[-8:]) < 0.8 * np.mean(unet[:8])
    last = rec.progress[-1]
    assert {"stage", "step", "total_steps", "loss", "lr", "eta_s"} <= set(last)
    assert last["step"] == last["total_steps"] == AE_STEPS + UNET_STEPS and last["eta_s"] == 0
    assert rec.progress[AE_STEPS + 3]["lr"] > rec.progress[-1]["lr"]  # cosine decay
    history = json.loads(result.artifacts["loss_history.json"].read_text())
    assert [s for s, _ in history["unet"]] == list(range(AE_STEPS + 1, AE_STEPS + UNET_STEPS + 1))


def test_checkpoints_are_safetensors_and_json_only(full_run):
    rec, _ = full_run
    steps = [s for s, _ in rec.saved]
    # every 10 global steps, at the end of the autoencoder stage, and at the end
    assert steps == [10, 12, 20, 30, 40, 42]
    kept = [p for _, p in rec.saved if p.exists()]
    assert kept == [p for _, p in rec.saved[-2:]]  # keep_checkpoints=2 locally
    final = rec.saved[-1][1]
    names = {f.name for f in final.iterdir()}
    assert {"state.json", "unet.safetensors", "vae.safetensors", "ema_unet.safetensors", "optimizer.safetensors", "rng.safetensors"} <= names
    assert {f.suffix for f in final.iterdir()} <= {".safetensors", ".json", ".png"}
    state = json.loads((final / "state.json").read_text())
    assert state["global_step"] == 42 and state["stage"] == "unet" and state["optimizer"]["param_groups"]
    assert (final / "metrics.json").exists() and (final / "samples.png").exists() and (final / "loss_curve.png").exists()


def test_final_metrics_and_artifacts(full_run):
    _, result = full_run
    m = result.metrics
    assert np.isfinite(m["heldout_bits_per_dim"]) and m["heldout_bits_per_dim"] > 0
    assert 0.0 <= m["accuracy"] <= 1.0 and m["frechet"] > 0 and m["frechet_floor"] > 0
    assert m["scaling_factor"] > 0 and m["train_wall_s"] > 0
    json.dumps(m)
    for name in ("loss_curve.png", "samples.png", "metrics.json", "loss_history.json"):
        assert result.artifacts[name].exists()


def test_the_saved_model_holds_the_ema_weights_not_the_raw_ones(full_run):
    """EMA is on by default: the exported U-Net must be the EMA shadow of the final checkpoint, which
    differs from the raw weights the optimiser left (saved beside it as unet.safetensors)."""
    from diffusers import UNet2DConditionModel

    rec, result = full_run
    final = rec.saved[-1][1]
    raw, shadow = load_file(final / "unet.safetensors"), load_file(final / "ema_unet.safetensors")
    unet = UNet2DConditionModel.from_pretrained(result.pipeline_dir / "unet")
    saved = dict(unet.named_parameters())
    names = [n for n, _ in unet.named_parameters()]  # the EMA keeps one shadow per parameter, in this order
    assert len(names) == len(shadow)
    for i, name in enumerate(names):
        torch.testing.assert_close(saved[name].detach(), shadow[str(i)], rtol=0, atol=0, msg=name)
    differ = sum(not torch.equal(saved[n].detach(), raw[n]) for n in names if saved[n].numel() > 1)
    assert differ > 0.9 * len(names)  # the raw weights are not what was saved


def test_the_final_evaluation_chooses_the_sampling_defaults(full_run):
    from worker.model.train_eval import choose_guidance

    _, result = full_run
    m, params = result.metrics, tiny_params()
    sweep = {r["guidance_scale"]: r for r in m["guidance_sweep"]}
    assert sorted(sweep) == params.eval_guidance_candidates == [1.0, 1.5, 2.0, 3.0, 5.0]
    assert result.sampling_defaults == {"scheduler": params.eval_scheduler, "steps": params.eval_steps,
                                        "guidance_scale": choose_guidance(sweep)}
    chosen = sweep[result.sampling_defaults["guidance_scale"]]
    # the stored quality is the quality at the chosen guidance, what a bare request samples with
    assert (m["accuracy"], m["frechet"], m["guidance_scale"]) == (chosen["accuracy"], chosen["frechet"],
                                                                    chosen["guidance_scale"])


def test_pipeline_loads_in_plain_diffusers_and_samples(full_run):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    _, result = full_run
    index = json.loads((result.pipeline_dir / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(str(result.pipeline_dir))
    assert isinstance(pipe.scheduler, DDPMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("linear", 1e-4, 0.02, 1000)
    assert cfg.clip_sample is False and cfg.prediction_type == "epsilon"
    assert pipe.vae.config.scaling_factor == pytest.approx(result.metrics["scaling_factor"])
    assert pipe.vae.config.scaling_factor != 1.0
    # the pipeline conditions exactly as training did
    prompts = ["a handwritten digit one", "a handwritten digit seven"]
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(embeds, encode_captions(pipe.tokenizer, pipe.text_encoder, prompts))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np")
    images = out.images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(full_run, dataset, tmp_path):
    """Stop in the autoencoder stage, resume, stop in the U-Net stage, resume to the end: each
    resumed run's next-step loss, and in the end the weights, equal the uninterrupted run's."""
    full, full_result = full_run
    ref = full.losses()

    a = Recorder(stop_at=5)
    with pytest.raises(TrainingStopped):
        train(tiny_params(), workdir=tmp_path / "a", dataset=dataset, base_model_dir=None, hooks=a.hooks(), progress_every=1)
    assert a.saved[-1][0] == 5

    b = Recorder(stop_at=AE_STEPS + 7, resume_from=a.saved[-1][1])
    with pytest.raises(TrainingStopped):
        train(tiny_params(), workdir=tmp_path / "b", dataset=dataset, base_model_dir=None, hooks=b.hooks(), progress_every=1)
    assert b.progress[0]["step"] == 6 and b.progress[0]["loss"] == ref[6]
    assert all(loss == ref[step] for step, loss in b.losses().items())

    c = Recorder(resume_from=b.saved[-1][1])
    result = train(tiny_params(), workdir=tmp_path / "c", dataset=dataset, base_model_dir=None, hooks=c.hooks(), progress_every=1)
    assert c.progress[0]["step"] == AE_STEPS + 8 and c.progress[0]["loss"] == ref[AE_STEPS + 8]
    assert all(loss == ref[step] for step, loss in c.losses().items())
    for part in ("unet", "vae"):
        ours = load_file(next((result.pipeline_dir / part).glob("*.safetensors")))
        theirs = load_file(next((full_result.pipeline_dir / part).glob("*.safetensors")))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_yield_stops_after_the_next_periodic_checkpoint_and_resumes_from_it(full_run, dataset, tmp_path):
    """A preemption's signal is asked after periodic checkpoints only (not a stage's last step):
    the run stops right after one, writing no checkpoint of its own, and resumes from it."""
    ref = full_run[0].losses()

    def yielding(rec: Recorder, from_step: int, asked: list[int]) -> TrainHooks:
        def ask() -> bool:
            asked.append(rec.saved[-1][0])
            return rec.saved[-1][0] >= from_step
        return replace(rec.hooks(), yield_at_checkpoint=ask)

    a, asked_a = Recorder(), []
    with pytest.raises(TrainingStopped):
        train(tiny_params(), workdir=tmp_path / "a", dataset=dataset, base_model_dir=None,
              hooks=yielding(a, AE_STEPS + 1, asked_a), progress_every=1)
    assert asked_a == [10, 20]  # not at step 12, the autoencoder stage's end
    assert [step for step, _ in a.saved] == [10, AE_STEPS, 20] and a.progress[-1]["step"] == 20

    b, asked_b = Recorder(resume_from=a.saved[-1][1]), []
    with pytest.raises(TrainingStopped):
        train(tiny_params(), workdir=tmp_path / "b", dataset=dataset, base_model_dir=None,
              hooks=yielding(b, 0, asked_b), progress_every=1)
    assert b.progress[0]["step"] == 21 and all(loss == ref[step] for step, loss in b.losses().items())
    assert asked_b == [30] and b.saved[-1][0] == 30  # progress past the checkpoint it resumed from


def test_uncached_latents_train_the_same_model(full_run, dataset, tmp_path):
    """cache_latents=false encodes every batch again; it draws the same random numbers, so the
    losses match the cached run's up to the encoder's float rounding."""
    full, _ = full_run
    ref = full.losses()
    rec = Recorder(stop_at=AE_STEPS + 10)
    with pytest.raises(TrainingStopped):
        train(tiny_params(cache_latents=False), workdir=tmp_path, dataset=dataset, base_model_dir=None,
              hooks=rec.hooks(), progress_every=1)
    got = rec.losses()
    assert all(got[s] == ref[s] for s in range(1, AE_STEPS + 1))  # stage 1 does not depend on it
    unet_steps = range(AE_STEPS + 1, AE_STEPS + 11)
    np.testing.assert_allclose([got[s] for s in unet_steps], [ref[s] for s in unet_steps], rtol=2e-3)


def test_resume_with_other_params_is_refused(full_run, dataset, tmp_path):
    rec, _ = full_run
    hooks = Recorder(resume_from=rec.saved[-1][1]).hooks()
    with pytest.raises(ValueError, match="learning_rate"):
        train(tiny_params(learning_rate=1e-4), workdir=tmp_path, dataset=dataset, base_model_dir=None, hooks=hooks)


def test_inconsistent_inputs_are_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="base_model_dir"):
        train(tiny_params(base_model="m_1"), workdir=tmp_path, dataset=dataset, base_model_dir=None, hooks=TrainHooks())
    with pytest.raises(ValueError, match="resolution"):
        train(tiny_params(resolution=32), workdir=tmp_path, dataset=dataset, base_model_dir=None, hooks=TrainHooks())


def test_fine_tuning_a_base_model_trains_only_its_unet(full_run, dataset, tmp_path):
    _, base = full_run
    rec = Recorder()
    result = train(
        tiny_params(base_model="m_base", steps=4), workdir=tmp_path, dataset=dataset,
        base_model_dir=base.pipeline_dir, hooks=rec.hooks(), progress_every=1,
    )
    assert {p["stage"] for p in rec.progress} == {"unet"} and rec.progress[-1]["step"] == 4
    for part, same in (("vae", True), ("text_encoder", True), ("unet", False)):
        ours = load_file(next((result.pipeline_dir / part).glob("*.safetensors")))
        theirs = load_file(next((base.pipeline_dir / part).glob("*.safetensors")))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs) is same, part
