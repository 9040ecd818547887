"""Train a text-to-image latent diffusion model; read it top to bottom, like nanoGPT's train.py.

Without a base model there are two stages (Rombach et al. 2022):

1. an ``AutoencoderKL`` learns to compress an image x (3×R×R in [−1, 1]) to a latent z (C×R/f×R/f)
   and back: per-pixel MSE of the reconstruction plus ``kl_weight`` × KL(q(z|x) ‖ N(0, I)) per latent
   element (a small KL keeps the latent space tidy, not a VAE prior);
2. the autoencoder is frozen, the training set is encoded once (posterior means and std-devs
   cached), and a ``UNet2DConditionModel`` (ResNet blocks with cross-attention in the down and up
   halves) learns ε_θ(z_t, t, τ(y)) with L_simple (Algorithm 1), on latents scaled to unit variance
   (``scaling_factor`` = 1/std, saved in the VAE config as diffusers expects). τ(y) are the frozen
   text encoder's token states, computed exactly as ``StableDiffusionPipeline.encode_prompt`` does,
   so a plain-diffusers user samples what was trained. A share ``caption_dropout`` of captions is
   replaced by the empty caption so that classifier-free guidance works.

With ``base_model`` (a local diffusers StableDiffusionPipeline directory) only stage 2 runs, on that
model's U-Net, with its own autoencoder, text encoder and noise schedule.

Optimisation as diffusers' ``train_text_to_image.py``: AdamW, linear warm-up then cosine decay,
gradient clipping, EMA weights (``diffusers.training_utils.EMAModel``), bf16 autocast on GPU, optional
gradient checkpointing, optional Min-SNR-γ weighting. All randomness of training (batch order, t, ε,
posterior samples, caption dropout) comes from one seeded ``torch.Generator`` whose state is part of
every checkpoint, so a resumed run reproduces the uninterrupted one exactly (on the same device and
thread count).

Checkpoints (every ``checkpoint_every`` global steps, at the end of the autoencoder stage, at the end,
and when asked to stop) are directories of safetensors files and JSON — never pickle (their format:
:mod:`worker.model.checkpoint`), plus the evaluation at that point (``metrics.json``,
``loss_curve.png``, ``samples.png``: :mod:`worker.model.train_eval`). The models are built by
:mod:`worker.model.parts`.

The result is a StableDiffusionPipeline-format directory (unet = EMA weights, vae, text_encoder,
tokenizer, scheduler = DDPMScheduler with linear β 1e-4..0.02, T = 1000, clip_sample=False) that
``diffusers.StableDiffusionPipeline.from_pretrained(dir)`` loads with no ldmq code.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from shared.train_schema import TrainParams
from worker.model.checkpoint import _check_resumable, _load_module, _restore, read_checkpoint_state, write_checkpoint
from worker.model.data import BatchOrder, ImageCaptionDataset
from worker.model.diffusion import GaussianDiffusion, mean_flat
from worker.model.parts import assemble_pipeline, encode_captions, encode_posteriors, make_autoencoder, make_unet
from worker.model.schedulers import make_noise_scheduler, make_scheduler_like
from worker.model.train_eval import UNetEvaluator, evaluate_autoencoder


class TrainingStopped(Exception):
    """Raised when ``hooks.should_stop()`` said so; a checkpoint of the last step was saved first."""


def _noop(*_args, **_kwargs):
    return None


@dataclass
class TrainHooks:
    """How the job runner talks to the loop. ``should_stop`` is called once per optimisation step,
    so it must be cheap (throttle any database query in it)."""

    progress: Callable[[dict], None] = _noop
    step_done: Callable[[str, float], None] = _noop  # (stage, wall seconds of the optimisation step)
    should_stop: Callable[[], bool] = lambda: False
    save_checkpoint: Callable[[int, Path], None] = _noop
    latest_checkpoint: Callable[[], Path | None] = lambda: None


@dataclass
class TrainResult:
    pipeline_dir: Path
    metrics: dict
    artifacts: dict[str, Path] = field(default_factory=dict)


# ================================================================================================
# The learning-rate schedule
# ================================================================================================


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate for 0-based ``step``: linear warm-up over ``warmup`` steps, then cosine to 0
    (as diffusers' ``get_cosine_schedule_with_warmup``)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ================================================================================================
# The run
# ================================================================================================


class _Run:
    """What both stages share: params, device, hooks, clocks, loss history, checkpoint bookkeeping."""

    def __init__(self, params: TrainParams, workdir: Path, hooks: TrainHooks, device: str, progress_every: int):
        self.params, self.workdir, self.hooks, self.device = params, workdir, hooks, torch.device(device)
        self.progress_every = progress_every
        self.generator = torch.Generator().manual_seed(params.seed)
        self.loss_history: dict[str, list[list[float]]] = {}
        self.train_seconds = 0.0  # optimisation wall time only (no evaluation, no checkpoint I/O)
        self.train_cpu_seconds = 0.0  # process CPU time of the same (all threads)
        self.eval_seconds = 0.0
        self.local_checkpoints: list[Path] = []
        use_bf16 = params.mixed_precision == "bf16" or (params.mixed_precision == "auto" and self.device.type == "cuda")
        self.autocast = (
            (lambda: torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        )

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.device)

    def report(self, *, stage, global_step, stage_step, stage_total, loss, lr, sec_per_step, later_seconds=0.0):
        if stage_step % self.progress_every and stage_step != stage_total:
            return
        self.hooks.progress(
            {
                "stage": stage,
                "step": global_step,
                "total_steps": self.params.total_steps,
                "stage_step": stage_step,
                "stage_total_steps": stage_total,
                "loss": loss,
                "lr": lr,
                "eta_s": (stage_total - stage_step) * sec_per_step + later_seconds,
            }
        )

    def publish(self, ckpt_dir: Path, global_step: int) -> None:
        """Hand a written checkpoint to the caller and keep the last K locally."""
        self.hooks.save_checkpoint(global_step, ckpt_dir)
        self.local_checkpoints.append(ckpt_dir)
        while len(self.local_checkpoints) > self.params.keep_checkpoints:
            shutil.rmtree(self.local_checkpoints.pop(0), ignore_errors=True)

    def checkpoint_dir(self, global_step: int) -> Path:
        return self.workdir / "checkpoints" / f"step-{global_step:08d}"


def train(
    params: TrainParams,
    *,
    workdir: Path,
    dataset: ImageCaptionDataset,
    base_model_dir: Path | None,
    hooks: TrainHooks,
    device: str = "cpu",
    progress_every: int = 10,
) -> TrainResult:
    """Train (or resume, from ``hooks.latest_checkpoint()``) and return the pipeline and its metrics.

    Raises :class:`TrainingStopped` when ``hooks.should_stop()`` (after saving a checkpoint), and
    ValueError for inconsistent inputs (a base model with another prediction type, a checkpoint
    trained with other params, a dataset at another resolution).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if (params.base_model is None) != (base_model_dir is None):
        raise ValueError("base_model_dir must be given exactly when params.base_model is set")
    if dataset.resolution != params.resolution:
        raise ValueError(f"dataset is {dataset.resolution}px but params.resolution is {params.resolution}")
    run = _Run(params, workdir, hooks, device, progress_every)
    dev = run.device
    torch.manual_seed(params.seed)  # weight initialisation

    # ---- resume? ------------------------------------------------------------------------------
    resume_dir = hooks.latest_checkpoint()
    resume_state = read_checkpoint_state(resume_dir) if resume_dir is not None else None
    if resume_state is not None:
        _check_resumable(resume_state, params)
        run.loss_history = resume_state["loss_history"]
        run.train_seconds = resume_state.get("train_seconds", 0.0)
        run.train_cpu_seconds = resume_state.get("train_cpu_seconds", 0.0)

    # ---- data: a held-out split for the VLB ----------------------------------------------------
    train_set, heldout = dataset.split(params.holdout_fraction, seed=params.seed)
    images = train_set.images.to(dev)

    # ---- frozen parts: text encoder, and (with a base model) its autoencoder and schedule ---------
    if base_model_dir is not None:
        from diffusers import StableDiffusionPipeline

        base = StableDiffusionPipeline.from_pretrained(
            str(base_model_dir), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        tokenizer, text_encoder, vae, unet = base.tokenizer, base.text_encoder, base.vae, base.unet
        noise_scheduler = base.scheduler
        if noise_scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"base model predicts {noise_scheduler.config.prediction_type!r}; ldmq trains 'epsilon' only"
            )
        noise_scheduler = make_scheduler_like(noise_scheduler)
        del base
    else:
        from worker.model.text_encoder import load_text_encoder

        tokenizer, text_encoder = load_text_encoder()
        vae = make_autoencoder(params)
        noise_scheduler = make_noise_scheduler()
        unet = None
    text_encoder.to(dev).requires_grad_(False).eval()
    vae.to(dev)
    diffusion = GaussianDiffusion.from_scheduler_config(noise_scheduler.config)
    ctx_dim = text_encoder.config.hidden_size
    latent_side = params.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    if unet is None:
        unet = make_unet(params, in_channels=vae.config.latent_channels, sample_size=latent_side, cross_attention_dim=ctx_dim)
    unet.to(dev)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()

    # ============================================================================================
    # Stage 1: autoencoder
    # ============================================================================================
    ae_steps = 0 if base_model_dir is not None else params.autoencoder_steps
    ae_done = resume_state is not None and resume_state["stage"] == "unet"
    if base_model_dir is None and ae_done:
        _load_module(vae, resume_dir / "vae.safetensors")
    elif base_model_dir is None:
        unet_sec_per_step = _time_unet_step(unet, params, vae.config.latent_channels, latent_side, ctx_dim, dev)
        vae.train().requires_grad_(True)
        opt = torch.optim.AdamW(
            vae.parameters(), lr=params.autoencoder_learning_rate, weight_decay=params.weight_decay, fused=True
        )
        batches = BatchOrder(len(train_set), params.batch_size, run.generator)
        start = 0
        if resume_state is not None:  # stage == "autoencoder"
            _load_module(vae, resume_dir / "vae.safetensors")
            _restore(resume_dir, resume_state, optimizer=opt, ema=None, generator=run.generator, batches=batches)
            start = resume_state["stage_step"]
        history = run.loss_history.setdefault("autoencoder", [])
        step_clock, cpu_clock = time.perf_counter(), time.process_time()
        for step in range(start, ae_steps):
            # -- one step: reconstruct a batch through a sampled latent
            lr = lr_at(step, ae_steps, params.autoencoder_warmup_steps, params.autoencoder_learning_rate)
            for group in opt.param_groups:
                group["lr"] = lr
            x = images[batches.next().to(dev)]
            with run.autocast():
                posterior = vae.encode(x).latent_dist
                z = posterior.mean + posterior.std * run.randn(posterior.mean.shape)
                recon = vae.decode(z).sample
            mse = F.mse_loss(recon.float(), x)
            kl = (posterior.kl() / posterior.mean[0].numel()).mean()  # per latent element
            loss = mse + params.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), params.grad_clip)
            opt.step()
            # -- bookkeeping
            step_wall = time.perf_counter() - step_clock
            run.train_seconds += step_wall
            run.train_cpu_seconds += time.process_time() - cpu_clock
            hooks.step_done("autoencoder", step_wall)
            history.append([step + 1, loss.item()])
            sec = run.train_seconds / max(1, len(history))
            run.report(
                stage="autoencoder", global_step=step + 1, stage_step=step + 1, stage_total=ae_steps,
                loss=loss.item(), lr=lr, sec_per_step=sec, later_seconds=params.steps * unet_sec_per_step,
            )
            last = step + 1 == ae_steps
            stop = hooks.should_stop()
            if stop or last or (step + 1) % params.checkpoint_every == 0:
                _checkpoint_autoencoder(run, step + 1, vae, opt, batches, heldout, evaluate=not stop)
            if stop:
                raise TrainingStopped(f"stopped at step {step + 1}")
            step_clock, cpu_clock = time.perf_counter(), time.process_time()
        del opt
    vae.eval().requires_grad_(False)

    # ============================================================================================
    # Stage 2: U-Net on cached latents
    # ============================================================================================
    # -- cache the training set's latent posteriors once; scale latents to unit variance
    lat_mean, lat_std = encode_posteriors(vae, images)
    if base_model_dir is None:
        # Var(z) of the posterior samples = Var(means) + E[posterior variance]
        var = lat_mean.var().item() + (lat_std**2).mean().item()
        vae.register_to_config(scaling_factor=1.0 / math.sqrt(var))
    scaling = float(vae.config.scaling_factor)
    # -- cache text embeddings of the distinct captions, and of the empty caption
    distinct = sorted(set(train_set.captions))
    lookup = {c: i for i, c in enumerate(distinct)}
    caption_index = torch.tensor([lookup[c] for c in train_set.captions], device=dev)
    caption_embeds = encode_captions(tokenizer, text_encoder, distinct, dev)
    empty_embed = encode_captions(tokenizer, text_encoder, [""], dev)

    unet.train().requires_grad_(True)
    # Fused AdamW and a foreach EMA update: one kernel over all parameters instead of a loop of
    # small ops (~10 % of a U-Net step on the 2-core CPU, interleaved runs: docs/benchmarks.md).
    opt = torch.optim.AdamW(unet.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay, fused=True)
    ema = None
    if params.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=params.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                       power=params.ema_power, foreach=True)
    batches = BatchOrder(len(train_set), params.batch_size, run.generator)
    start = 0
    if resume_state is not None and resume_state["stage"] == "unet":
        _load_module(unet, resume_dir / "unet.safetensors")
        _restore(resume_dir, resume_state, optimizer=opt, ema=ema, generator=run.generator, batches=batches)
        start = resume_state["stage_step"]
    history = run.loss_history.setdefault("unet", [])
    frozen = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": noise_scheduler}
    evaluator = UNetEvaluator(params, dev, frozen, train_set, heldout, diffusion)
    unet_train_start = run.train_seconds
    step_clock, cpu_clock = time.perf_counter(), time.process_time()
    final_metrics: dict = {}
    for step in range(start, params.steps):
        # -- Algorithm 1: z_0 ~ data, t ~ U{1..T}, ε ~ N(0, I); step on ‖ε − ε_θ(z_t, t, τ(y))‖²
        lr = lr_at(step, params.steps, params.warmup_steps, params.learning_rate)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batches.next().to(dev)
        if params.cache_latents:
            mean, std = lat_mean[idx], lat_std[idx]
        else:  # encode the batch now (the same draws from the generator as the cached path)
            with torch.no_grad():
                posterior = vae.encode(images[idx]).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
        z0 = (mean + std * run.randn(mean.shape)) * scaling
        t = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=run.generator).to(dev)
        noise = run.randn(z0.shape)
        drop = (torch.rand(len(idx), generator=run.generator) < params.caption_dropout).to(dev)
        context = torch.where(drop[:, None, None], empty_embed, caption_embeds[caption_index[idx]])
        z_t = diffusion.q_sample(z0, t, noise)
        with run.autocast():
            eps = unet(z_t, t, encoder_hidden_states=context).sample
        per_example = mean_flat((eps.float() - noise) ** 2)  # L_simple
        if params.min_snr_gamma is not None:  # Min-SNR-γ (Hang et al. 2023), ε-prediction form
            snr = diffusion.snr(t)
            per_example = per_example * snr.clamp(max=params.min_snr_gamma) / snr
        loss = per_example.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), params.grad_clip)
        opt.step()
        if ema is not None:
            ema.step(unet.parameters())
        # -- bookkeeping
        step_wall = time.perf_counter() - step_clock
        run.train_seconds += step_wall
        run.train_cpu_seconds += time.process_time() - cpu_clock
        hooks.step_done("unet", step_wall)
        global_step = ae_steps + step + 1
        history.append([global_step, loss.item()])
        sec = (run.train_seconds - unet_train_start) / max(1, step + 1 - start)
        run.report(
            stage="unet", global_step=global_step, stage_step=step + 1, stage_total=params.steps,
            loss=loss.item(), lr=lr, sec_per_step=sec,
        )
        last = step + 1 == params.steps
        stop = hooks.should_stop()
        if stop or last or global_step % params.checkpoint_every == 0:
            state = _unet_state(run, global_step, step + 1, scaling)
            ckpt = run.checkpoint_dir(global_step)
            modules = {"unet": unet} if base_model_dir is not None else {"unet": unet, "vae": vae}
            write_checkpoint(ckpt, state=state, modules=modules, optimizer=opt, ema=ema, generator=run.generator, batches=batches)
            if not stop and (last or params.eval_at_checkpoints):
                metrics = _evaluate_unet(run, evaluator, _ema_copy(unet, ema), ckpt, global_step)
                if last:
                    final_metrics = metrics
            run.publish(ckpt, global_step)
        if stop:
            raise TrainingStopped(f"stopped at step {global_step}")
        step_clock, cpu_clock = time.perf_counter(), time.process_time()

    if start == params.steps:  # resumed from the final checkpoint: only the evaluation is left
        ckpt = run.checkpoint_dir(ae_steps + params.steps)
        ckpt.mkdir(parents=True, exist_ok=True)
        final_metrics = _evaluate_unet(run, evaluator, _ema_copy(unet, ema), ckpt, ae_steps + params.steps)

    # ============================================================================================
    # The product: a plain diffusers StableDiffusionPipeline directory
    # ============================================================================================
    pipe = assemble_pipeline(_ema_copy(unet, ema), **frozen)
    pipeline_dir = workdir / "pipeline"
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    pipe.save_pretrained(str(pipeline_dir), safe_serialization=True)

    eval_dir = workdir / "eval"
    eval_dir.mkdir(exist_ok=True)
    artifacts = {}
    for name in ("loss_curve.png", "samples.png", "metrics.json"):
        src = run.checkpoint_dir(ae_steps + params.steps) / name
        if src.exists():
            artifacts[name] = Path(shutil.copy(src, eval_dir / name))
    (eval_dir / "loss_history.json").write_text(json.dumps(run.loss_history))
    artifacts["loss_history.json"] = eval_dir / "loss_history.json"
    metrics = dict(final_metrics)
    metrics.update(
        {
            "final_loss_unet": _tail_mean(run.loss_history.get("unet", [])),
            "final_loss_autoencoder": _tail_mean(run.loss_history.get("autoencoder", [])) if ae_steps else None,
            "train_wall_s": round(run.train_seconds, 2),
            "train_cpu_s": round(run.train_cpu_seconds, 2),
            "eval_wall_s": round(run.eval_seconds, 2),
            "scaling_factor": scaling,
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "autoencoder_params": sum(p.numel() for p in vae.parameters()),
        }
    )
    return TrainResult(pipeline_dir=pipeline_dir, metrics=metrics, artifacts=artifacts)


# ================================================================================================
# Helpers of the run
# ================================================================================================


def _tail_mean(history, n: int = 50):
    vals = [v for _, v in history[-n:]]
    return float(sum(vals) / len(vals)) if vals else None


def _time_unet_step(unet, params, channels, side, ctx_dim, device) -> float:
    """Seconds of one U-Net training step (forward + backward, no update), for the ETA of stage 1."""
    b = params.batch_size
    z, ctx = torch.zeros(b, channels, side, side, device=device), torch.zeros(b, 8, ctx_dim, device=device)
    t = torch.zeros(b, dtype=torch.long, device=device)
    seconds = []
    for _ in range(3):
        clock = time.perf_counter()
        unet(z, t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
        seconds.append(time.perf_counter() - clock)
    unet.zero_grad(set_to_none=True)
    return min(seconds[1:])


def _ema_copy(unet, ema):
    """A copy of the U-Net holding the EMA weights (or the raw weights without EMA), in eval mode."""
    model = copy.deepcopy(unet).eval().requires_grad_(False)
    if ema is not None:
        ema.copy_to(model.parameters())
    if hasattr(model, "disable_gradient_checkpointing"):
        model.disable_gradient_checkpointing()
    return model


def _unet_state(run: _Run, global_step: int, stage_step: int, scaling: float) -> dict:
    return {
        "stage": "unet",
        "global_step": global_step,
        "stage_step": stage_step,
        "params": run.params.model_dump(mode="json"),
        "loss_history": run.loss_history,
        "train_seconds": run.train_seconds,
        "train_cpu_seconds": run.train_cpu_seconds,
        "scaling_factor": scaling,
    }


def _evaluate_unet(run: _Run, evaluator: UNetEvaluator, unet, ckpt: Path, step: int) -> dict:
    clock = time.perf_counter()
    metrics = evaluator.evaluate(unet, ckpt, step, run.loss_history)
    run.eval_seconds += time.perf_counter() - clock
    return metrics


def _checkpoint_autoencoder(run: _Run, step: int, vae, opt, batches, heldout, *, evaluate: bool) -> None:
    state = {
        "stage": "autoencoder",
        "global_step": step,
        "stage_step": step,
        "params": run.params.model_dump(mode="json"),
        "loss_history": run.loss_history,
        "train_seconds": run.train_seconds,
        "train_cpu_seconds": run.train_cpu_seconds,
    }
    ckpt = run.checkpoint_dir(step)
    write_checkpoint(ckpt, state=state, modules={"vae": vae}, optimizer=opt, generator=run.generator, batches=batches)
    if evaluate and (run.params.eval_at_checkpoints or step == run.params.autoencoder_steps):
        clock = time.perf_counter()
        evaluate_autoencoder(vae, heldout, run.loss_history, ckpt, step, run.device)
        run.eval_seconds += time.perf_counter() - clock
    run.publish(ckpt, step)
