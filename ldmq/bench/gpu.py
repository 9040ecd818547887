"""``ldmq bench gpu``: a Stable-Diffusion-1.5-sized U-Net (random weights) at 512x512, 25 steps.

Compares images/s of ldmq's worker path (``worker.model.sampling.generate``: fixed padded batches,
cached text embeddings, the precision/layout options of ``worker.model.pipelines.load_pipeline_dir``)
against diffusers' own fp16 pipeline called the usual way, and reports the achieved fraction of
the bf16 matmul peak measured on the same device in the same run (U-Net FLOPs counted with
``torch.utils.flop_counter``). Needs a CUDA device; ``--smoke`` runs a tiny config on any device
so the code path can be checked without one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


PROMPT = "a photo of object {}"


def bench_tokenizer(max_length: int = 77):
    """A BERT WordPiece tokenizer over the bench prompts' words. Random-weight text encoders need no
    real vocabulary, and the packaged MiniLM (88 MB, its only other source here) cannot travel to a
    device machine that has no package index."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PROMPT.format("").split()]
    digits = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words + digits)}, model_max_length=max_length)


def build_sd15_like(out: Path, smoke: bool) -> Path:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    from worker.model.schedulers import make_noise_scheduler

    torch.manual_seed(0)
    tokenizer = bench_tokenizer()
    if smoke:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                    attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16)
        te = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128), add_pooling_layer=False)
    else:
        # UNet2DConditionModel's defaults are SD 1.x's U-Net (860M parameters); SD 1.x's VAE.
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        te = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=768, num_hidden_layers=12,
                                  num_attention_heads=12, intermediate_size=3072), add_pooling_layer=False)
    te.config.use_attention_mask = True
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_noise_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def bf16_peak_tflops(device: str, n: int = 8192, iters: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def unet_flops(pipe, batch: int, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = pipe.unet.config
    x = torch.randn(2 * batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device, dtype=pipe.unet.dtype)
    ctx = torch.randn(2 * batch, pipe.tokenizer.model_max_length, cfg.cross_attention_dim, device=device,
                      dtype=pipe.unet.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        pipe.unet(x, torch.tensor(500, device=device), ctx)
    return float(fc.get_total_flops())


def second_run_s(run, sync) -> float:
    """Seconds of ``run``'s second call, ``sync`` (the device's) before each clock reading; the
    first call warms up (kernel selection, allocator, compilation)."""
    run()
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - t0


def _auto_batch(pipe_dir: Path, args, side: int) -> int:
    """The worker's ``auto_batch_size`` on this model and size: a probe batch's peak memory per image
    (guidance on, one step) against the free memory."""
    from worker.model.pipelines import load_pipeline_dir
    from worker.model.sampling import EmbeddingCache, Item, auto_batch_size, generate

    pipe = load_pipeline_dir(pipe_dir, args.device, dtype=args.dtype, channels_last=args.channels_last)
    emb = EmbeddingCache(pipe, args.device)
    first = Item(1, 0, 0, PROMPT.format(0), "", 5.0, 1)

    def probe(n: int) -> None:
        generate(pipe, [first], batch_size=n, width=side, height=side, device=args.device, embeddings=emb)

    return auto_batch_size(args.device, ("bench", side, side, 1), probe)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="images per pipeline call; 0: found from free memory as the worker does (LDMQ_SAMPLE_BATCH_SIZE=0)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny config: checks the code path on any device")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    from diffusers import StableDiffusionPipeline

    from worker.model.pipelines import load_pipeline_dir
    from worker.model.sampling import EmbeddingCache, Item, generate
    from worker.model.schedulers import make_scheduler

    cuda = args.device.startswith("cuda")
    workdir = Path(tempfile.mkdtemp(prefix="ldmq-bench-gpu-"))
    pipe_dir = build_sd15_like(workdir / "sd", args.smoke)
    side = 64 if args.smoke else 512
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.batch_size == 0:
        args.batch_size = _auto_batch(pipe_dir, args, side)
        if cuda:
            torch.cuda.empty_cache()  # the probe's pipeline is gone with the function
        print(f"batch size found from free memory: {args.batch_size}", flush=True)
    prompts = [PROMPT.format(i) for i in range(args.batch_size * args.batches)]

    # Baseline: diffusers' fp16 pipeline, called the usual way on the same batches.
    base = StableDiffusionPipeline.from_pretrained(pipe_dir, dtype=torch.float16 if cuda else torch.float32,
                                                   safety_checker=None, requires_safety_checker=False).to(args.device)
    base.scheduler = make_scheduler("dpm-solver++", base.scheduler.config)
    base.set_progress_bar_config(disable=True)

    def run_base():
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i:i + args.batch_size]
            base(prompt=chunk, num_inference_steps=args.steps, guidance_scale=5.0, height=side, width=side,
                 generator=[torch.Generator(args.device).manual_seed(j) for j in range(len(chunk))], output_type="np")

    t_base = second_run_s(run_base, sync)
    base = None  # its weights go before ldmq's pipeline loads
    if cuda:
        torch.cuda.empty_cache()

    pipe = load_pipeline_dir(pipe_dir, args.device, dtype=args.dtype, channels_last=args.channels_last,
                             compile_unet=args.compile)
    pipe.scheduler = make_scheduler("dpm-solver++", pipe.scheduler.config)
    emb = EmbeddingCache(pipe, args.device)
    items = [Item(i + 1, 0, i, p, "", 5.0, args.steps) for i, p in enumerate(prompts)]

    def run_ldmq():
        for i in range(0, len(items), args.batch_size):
            generate(pipe, items[i:i + args.batch_size], batch_size=args.batch_size, width=side, height=side,
                     device=args.device, embeddings=emb)

    t_ldmq = second_run_s(run_ldmq, sync)

    n = len(prompts)
    flops = unet_flops(pipe, args.batch_size, args.device) * args.steps * args.batches
    out = {"device": torch.cuda.get_device_name() if cuda else args.device, "images": n, "steps": args.steps,
           "batch_size": args.batch_size,
           "side": side, "dtype": args.dtype, "channels_last": args.channels_last, "compile": args.compile,
           "diffusers_fp16_images_per_s": n / t_base, "ldmq_images_per_s": n / t_ldmq,
           "speedup": t_base / t_ldmq, "unet_tflops_achieved": flops / t_ldmq / 1e12}
    if cuda:
        peak = bf16_peak_tflops(args.device)
        out["bf16_peak_tflops_measured"] = peak
        out["fraction_of_peak"] = out["unet_tflops_achieved"] / peak
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
