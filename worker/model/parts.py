"""The parts of a latent diffusion model (Rombach et al. 2022) as ldmq builds them from scratch, and
how they are put together into a plain diffusers ``StableDiffusionPipeline``.

- the autoencoder E/D (``AutoencoderKL``): an image x (3×R×R in [−1, 1]) to a latent posterior
  q(z|x) = N(μ(x), σ(x)²) of shape C×R/f×R/f, f = 2^(len(channels)−1), and back;
- the denoiser ε_θ(z_t, t, τ(y)) (``UNet2DConditionModel``): ResNet blocks with cross-attention to
  the text in its down and up halves;
- τ(y), the frozen text encoder's token states (:func:`encode_captions`), computed exactly as the
  pipeline computes them, so a plain-diffusers user samples what was trained.

Training (:mod:`worker.model.training`) and its evaluation (:mod:`worker.model.train_eval`) both
build on these; neither is imported here.
"""

from __future__ import annotations

import math

import torch

from shared.train_schema import TrainParams


def _norm_groups(channels) -> int:
    """GroupNorm groups that divide every width (at most 32, diffusers' default)."""
    return min(32, math.gcd(*channels))


def make_autoencoder(params: TrainParams):
    """AutoencoderKL: len(channels) blocks, downsampling 2× between them (32×32 → 8×8 for three)."""
    from diffusers import AutoencoderKL

    n = len(params.autoencoder_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(params.autoencoder_channels),
        layers_per_block=1,
        latent_channels=params.latent_channels,
        norm_num_groups=_norm_groups(params.autoencoder_channels),
        sample_size=params.resolution,
    )


def make_unet(params: TrainParams, *, in_channels: int, sample_size: int, cross_attention_dim: int):
    """UNet2DConditionModel: ResNet blocks with cross-attention to the text in every down and up block
    (and, with ``text_time_embedding``, the attention-pooled text added to the time embedding)."""
    from diffusers import UNet2DConditionModel

    n = len(params.unet_channels)
    extra = {}
    if params.text_time_embedding:
        extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": max(1, cross_attention_dim // 64)}
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(params.unet_channels),
        layers_per_block=params.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=params.attention_heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=_norm_groups(params.unet_channels),
        **extra,
    )


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], device="cpu", batch_size: int = 256):
    """Token states (N, L, D), exactly as ``StableDiffusionPipeline.encode_prompt``: pad to
    ``tokenizer.model_max_length``, truncate, pass the attention mask when the encoder's config asks
    for it, take the last hidden state; no mask goes to the U-Net."""
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    out = []
    for i in range(0, len(captions), batch_size):
        tok = tokenizer(
            captions[i : i + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tok.attention_mask.to(device) if use_mask else None
        out.append(text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].to(text_encoder.dtype))
    return torch.cat(out)


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder's posterior q(z|x) = N(μ, σ²) of each image (N, 3, R, R): (μ, σ), each
    (N, C, h, w) float32, unscaled (multiply by ``vae.config.scaling_factor`` for the U-Net)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch_size):
        post = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def assemble_pipeline(unet, *, vae, text_encoder, tokenizer, scheduler):
    """A ``StableDiffusionPipeline`` of these parts (no safety checker): what training saves, and
    what its evaluation samples through, so both run the code path a user of the saved model runs."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
