"""Train a text-to-image latent diffusion model; read it top to bottom, like nanoGPT's train.py.

:func:`train` is five stages (Rombach et al. 2022):

1. **build** the parts (:mod:`worker.model.parts`) and find the checkpoint to resume from;
2. **train the autoencoder** (skipped with a base model): an ``AutoencoderKL`` learns to compress an
   image x (3×R×R in [−1, 1]) to a latent z (C×R/f×R/f) and back: per-pixel MSE of the
   reconstruction plus ``kl_weight`` × KL(q(z|x) ‖ N(0, I)) per latent element (a small KL keeps the
   latent space tidy, not a VAE prior);
3. **cache the latents**: the autoencoder is frozen, the training set is encoded once (posterior
   means and std-devs), latents are scaled to unit variance (``scaling_factor`` = 1/std, saved in
   the VAE config as diffusers expects), and τ(y), the frozen text encoder's token states, are
   computed once per distinct caption, exactly as ``StableDiffusionPipeline.encode_prompt`` does,
   so a plain-diffusers user samples what was trained;
4. **train the U-Net** (``UNet2DConditionModel``, ResNet blocks with cross-attention in the down and
   up halves) to predict ε_θ(z_t, t, τ(y)) with L_simple (Algorithm 1), on those latents; a share
   ``caption_dropout`` of captions is replaced by the empty caption so that classifier-free
   guidance works;
5. **export** a StableDiffusionPipeline-format directory (unet = EMA weights, vae, text_encoder,
   tokenizer, scheduler = DDPMScheduler with linear β 1e-4..0.02, T = 1000, clip_sample=False) that
   ``diffusers.StableDiffusionPipeline.from_pretrained(dir)`` loads with no ldmq code, plus the final
   evaluation's artifacts and metrics, and the sampling defaults (scheduler, steps, guidance) that
   evaluation chose (:func:`worker.model.train_eval.choose_guidance`).

With ``base_model`` (a local diffusers StableDiffusionPipeline directory) stage 2 is skipped, and
stage 4 trains that model's U-Net, with its own autoencoder, text encoder and noise schedule. With
``method`` "lora" stage 4 trains only low-rank adapters on that U-Net (:mod:`worker.model.lora`),
checkpoints hold the adapter's weights, and stage 5 exports the adapter alone.

Both training stages run through one runner, :meth:`_Run.run_stage`, which owns the step
bookkeeping: learning-rate schedule, step timing, progress reports, stop requests, checkpoints
(every ``checkpoint_every`` global steps, at a stage's last step, and when asked to stop; after a
periodic one the run may be asked to yield there: a preemption),
evaluation at checkpoints. A stage (:class:`AutoencoderStage`, :class:`UNetStage`) only computes one
step's loss and takes the optimiser step, and says what to checkpoint and how to evaluate.

Optimisation as diffusers' ``train_text_to_image.py``: AdamW, linear warm-up then cosine decay,
gradient clipping, EMA weights (``diffusers.training_utils.EMAModel``), bf16 autocast on GPU, optional
gradient checkpointing, optional Min-SNR-γ weighting. All randomness of training (batch order, t, ε,
posterior samples, caption dropout) comes from one seeded ``torch.Generator`` whose state is part of
every checkpoint, so a resumed run reproduces the uninterrupted one exactly (on the same device and
thread count): the draws below happen in a fixed order, which must not change.

Checkpoints are safetensors and JSON, never pickle (:mod:`worker.model.checkpoint`); the evaluation
stored with them is :mod:`worker.model.train_eval`.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from shared.train_schema import TrainParams
from worker.model.checkpoint import check_resumable, load_module_weights, restore_training_state, read_checkpoint_state, write_checkpoint
from worker.model.data import BatchOrder, ImageCaptionDataset
from worker.model.diffusion import GaussianDiffusion
from worker.model.diffusion import train_step as diffusion_train_step
from worker.model.lora import AdapterWeights, add_lora, save_adapter, trained_parameters
from worker.model.distributed import World, launch
from worker.model.parts import assemble_pipeline, encode_captions, encode_posteriors, make_autoencoder, make_unet
from worker.model.pipelines import load_pipeline_dir
from worker.model.schedulers import make_noise_scheduler, make_scheduler_like
from worker.model.train_eval import UNetEvaluator, evaluate_autoencoder

__all__ = [
    "BatchOrder", "TrainHooks", "TrainResult", "TrainingStopped", "encode_captions", "lr_at", "make_autoencoder",
    "make_unet", "train", "train_distributed",
]


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
    evaluated: Callable[[str, float], None] = _noop  # (stage, wall seconds of one checkpoint's evaluation)
    should_stop: Callable[[], bool] = lambda: False
    # Asked after each periodic checkpoint (not a stage's last step): stop here, the checkpoint
    # just written being where the job resumes (a preemption: no step lost, no extra checkpoint).
    yield_at_checkpoint: Callable[[], bool] = lambda: False
    save_checkpoint: Callable[[int, Path], None] = _noop
    latest_checkpoint: Callable[[], Path | None] = lambda: None


@dataclass
class TrainResult:
    pipeline_dir: Path  # a StableDiffusionPipeline folder, or (method lora) a diffusers LoRA adapter folder
    metrics: dict
    artifacts: dict[str, Path] = field(default_factory=dict)

    @property
    def sampling_defaults(self) -> dict | None:
        """{scheduler, steps, guidance_scale} the final evaluation chose (None if it did not run)."""
        return self.metrics.get("sampling_defaults")


def train(
    params: TrainParams,
    *,
    workdir: Path,
    dataset: ImageCaptionDataset,
    base_model_dir: Path | None,
    hooks: TrainHooks,
    device: str = "cpu",
    progress_every: int = 10,
    world_size: int = 1,
) -> TrainResult:
    """Train (or resume, from ``hooks.latest_checkpoint()``) and return the pipeline and its metrics.

    With ``world_size`` > 1 the job trains data-parallel on that many ranks (see
    :func:`train_distributed`); 1 is the plain loop below.

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
    if world_size > 1:  # [ddp]
        return train_distributed(params, workdir, dataset, base_model_dir, hooks, device, progress_every, world_size)
    run = _Run(params, workdir, hooks, device, progress_every)
    return _train_stages(run, dataset, base_model_dir)


def _train_stages(run: _Run, dataset: ImageCaptionDataset, base_model_dir: Path | None) -> TrainResult | None:
    """Stages 1–5 in ``run``'s process; on a rank other than 0, stages 1–4 only (None)."""
    params = run.params
    torch.manual_seed(params.seed)  # weight initialisation
    resume = _resume_point(run)
    data = _Data.split(dataset, params, run.device)  # a held-out split for the VLB
    parts = build(params, base_model_dir, run.device)

    if not parts.pretrained:
        train_autoencoder(run, parts, data, resume)
    parts.vae.eval().requires_grad_(False)

    latents = cache_latents(parts, data, run.device)
    unet = UNetStage(run, parts, latents, data, resume)
    final_metrics = run.run_stage(unet)
    if not run.world.is_main:  # [ddp] rank 0 evaluates and exports
        return None
    if unet.start == unet.steps:  # resumed from the final checkpoint: only its evaluation is left
        final_metrics = run.evaluate(unet, unet.first_step + unet.steps)

    return export(run, parts, unet, final_metrics)


# ================================================================================================
# Stage 1: build the parts, find the resume point
# ================================================================================================


@dataclass
class _Resume:
    """The checkpoint a run continues from: its directory and its ``state.json``."""

    dir: Path
    state: dict

    @property
    def stage(self) -> str:
        return self.state["stage"]


def _resume_point(run: _Run) -> _Resume | None:
    """The caller's latest checkpoint, checked against the params; the run's loss history and clocks
    continue from it."""
    ckpt = run.hooks.latest_checkpoint()
    if ckpt is None:
        return None
    state = read_checkpoint_state(ckpt)
    check_resumable(state, run.params)
    run.loss_history = state["loss_history"]
    run.train_seconds = state.get("train_seconds", 0.0)
    run.train_cpu_seconds = state.get("train_cpu_seconds", 0.0)
    run.last_step = state["global_step"]
    return _Resume(Path(ckpt), state)


@dataclass
class _Data:
    """The training split (its images (N, 3, R, R) already on the device) and the held-out split."""

    train: ImageCaptionDataset
    heldout: ImageCaptionDataset
    images: torch.Tensor

    @classmethod
    def split(cls, dataset: ImageCaptionDataset, params: TrainParams, device: torch.device) -> _Data:
        train_set, heldout = dataset.split(params.holdout_fraction, seed=params.seed)
        return cls(train_set, heldout, train_set.images.to(device))


@dataclass
class _Parts:
    """The models of a run. ``scheduler`` is the training noise schedule (DDPM) the pipeline ships;
    ``diffusion`` is the same schedule as the q(z_t | z_0) and VLB math of :mod:`worker.model.diffusion`."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    diffusion: GaussianDiffusion
    pretrained: bool  # from a base model: only the U-Net trains

    def frozen(self) -> dict:
        """The parts the U-Net stage does not train, as :func:`assemble_pipeline` takes them."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "scheduler": self.scheduler}


def build(params: TrainParams, base_model_dir: Path | None, dev: torch.device) -> _Parts:
    """The base model's parts, or new ones: the packaged text encoder, a new autoencoder and U-Net
    (initialised from torch's global generator, seeded by :func:`train`: keep this order) and the
    DDPM noise schedule. The text encoder is frozen from the start."""
    if base_model_dir is not None:
        # The one loader: the pipeline check (plain paths, safetensors only, no code, known classes),
        # use_safetensors and local files only, in float32 for training.
        base = load_pipeline_dir(base_model_dir, "cpu", dtype="float32")
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
    if unet is None:
        unet = make_unet(params, in_channels=vae.config.latent_channels, sample_size=_latent_side(params, vae),
                         cross_attention_dim=text_encoder.config.hidden_size)
    if params.method == "lora":
        add_lora(unet, params)  # its A drawn from the global generator seeded by train(): keep this order
    unet.to(dev)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    return _Parts(tokenizer, text_encoder, vae, unet, noise_scheduler, diffusion, pretrained=base_model_dir is not None)


def _latent_side(params: TrainParams, vae) -> int:
    """R / f: the autoencoder halves the side between consecutive blocks."""
    return params.resolution // (2 ** (len(vae.config.block_out_channels) - 1))


# ================================================================================================
# What the runner needs of a training stage
# ================================================================================================


class _Stage:
    """One optimisation stage as :meth:`_Run.run_stage` sees it. A subclass sets the attributes and
    implements :meth:`train_step`, :meth:`modules` and :meth:`evaluate`."""

    name: str  # "autoencoder" or "unet": progress reports, loss history, checkpoints
    steps: int  # the stage's length; its learning rate runs lr_at(step, steps, warmup, peak_lr)
    warmup: int
    peak_lr: float
    first_step: int  # global steps before this stage's first (its step s is global step first_step + s + 1)
    start: int = 0  # the stage step to start at (> 0 when resumed)
    later_seconds: float = 0.0  # estimated seconds of the stages after this one (for the ETA)
    optimizer: torch.optim.Optimizer
    batches: BatchOrder
    ema = None

    def train_step(self) -> torch.Tensor:
        """Compute the next step's loss and take the optimiser step; return the loss (a scalar)."""
        raise NotImplementedError

    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose weights a checkpoint of this stage holds, by file name."""
        raise NotImplementedError

    def state(self) -> dict:
        """This stage's own entries in ``state.json``."""
        return {}

    def evaluate(self, ckpt: Path, global_step: int) -> dict:
        """Write the evaluation of the current weights into checkpoint ``ckpt``; return its metrics."""
        raise NotImplementedError

    def _resume(self, run: _Run, resume: _Resume, modules: dict[str, torch.nn.Module]) -> None:
        """Continue from a checkpoint of this stage: the weights of ``modules``, optimiser, EMA,
        random state, batch order."""
        for name, module in modules.items():
            load_module_weights(module, resume.dir / f"{name}.safetensors")
        restore_training_state(resume.dir, resume.state, optimizer=self.optimizer, ema=self.ema, generator=run.generator,
                 batches=self.batches)
        self.start = resume.state["stage_step"]


def _optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters, grad_clip: float | None) -> None:
    """One optimiser step on ``loss``: gradients, clipped to global norm ``grad_clip``, then AdamW."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


# ================================================================================================
# Stage 2: the autoencoder
# ================================================================================================


def train_autoencoder(run: _Run, parts: _Parts, data: _Data, resume: _Resume | None) -> None:
    """Train the autoencoder, or take its weights from a checkpoint of the U-Net stage (it was done)."""
    if resume is not None and resume.stage == "unet":
        load_module_weights(parts.vae, resume.dir / "vae.safetensors")
        return
    # (the ETA is rank 0's to report)
    later_seconds = run.params.steps * _time_unet_step(parts, run.params, run.device) if run.world.is_main else 0.0
    run.run_stage(AutoencoderStage(run, parts.vae, data, resume, later_seconds=later_seconds))


class AutoencoderStage(_Stage):
    """Stage 2: the autoencoder learns x ≈ D(z), z ~ q(z|x) = N(μ(x), σ(x)²) (reparameterised, one
    sample), with loss = MSE(D(z), x) + ``kl_weight`` · KL(q(z|x) ‖ N(0, I)) / (C·h·w)."""

    name = "autoencoder"

    def __init__(self, run: _Run, vae, data: _Data, resume: _Resume | None, *, later_seconds: float):
        p = run.params
        self.run, self.vae, self.data = run, vae, data
        self.steps, self.warmup, self.peak_lr = p.autoencoder_steps, p.autoencoder_warmup_steps, p.autoencoder_learning_rate
        self.first_step, self.later_seconds = 0, later_seconds
        vae.train().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            vae.parameters(), lr=p.autoencoder_learning_rate, weight_decay=p.weight_decay, fused=True
        )
        self.batches = BatchOrder(len(data.train), p.batch_size, run.generator)
        if resume is not None:  # a checkpoint of this stage
            self._resume(run, resume, {"vae": vae})
        side = _latent_side(p, vae)
        self.latent_shape = (vae.config.latent_channels, side, side)
        self.net = run.world.wrap(AutoencoderForward(vae))  # [ddp] DDP on several ranks, else the module

    def train_step(self) -> torch.Tensor:
        run, vae = self.run, self.vae
        x = self.data.images[self.batches.next().to(run.device)]  # (B, 3, R, R)
        batch = len(x)
        noise = run.randn((batch, *self.latent_shape))  # ε′ of z = μ + σ ε′, (B, C, h, w)
        x, noise = run.world.shard(x, noise)  # [ddp] this rank's slice of the global batch
        with run.autocast():
            recon, posterior = self.net(x, noise)
        mse = F.mse_loss(recon.float(), x)
        kl = (posterior.kl() / posterior.mean[0].numel()).mean()  # per latent element
        loss = run.world.weigh(mse + run.params.kl_weight * kl, len(x), batch)  # [ddp] one rank: unchanged
        _optimise(loss, self.optimizer, vae.parameters(), run.params.grad_clip)
        return loss

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}

    def evaluate(self, ckpt: Path, global_step: int) -> dict:
        return evaluate_autoencoder(self.vae, self.data.heldout, self.run.loss_history, ckpt, global_step, self.run.device)


class AutoencoderForward(torch.nn.Module):
    """Encode, take the reparameterised sample z = μ + σ ε′ and decode, as one ``forward`` (the
    ops of the autoencoder step, in its order): ``DistributedDataParallel`` averages the gradients
    of what its wrapper's forward ran, and ``vae.encode``/``decode`` are not the VAE's forward."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise  # (B, C, h, w)
        return self.vae.decode(z).sample, posterior


def _time_unet_step(parts: _Parts, params: TrainParams, device) -> float:
    """Seconds of one U-Net training step (forward + backward, no update), for the ETA of stage 2."""
    b, side = params.batch_size, _latent_side(params, parts.vae)
    z = torch.zeros(b, parts.vae.config.latent_channels, side, side, device=device)
    ctx = torch.zeros(b, 8, parts.text_encoder.config.hidden_size, device=device)
    t = torch.zeros(b, dtype=torch.long, device=device)
    seconds = []
    for _ in range(3):
        clock = time.perf_counter()
        parts.unet(z, t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
        seconds.append(time.perf_counter() - clock)
    parts.unet.zero_grad(set_to_none=True)
    return min(seconds[1:])


# ================================================================================================
# Stage 3: cache latents and caption embeddings
# ================================================================================================


@dataclass
class LatentCache:
    """What the U-Net stage reads instead of running the frozen encoders every step."""

    mean: torch.Tensor  # (N, C, h, w) posterior means μ(x) of the training images, unscaled
    std: torch.Tensor  # (N, C, h, w) posterior std-devs σ(x)
    scaling: float  # the VAE's scaling_factor: z = scaling · (μ + σ ε) has about unit variance
    caption_index: torch.Tensor  # (N,) int64: image i's caption is row caption_index[i] of caption_embeds
    caption_embeds: torch.Tensor  # (K, L, D): τ(y) of the K distinct captions, sorted
    empty_embed: torch.Tensor  # (1, L, D): τ("") for classifier-free guidance


def cache_latents(parts: _Parts, data: _Data, dev: torch.device) -> LatentCache:
    """Encode the training set through the frozen autoencoder and text encoder once.

    Without a base model this also fixes ``scaling_factor`` = 1/√Var(z) (saved in the VAE config,
    as diffusers expects), where the posterior samples' variance is Var(z) = Var(μ) + E[σ²]. The
    posteriors are encoded even with ``cache_latents=false``: the scaling factor needs them."""
    lat_mean, lat_std = encode_posteriors(parts.vae, data.images)
    if not parts.pretrained:
        var = lat_mean.var().item() + (lat_std**2).mean().item()
        parts.vae.register_to_config(scaling_factor=1.0 / math.sqrt(var))
    distinct = sorted(set(data.train.captions))
    lookup = {c: i for i, c in enumerate(distinct)}
    caption_index = torch.tensor([lookup[c] for c in data.train.captions], device=dev)
    caption_embeds = encode_captions(parts.tokenizer, parts.text_encoder, distinct, dev)
    empty_embed = encode_captions(parts.tokenizer, parts.text_encoder, [""], dev)
    return LatentCache(lat_mean, lat_std, float(parts.vae.config.scaling_factor), caption_index, caption_embeds,
                       empty_embed)


# ================================================================================================
# Stage 4: the U-Net
# ================================================================================================


class UNetStage(_Stage):
    """Stage 4: the U-Net learns ε_θ(z_t, t, τ(y)) by Algorithm 1 (Ho et al. 2020 on latents):
    z_0 = scaling · (μ + σ ε′), t ~ U{1..T} (0..T−1 here), ε ~ N(0, I), z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε, and
    L_simple = ‖ε − ε_θ(z_t, t, τ(y))‖², optionally weighted by Min-SNR-γ. Fused AdamW, and an EMA
    of the weights (what is evaluated and exported)."""

    name = "unet"

    def __init__(self, run: _Run, parts: _Parts, latents: LatentCache, data: _Data, resume: _Resume | None):
        p = run.params
        self.run, self.parts, self.latents, self.data = run, parts, latents, data
        self.steps, self.warmup, self.peak_lr = p.steps, p.warmup_steps, p.learning_rate
        self.first_step = 0 if parts.pretrained else p.autoencoder_steps
        unet = parts.unet.train()
        # Every U-Net weight, or only the adapter's (method lora): what the optimiser and EMA hold.
        self.trained_names, self.trained = trained_parameters(unet, p)
        # Fused AdamW and a foreach EMA update: one kernel over all parameters instead of a loop of
        # small ops (~10 % of a U-Net step on the 2-core CPU, interleaved runs: docs/benchmarks.md).
        self.optimizer = torch.optim.AdamW(self.trained, lr=p.learning_rate, weight_decay=p.weight_decay, fused=True)
        if p.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trained, decay=p.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                                power=p.ema_power, foreach=True)
        self.batches = BatchOrder(len(data.train), p.batch_size, run.generator)
        if resume is not None and resume.stage == "unet":
            self._resume(run, resume, self._unet_modules())  # the autoencoder came back in stage 2
        self.net = run.world.wrap(unet)  # [ddp] DDP on several ranks, else the U-Net itself
        self.evaluator = UNetEvaluator(p, run.device, parts.frozen(), data.train, data.heldout, parts.diffusion)

    def train_step(self) -> torch.Tensor:
        """Algorithm 1 (:func:`worker.model.diffusion.train_step`) on the next batch; the draws after
        the batch's are t, ε, then the caption dropout (their order is part of a checkpoint's
        reproducibility), then the EMA update."""
        run, p, unet = self.run, self.run.params, self.parts.unet
        idx, z0, context = self._batch()

        def eps_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            drop = (torch.rand(len(idx), generator=run.generator) < p.caption_dropout).to(run.device)
            cond = torch.where(drop[:, None, None], self.latents.empty_embed, context)  # (B, L, D)
            z_t, t, cond = run.world.shard(z_t, t, cond)  # [ddp] this rank's slice of the global batch
            with run.autocast():
                return self.net(z_t, t, encoder_hidden_states=cond).sample

        loss = diffusion_train_step(
            self.parts.diffusion, eps_fn, z0, generator=run.generator, min_snr_gamma=p.min_snr_gamma,
            gradient_step=lambda loss: _optimise(loss, self.optimizer, unet.parameters(), p.grad_clip),
            shard=run.world.shard, weigh=run.world.weigh,  # [ddp] one rank: both leave the numbers as they are
        )
        if self.ema is not None:
            self.ema.step(self.trained)
        return loss

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch: indices (B,), z_0 (B, C, h, w) sampled from the posteriors and scaled, and
        the captions' τ(y) (B, L, D). Without ``cache_latents`` the batch is encoded now, with the
        same draws from the generator as the cached path."""
        lat = self.latents
        idx = self.batches.next().to(self.run.device)
        if self.run.params.cache_latents:
            mean, std = lat.mean[idx], lat.std[idx]
        else:
            with torch.no_grad():
                posterior = self.parts.vae.encode(self.data.images[idx]).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
        z0 = (mean + std * self.run.randn(mean.shape)) * lat.scaling
        return idx, z0, lat.caption_embeds[lat.caption_index[idx]]

    def _unet_modules(self) -> dict:
        """What a checkpoint holds of the U-Net: its weights, or (method lora) the adapter's only."""
        if self.run.params.method == "lora":
            return {"unet_lora": AdapterWeights(self.parts.unet, self.trained_names)}
        return {"unet": self.parts.unet}

    def modules(self) -> dict[str, torch.nn.Module]:
        if self.parts.pretrained:
            return self._unet_modules()
        return {**self._unet_modules(), "vae": self.parts.vae}

    def state(self) -> dict:
        return {"scaling_factor": self.latents.scaling}

    def averaged(self):
        """The U-Net to evaluate and export: a copy with the EMA weights, in eval mode."""
        return _ema_copy(self.parts.unet, self.ema, self.trained_names)

    def evaluate(self, ckpt: Path, global_step: int) -> dict:
        final = global_step == self.first_step + self.steps  # the model's sampling defaults are chosen here
        return self.evaluator.evaluate(self.averaged(), ckpt, global_step, self.run.loss_history, final=final)


def _ema_copy(unet, ema, names: list[str]):
    """A copy of the U-Net holding the EMA weights of its trained parameters ``names`` (or the raw
    weights without EMA), in eval mode."""
    model = copy.deepcopy(unet).eval().requires_grad_(False)
    if ema is not None:
        params = dict(model.named_parameters())
        ema.copy_to([params[n] for n in names])
    if hasattr(model, "disable_gradient_checkpointing"):
        model.disable_gradient_checkpointing()
    return model


# ================================================================================================
# Stage 5: export a plain diffusers StableDiffusionPipeline directory
# ================================================================================================


def export(run: _Run, parts: _Parts, unet: UNetStage, final_metrics: dict) -> TrainResult:
    """Save the pipeline (EMA U-Net) to ``workdir/pipeline`` (method lora: the EMA adapter alone, in
    diffusers' LoRA format, to ``workdir/adapter``), copy the final checkpoint's evaluation and the
    loss history to ``workdir/eval``, and add the run's figures to the final metrics."""
    lora = run.params.method == "lora"
    pipeline_dir = run.workdir / ("adapter" if lora else "pipeline")
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    if lora:
        save_adapter(unet.averaged(), pipeline_dir)
    else:
        assemble_pipeline(unet.averaged(), **parts.frozen()).save_pretrained(str(pipeline_dir), safe_serialization=True)

    eval_dir = run.workdir / "eval"
    eval_dir.mkdir(exist_ok=True)
    artifacts = {}
    for name in ("loss_curve.png", "samples.png", "metrics.json"):
        src = run.checkpoint_dir(unet.first_step + unet.steps) / name
        if src.exists():
            artifacts[name] = Path(shutil.copy(src, eval_dir / name))
    (eval_dir / "loss_history.json").write_text(json.dumps(run.loss_history))
    artifacts["loss_history.json"] = eval_dir / "loss_history.json"
    metrics = dict(final_metrics)
    metrics.update(
        {
            "final_loss_unet": _tail_mean(run.loss_history.get("unet", [])),
            "final_loss_autoencoder": _tail_mean(run.loss_history.get("autoencoder", [])) if unet.first_step else None,
            "train_wall_s": round(run.train_seconds, 2),
            "train_cpu_s": round(run.train_cpu_seconds, 2),
            "eval_wall_s": round(run.eval_seconds, 2),
            "scaling_factor": unet.latents.scaling,
            "unet_params": sum(p.numel() for p in parts.unet.parameters()),
            "trained_params": sum(p.numel() for p in unet.trained),
            "autoencoder_params": sum(p.numel() for p in parts.vae.parameters()),
            "train_world_size": run.world.size,
        }
    )
    return TrainResult(pipeline_dir=pipeline_dir, metrics=metrics, artifacts=artifacts)


def _tail_mean(history, n: int = 50):
    vals = [v for _, v in history[-n:]]
    return float(sum(vals) / len(vals)) if vals else None


# ================================================================================================
# Across devices: the same stages on N ranks (worker.model.distributed)
# ================================================================================================


@dataclass
class RankEnd:
    """How one rank's run ended ("done" or "stopped", at which global step); rank 0's result."""

    how: str
    global_step: int
    result: TrainResult | None = None


def train_distributed(params: TrainParams, workdir: Path, dataset: ImageCaptionDataset, base_model_dir: Path | None,
                      hooks: TrainHooks, device: str, progress_every: int, world_size: int) -> TrainResult:
    """:func:`train` on ``world_size`` data-parallel ranks, this process being rank 0 (the only
    one that calls ``hooks``). The checkpoint to resume from is fetched once, here; every rank
    reads that local copy. Raises :class:`TrainingStopped` once every rank stopped at the same
    step, RuntimeError if they did not (or a rank failed)."""
    resume_dir = hooks.latest_checkpoint()
    main_hooks = replace(hooks, latest_checkpoint=lambda: resume_dir)
    args = (params, workdir, dataset, base_model_dir, resume_dir, progress_every)
    ends = launch(world_size, device, train_rank, args, main_kwargs={"hooks": main_hooks})
    if len({(end.how, end.global_step) for end in ends}) != 1:
        raise RuntimeError("the ranks ended apart: " + ", ".join(
            f"rank {r} {end.how} at step {end.global_step}" for r, end in enumerate(ends)))
    if ends[0].how == "stopped":
        raise TrainingStopped(f"stopped at step {ends[0].global_step}")
    return ends[0].result


def train_rank(world: World, params: TrainParams, workdir: Path, dataset: ImageCaptionDataset,
               base_model_dir: Path | None, resume_dir: Path | None, progress_every: int,
               hooks: TrainHooks | None = None) -> RankEnd:
    """What every rank runs (:func:`worker.model.distributed.launch`): the stages, on its device.
    Ranks other than 0 have no hooks but the checkpoint to resume from."""
    hooks = hooks or TrainHooks(latest_checkpoint=lambda: resume_dir)
    run = _Run(params, Path(workdir), hooks, str(world.device), progress_every, world=world)
    try:
        result = _train_stages(run, dataset, base_model_dir)
    except TrainingStopped:
        return RankEnd("stopped", run.last_step)
    return RankEnd("done", run.last_step, result)


# ================================================================================================
# The runner: one loop for every stage
# ================================================================================================


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate for 0-based ``step``: linear warm-up over ``warmup`` steps, then cosine to 0
    (as diffusers' ``get_cosine_schedule_with_warmup``)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Run:
    """What every stage shares: params, device, hooks, the training generator, clocks, loss history,
    checkpoint bookkeeping; and :meth:`run_stage`, the one training loop."""

    def __init__(self, params: TrainParams, workdir: Path, hooks: TrainHooks, device: str, progress_every: int,
                 world: World | None = None):
        self.params, self.workdir, self.hooks, self.device = params, workdir, hooks, torch.device(device)
        self.progress_every = progress_every
        self.world = world or World.solo(self.device)  # [ddp] this process's rank; one rank by default
        self.last_step = 0  # the last global step run (or resumed at)
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
        """N(0, I) of ``shape`` from the training generator (drawn on the CPU: the same numbers on
        every device), moved to the device."""
        return torch.randn(shape, generator=self.generator).to(self.device)

    def run_stage(self, stage: _Stage) -> dict | None:
        """Run ``stage`` from ``stage.start`` to its end; return the evaluation of its last step (None
        when no step was left). Per step: set the learning rate, let the stage take its step (timed:
        wall and process CPU), record the loss, report progress, ask whether to stop, and at a
        checkpoint step write, evaluate and publish the checkpoint, then ask whether to yield there.
        Raises :class:`TrainingStopped` after the checkpoint of the step at which
        ``hooks.should_stop()`` said so, or after a periodic checkpoint when
        ``hooks.yield_at_checkpoint()`` did."""
        history = self.loss_history.setdefault(stage.name, [])
        seconds_before = self.train_seconds
        metrics = None
        step_clock, cpu_clock = time.perf_counter(), time.process_time()
        for step in range(stage.start, stage.steps):
            lr = lr_at(step, stage.steps, stage.warmup, stage.peak_lr)
            for group in stage.optimizer.param_groups:
                group["lr"] = lr
            loss = self.world.mean_loss(stage.train_step())  # [ddp] the global batch's loss on every rank
            step_wall = time.perf_counter() - step_clock
            self.train_seconds += step_wall
            self.train_cpu_seconds += time.process_time() - cpu_clock
            self.hooks.step_done(stage.name, step_wall)
            global_step = self.last_step = stage.first_step + step + 1
            history.append([global_step, loss.item()])
            self.report(
                stage=stage.name, global_step=global_step, stage_step=step + 1, stage_total=stage.steps,
                loss=loss.item(), lr=lr, sec_per_step=(self.train_seconds - seconds_before) / (step + 1 - stage.start),
                later_seconds=stage.later_seconds,
            )
            last = step + 1 == stage.steps
            stop = self.world.agree(self.hooks.should_stop())  # [ddp] rank 0 decides for every rank
            if stop or last or global_step % self.params.checkpoint_every == 0:
                evaluate = not stop and (last or self.params.eval_at_checkpoints)
                ckpt_metrics = self.checkpoint(stage, global_step, step + 1, evaluate=evaluate)
                if last:
                    metrics = ckpt_metrics
                elif not stop:  # a periodic checkpoint: every rank asks at the same step
                    stop = self.world.agree(self.hooks.yield_at_checkpoint())  # [ddp] rank 0 decides
            if stop:
                raise TrainingStopped(f"stopped at step {global_step}")
            step_clock, cpu_clock = time.perf_counter(), time.process_time()
        return metrics

    def checkpoint(self, stage: _Stage, global_step: int, stage_step: int, *, evaluate: bool) -> dict | None:
        """Write the checkpoint of ``global_step`` (before any evaluation: the random state saved is
        the training's), evaluate into it when asked, and publish it; return the evaluation. Rank 0
        alone writes (the ranks' weights and state are the same)."""
        if not self.world.is_main:  # [ddp]
            return None
        state = {
            "stage": stage.name,
            "global_step": global_step,
            "stage_step": stage_step,
            "params": self.params.model_dump(mode="json"),
            "loss_history": self.loss_history,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            **stage.state(),
        }
        ckpt = self.checkpoint_dir(global_step)
        write_checkpoint(ckpt, state=state, modules=stage.modules(), optimizer=stage.optimizer, ema=stage.ema,
                         generator=self.generator, batches=stage.batches)
        metrics = self.evaluate(stage, global_step) if evaluate else None
        self.publish(ckpt, global_step)
        return metrics

    def evaluate(self, stage: _Stage, global_step: int) -> dict:
        """The stage's evaluation into the checkpoint directory of ``global_step``, timed apart from
        training."""
        clock = time.perf_counter()
        ckpt = self.checkpoint_dir(global_step)
        ckpt.mkdir(parents=True, exist_ok=True)
        metrics = stage.evaluate(ckpt, global_step)
        seconds = time.perf_counter() - clock
        self.eval_seconds += seconds
        self.hooks.evaluated(stage.name, seconds)
        return metrics

    def report(self, *, stage, global_step, stage_step, stage_total, loss, lr, sec_per_step, later_seconds=0.0):
        """Progress to ``hooks.progress`` every ``progress_every`` stage steps and at a stage's end."""
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
