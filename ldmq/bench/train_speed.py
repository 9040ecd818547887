"""``ldmq bench train-speed``: U-Net training steps/s of ldmq's loop against a loop written like
diffusers' ``examples/text_to_image/train_text_to_image.py``, on the same models, data and batch.

Three loops, each timed per optimisation step (batch fetch to EMA update), after a warm-up:

- (d) **diffusers-style**: the example script's inner loop, without ``accelerate`` (one CPU
  process: it would add nothing but a wrapper): a ``DataLoader`` whose items are tokenised on
  access, ``vae.encode(pixels).latent_dist.sample() * scaling_factor``, the text encoder on every
  batch, ``noise_scheduler.add_noise``, the U-Net, Min-SNR-γ weighting via
  ``diffusers.training_utils.compute_snr`` (the script's ``--snr_gamma``; ldmq's default is γ = 5),
  backward, ``clip_grad_norm_``, AdamW, the LR scheduler, ``EMAModel.step``.
- (u) **ldmq, latents not cached** (``cache_latents=false``): ``worker.model.training.train`` encoding
  every batch through the frozen autoencoder (text embeddings of the distinct captions are still
  computed once).
- (c) **ldmq** with the defaults: latents cached once.

The models are the ``{"dataset": "builtin:digits"}`` defaults (AutoencoderKL (16, 32, 64) →
2×8×8, U-Net (32, 64) with cross-attention on the packaged BERT's token states), batch 64, random
weights (speed does not depend on them). The issue's bar: u/d ≥ 1.0 and c/d ≥ 2.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmq bench train-speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per loop and round (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three loops, interleaved (default 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the 2-core machine)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a TrainParams field of the builtin:digits defaults, e.g. "
                        "--set 'autoencoder_channels=[32,64,64]'")
    return p


def diffusers_style_loop(params, dataset, *, steps: int, warmup: int, seed: int = 0,
                         parts: dict[str, list[float]] | None = None) -> list[float]:
    """Per-step seconds of the example script's loop (see the module docstring). With ``parts``,
    also the seconds of its batch fetch, VAE encode and text encoder per timed step."""
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr

    from worker.model.text_encoder import load_text_encoder
    from worker.model.schedulers import make_noise_scheduler
    from worker.model.training import make_autoencoder, make_unet

    torch.manual_seed(seed)
    tokenizer, text_encoder = load_text_encoder()
    vae = make_autoencoder(params).requires_grad_(False).eval()
    noise_scheduler = make_noise_scheduler()
    side = params.resolution // (2 ** (len(params.autoencoder_channels) - 1))
    unet = make_unet(params, in_channels=params.latent_channels, sample_size=side,
                     cross_attention_dim=text_encoder.config.hidden_size).train()
    ema_unet = EMAModel(unet.parameters(), decay=params.ema_max_decay, use_ema_warmup=True, power=params.ema_power)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=params.warmup_steps,
                                 num_training_steps=warmup + steps)

    class Train(torch.utils.data.Dataset):  # the script's with_transform(preprocess_train)
        def __len__(self):
            return len(dataset.captions)

        def __getitem__(self, i):
            ids = tokenizer(dataset.captions[i], max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids[0]
            return {"pixel_values": dataset.images[i], "input_ids": ids}

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float(),
                "input_ids": torch.stack([e["input_ids"] for e in examples])}

    loader = torch.utils.data.DataLoader(Train(), shuffle=True, collate_fn=collate_fn, batch_size=params.batch_size,
                                         drop_last=True, num_workers=0)
    seconds: list[float] = []
    it = iter(loader)
    for step in range(warmup + steps):
        clock = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t_data = time.perf_counter()
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        t_vae = time.perf_counter()
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,)).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        t_text = time.perf_counter()
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        t_unet = time.perf_counter()
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        snr = compute_snr(noise_scheduler, timesteps)
        mse_loss_weights = torch.stack([snr, params.min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), params.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema_unet.step(unet.parameters())
        loss.item()  # the script logs it every step
        if step >= warmup:
            seconds.append(time.perf_counter() - clock)
            if parts is not None:
                for name, a, b in (("data", clock, t_data), ("vae", t_data, t_vae), ("text", t_text, t_unet)):
                    parts.setdefault(name, []).append(b - a)
    return seconds


def ldmq_loop(params, dataset, *, steps: int, warmup: int, cache_latents: bool) -> list[float]:
    """Per-step seconds of ``worker.model.training.train``'s U-Net stage (one autoencoder step first)."""
    from worker.model.training import TrainHooks, TrainingStopped, train

    p = params.model_copy(update={"steps": warmup + steps, "autoencoder_steps": 1, "cache_latents": cache_latents,
                                  "checkpoint_every": 10**6, "eval_at_checkpoints": False})
    times: list[float] = []

    def step_done(stage: str, seconds: float) -> None:
        if stage == "unet":
            times.append(seconds)

    with tempfile.TemporaryDirectory(prefix="ldmq-bench-speed-") as tmp:
        hooks = TrainHooks(step_done=step_done, should_stop=lambda: len(times) >= warmup + steps)
        try:  # stop after the last step, before the final evaluation (a checkpoint is written first)
            train(p, workdir=Path(tmp), dataset=dataset, base_model_dir=None, hooks=hooks)
        except TrainingStopped:
            pass
    return times[warmup:]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from ldmq.bench.train import params_with_overrides
    from worker.model.data import load_dataset

    torch.set_num_threads(args.threads)
    params = params_with_overrides({"dataset": "builtin:digits", "batch_size": args.batch_size}, args.set)
    train_set, _ = load_dataset("builtin:digits", resolution=params.resolution).split(params.holdout_fraction, seed=0)
    print(f"U-Net training speed, builtin:digits defaults, batch {args.batch_size}, {args.threads} threads, "
          f"{args.steps} timed steps × {args.rounds} rounds after {args.warmup} warm-up steps"
          + (f"; {' '.join(args.set)}" if args.set else ""), flush=True)
    times: dict[str, list[float]] = {"d": [], "u": [], "c": []}
    d_parts: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name in ("d", "u", "c"):
            if name == "d":
                t = diffusers_style_loop(params, train_set, steps=args.steps, warmup=args.warmup, seed=r, parts=d_parts)
            else:
                t = ldmq_loop(params, train_set, steps=args.steps, warmup=args.warmup, cache_latents=name == "c")
            times[name] += t
            print(f"  round {r + 1} {name}: {1 / statistics.median(t):.2f} steps/s", flush=True)
    rate = {k: 1 / statistics.median(v) for k, v in times.items()}
    print()
    print(f"(d) diffusers-style loop        {rate['d']:7.2f} steps/s")
    print(f"(u) ldmq, latents not cached    {rate['u']:7.2f} steps/s   u/d {rate['u'] / rate['d']:.2f}  (bar ≥ 1.0)")
    print(f"(c) ldmq, latents cached        {rate['c']:7.2f} steps/s   c/d {rate['c'] / rate['d']:.2f}  (bar ≥ 2.0)")
    print("(medians of per-step wall times; steps/s = 1 / median)")
    # What caching can win at most: (d)'s step without its batch fetch, VAE encode and text encoder
    # is the U-Net step (plus optimizer and EMA) that every loop still pays.
    part_ms = {k: 1000 * statistics.median(v) for k, v in d_parts.items()}
    d_ms = 1000 / rate["d"]
    rest_ms = d_ms - sum(part_ms.values())
    print(f"(d) per step: batch fetch {part_ms['data']:.1f} ms, VAE encode {part_ms['vae']:.1f} ms, "
          f"text encoder {part_ms['text']:.1f} ms, U-Net step + optimizer + EMA {rest_ms:.1f} ms; "
          f"c/d if (c) were (d)'s U-Net step alone: {d_ms / rest_ms:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
