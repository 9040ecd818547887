"""``TrainParams``: the body of ``POST /v1/jobs/train`` (pydantic v2, no torch).

Contract fields: ``dataset``, ``base_model``, ``steps``, ``batch_size``, ``learning_rate``, ``seed``;
everything else has a default. ``{"dataset": "builtin:digits"}`` alone gives the configuration
measured against the quality bar on 2 CPU cores (see ``ldmq/bench/train.py`` and
docs/benchmarks.md): an AutoencoderKL (16, 32, 64) with 2 latent channels (32×32 → 2×8×8, KL
weight 1e-4, 200 steps), then a 1.3M-parameter U-Net (32, 64) with cross-attention on the frozen
text encoder's token states, 1,400 steps of AdamW 2e-3 with 100 warm-up steps and cosine decay,
Min-SNR-5 weighting, gradient clipping 1.0, EMA and 10 % empty captions: under 10 minutes on the
2-core development VM, for 0.98 conditional accuracy and a Fréchet distance 1.6× the real-vs-real
floor (DPM-Solver++ 20, guidance 2). The autoencoder's first block is 16 wide, not 32: each of its
steps costs 2.2× less (the images are 8×8 digits upscaled) for about the same reconstruction.
Min-SNR-5 and the 2e-3 learning rate lift conditional accuracy at low guidance (0.935 → 0.98 at
w = 2) against the notes' recipe (AdamW 1e-3, plain L_simple). Budgets are step counts, not wall
time, so that a run is reproducible. Unknown fields are rejected (422).

``method`` "lora" fine-tunes a ``base_model`` with low-rank adapters on its U-Net instead of every
weight (Hu et al. 2021, as diffusers' ``train_text_to_image_lora.py``): ΔW = B A with rank r, scaled
by α / r; the stored model is the adapter alone and names its base (docs/model.md "LoRA").
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.catalog import BUILTIN_DATASETS, DEFAULT_SCHEDULER, SchedulerName


# How a train job changes the weights: "full" trains the U-Net (and, without a base model, the
# autoencoder); "lora" trains low-rank adapters on a base model's U-Net only.
TrainMethod = Literal["full", "lora"]
TRAIN_METHODS: tuple[str, ...] = get_args(TrainMethod)
# U-Net modules a LoRA adapter may wrap (peft matches a name as the module's full name or its last
# parts): the attention projections, the transformer's feed-forward, the ResNet convolutions and
# time-embedding projections. Each round-trips through diffusers' save_lora_weights /
# load_lora_weights to the same U-Net output (tests/worker/test_lora.py); proj_in/proj_out do not
# in diffusers 0.42 (their 1×1-conv LoRA loads with other weights), so they are not offered.
LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)
# The U-Net attention projections, as diffusers' train_text_to_image_lora.py targets.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_target_modules")


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ---- contract fields --------------------------------------------------------------------
    dataset: str = Field(
        min_length=1, max_length=200, description='A dataset id from POST /v1/datasets, or "builtin:digits".'
    )
    base_model: str | None = Field(
        default=None,
        max_length=200,
        description="A model id to fine-tune (only its U-Net is trained); null trains autoencoder and U-Net.",
    )
    steps: int = Field(default=1400, ge=1, le=1_000_000, description="U-Net optimisation steps.")
    batch_size: int = Field(default=64, ge=1, le=4096)
    learning_rate: float = Field(default=2e-3, gt=0, le=1.0, description="Peak U-Net learning rate (AdamW).")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    # ---- method: full fine-tuning or LoRA adapters on a base model -------------------------
    method: TrainMethod = Field(
        default="full", description='"full": train every U-Net weight; "lora": low-rank adapters on base_model\'s U-Net.'
    )
    lora_rank: int = Field(default=4, ge=1, le=256, description="r: the rank of each adapter's ΔW = B A (method lora).")
    lora_alpha: float | None = Field(
        default=None, gt=0, le=4096, description="α: ΔW is scaled by α / r; default: α = r (method lora)."
    )
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1, max_length=len(LORA_TARGET_MODULES),
        description="U-Net modules that get adapters (method lora); default: the attention projections.",
    )

    # ---- autoencoder stage (not used with base_model) --------------------------------------
    autoencoder_steps: int = Field(default=200, ge=1, le=1_000_000)
    autoencoder_learning_rate: float = Field(default=2e-3, gt=0, le=1.0)
    autoencoder_warmup_steps: int = Field(default=30, ge=0)
    autoencoder_channels: list[int] = Field(
        default=[16, 32, 64], min_length=2, max_length=5, description="Block widths; the image is downsampled 2× per block after the first."
    )
    latent_channels: int = Field(default=2, ge=1, le=16)
    kl_weight: float = Field(
        default=1e-4, ge=0, le=1.0, description="Weight of KL(q(z|x) ‖ N(0, I)) per latent element against per-pixel MSE."
    )

    # ---- U-Net --------------------------------------------------------------------------------
    unet_channels: list[int] = Field(default=[32, 64], min_length=1, max_length=4)
    layers_per_block: int = Field(default=1, ge=1, le=4)
    attention_heads: int = Field(
        default=2, ge=1, le=64, description="Heads of every U-Net attention layer (2: head size 16 and 32, 20 % faster on CPU than 8)."
    )
    text_time_embedding: bool = Field(
        default=False,
        description="Also pool the caption's token states (attention pooling) into the time embedding that "
        "every ResNet block receives (diffusers addition_embed_type='text', as DeepFloyd IF); cross-attention stays.",
    )
    resolution: int = Field(default=32, ge=8, le=1024, description="Training image side; a multiple of 8.")

    # ---- optimisation -----------------------------------------------------------------------
    warmup_steps: int = Field(default=100, ge=0, description="Linear warm-up, then cosine decay to 0 (each stage).")
    weight_decay: float = Field(default=0.01, ge=0, le=1.0)
    grad_clip: float | None = Field(default=1.0, gt=0, description="Max global gradient norm; null: no clipping.")
    ema: bool = Field(default=True, description="Keep an EMA of the U-Net weights; the saved model uses it.")
    ema_max_decay: float = Field(default=0.9999, gt=0, lt=1)
    ema_power: float = Field(
        default=0.75, gt=0, le=1, description="EMA warm-up: decay = min(max_decay, 1 − (1 + step)^−power)."
    )
    min_snr_gamma: float | None = Field(
        default=5.0, gt=0, description="Min-SNR-γ loss weighting (Hang et al. 2023); null: plain L_simple."
    )
    caption_dropout: float = Field(
        default=0.1, ge=0, lt=1, description="Share of captions replaced by the empty caption (for guidance)."
    )
    gradient_checkpointing: bool = False
    cache_latents: bool = Field(
        default=True,
        description="Encode the training set through the frozen autoencoder once and train the U-Net on the "
        "cached posteriors (mean, std); false encodes every batch again, as diffusers' train_text_to_image does.",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, full precision on CPU."
    )

    # ---- checkpoints --------------------------------------------------------------------------
    checkpoint_every: int = Field(default=500, ge=1, description="Global steps (autoencoder + U-Net) between checkpoints.")
    keep_checkpoints: int = Field(default=3, ge=1, le=100)

    # ---- evaluation ---------------------------------------------------------------------------
    validation_prompts: list[str] | None = Field(
        default=None, max_length=32, description="Prompts of the sample grid; default: up to 10 of the dataset's captions."
    )
    eval_at_checkpoints: bool = Field(default=True, description="Evaluate (and store the evaluation) at each checkpoint.")
    eval_scheduler: SchedulerName = DEFAULT_SCHEDULER
    eval_steps: int = Field(default=20, ge=1, le=1000)
    eval_guidance_scale: float = Field(
        default=2.0, ge=0, le=50, description="2: where accuracy and Fréchet bars both hold on digits (5 narrows the samples)."
    )
    eval_guidance_candidates: list[float] = Field(
        default=[1.0, 1.5, 2.0, 3.0, 5.0], min_length=1, max_length=8,
        description="Guidance scales evaluated at the final checkpoint (digits); the model's default guidance is "
        "chosen among them (worker/model/train_eval.py: choose_guidance).",
    )
    eval_num_samples: int = Field(default=200, ge=10, le=10_000, description="Generated images for accuracy / Fréchet.")
    vlb_timesteps: int = Field(
        default=50, ge=2, le=1000, description="VLB terms evaluated (L_0, plus a stratified estimate of the rest); 1000 = exact."
    )
    holdout_fraction: float = Field(default=0.1, gt=0, lt=1, description="Share of images held out for the VLB.")

    @field_validator("dataset")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        if v.startswith("builtin:") and v not in BUILTIN_DATASETS:
            raise ValueError(f"unknown builtin dataset {v!r}; valid: {', '.join(BUILTIN_DATASETS)}")
        return v

    @field_validator("autoencoder_channels", "unet_channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if any(c < 8 or c > 1024 or c % 8 for c in v):
            raise ValueError("every channel count must be a multiple of 8 between 8 and 1024")
        return v

    @field_validator("eval_guidance_candidates")
    @classmethod
    def _guidance_candidates(cls, v: list[float]) -> list[float]:
        if any(not 0 <= w <= 50 for w in v):
            raise ValueError("every guidance candidate must be in 0..50")
        return sorted(set(v))

    @field_validator("validation_prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not p.strip() or len(p) > 1000 for p in v)):
            raise ValueError("validation_prompts must be 1..32 non-empty prompts of at most 1000 characters")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _lora_targets(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in LORA_TARGET_MODULES]
        if unknown:
            raise ValueError(f"unknown lora_target_modules {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(LORA_TARGET_MODULES)}")
        if len(set(v)) != len(v):
            raise ValueError("lora_target_modules lists a module twice")
        return v

    @model_validator(mode="after")
    def _method(self) -> "TrainParams":
        """LoRA needs a base model and states its α (default r); the LoRA fields mean nothing to
        full fine-tuning, so there they must keep their defaults (a set one would be ignored)."""
        if self.method == "lora":
            if self.base_model is None:
                raise ValueError("method 'lora' trains adapters on a base_model; give base_model (a model id)")
            if self.lora_alpha is None:
                self.lora_alpha = float(self.lora_rank)
            return self
        fields = type(self).model_fields
        changed = [f for f in LORA_FIELDS if getattr(self, f) != fields[f].get_default(call_default_factory=True)]
        if changed:
            raise ValueError(f"{', '.join(changed)} apply only to method 'lora' (method is {self.method!r})")
        return self

    @model_validator(mode="after")
    def _shapes(self) -> "TrainParams":
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8; got {self.resolution}")
        if any(c % self.attention_heads for c in self.unet_channels):
            raise ValueError(f"every U-Net channel count must be divisible by attention_heads={self.attention_heads}")
        if self.base_model is None:
            down = 2 ** (len(self.autoencoder_channels) - 1)
            if self.resolution % down:
                raise ValueError(f"resolution {self.resolution} is not divisible by the autoencoder's factor {down}")
            latent = self.resolution // down
            unet_down = 2 ** (len(self.unet_channels) - 1)
            if latent % unet_down:
                raise ValueError(
                    f"latent side {latent} is not divisible by the U-Net's downsampling factor {unet_down}"
                )
        return self

    @property
    def total_steps(self) -> int:
        """Global steps of the job: autoencoder (when trained here) plus U-Net."""
        return self.steps + (0 if self.base_model is not None else self.autoencoder_steps)
