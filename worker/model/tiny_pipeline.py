"""Build a tiny random text-to-image pipeline in diffusers' StableDiffusionPipeline format.

Tests, benchmarks and the compose smoke test use it: it needs no download. The text encoder is
either the real packaged MiniLM BERT (``text_encoder="minilm"``) or a tiny random BERT that shares
its tokenizer (``"tiny"``, the default: a few MB, so storage round-trips stay fast).

    python -m worker.model.tiny_pipeline OUT_DIR [--text-encoder tiny|minilm] [--seed N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEXT_ENCODERS = ("tiny", "minilm")


def build_tiny_pipeline(out_dir: Path, *, text_encoder: str = "tiny", seed: int = 0, image_size: int = 32,
                        max_length: int = 16, latent_channels: int = 4):
    """``latent_channels``: 4 as Stable Diffusion; ldmq's trained models have 2 by default
    (``shared.train_schema``), with a U-Net of as many channels."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    from worker.model.schedulers import make_noise_scheduler
    from worker.model.text_encoder import EMBED_DIM, load_text_encoder

    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"unknown text_encoder {text_encoder!r}; valid: {', '.join(TEXT_ENCODERS)}")
    torch.manual_seed(seed)
    tokenizer, encoder = load_text_encoder(max_length=max_length)
    if text_encoder == "tiny":
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
        encoder = BertModel(cfg)  # with its pooler, as from_pretrained builds it: no missing-weight warnings
        encoder.config.use_attention_mask = True
    cross_dim = encoder.config.hidden_size if text_encoder == "tiny" else EMBED_DIM
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=image_size,
        latent_channels=latent_channels,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_noise_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--text-encoder", choices=TEXT_ENCODERS, default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_tiny_pipeline(args.out_dir, text_encoder=args.text_encoder, seed=args.seed))


if __name__ == "__main__":
    main()
