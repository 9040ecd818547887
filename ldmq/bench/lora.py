"""``ldmq bench lora``: LoRA against full fine-tuning of the same base pipeline: trained parameters,
step time, peak memory and the stored weights' size.

Both methods run ``worker.model.training.train`` on the same random base pipeline
(``worker.model.tiny_pipeline``, its U-Net widened with ``--unet-channels``), the same digits
images and batch, each in a fresh spawned process (so that one's memory does not hide the
other's), and stop after ``--warmup`` + ``--steps`` U-Net steps, before the final evaluation.

- **trained parameters**: the tensors of the U-Net checkpoint the run writes when it stops
  (``unet.safetensors``: every weight; ``unet_lora.safetensors``: the adapter's A and B);
- **step time**: the median of the timed steps' wall seconds (``TrainHooks.step_done``), and of
  their process CPU seconds (all threads; what the step costs when the machine is shared, as the
  development VM is: wall times there swing with the other work). ``--rounds`` alternates the two
  methods (full, lora, full, lora, …) so that both see the same hours of the machine;
- **peak memory**: the process's peak resident set (``VmHWM``) minus its resident set just before
  ``train`` (imports and data loaded): the base model, the adapter, gradients, AdamW's two moments,
  the EMA and the activations. Not tracemalloc: torch allocates tensors outside Python's allocator,
  which tracemalloc does not see;
- **stored size**: that checkpoint file's bytes (what the model stores: the whole U-Net, or the adapter).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmq bench lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed U-Net steps per method (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5, at least 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--unet-channels", default="16,32",
                   help="the base U-Net's block widths (default 16,32: the tiny test pipeline)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4; α = rank)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the 2-core machine)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each method, alternated (default 2)")
    return p


def build_base(out: Path, channels: tuple[int, ...]) -> Path:
    """The tiny random pipeline with a U-Net of ``channels`` (cross-attention in every block but the
    deepest, as the tiny one), saved as safetensors."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from worker.model.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(out)
    if tuple(channels) == (16, 32):
        return out
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    torch.manual_seed(0)
    n = len(channels)
    pipe.unet = UNet2DConditionModel(
        sample_size=pipe.unet.config.sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels), down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=pipe.text_encoder.config.hidden_size, attention_head_dim=8, norm_num_groups=8,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _vm(field: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS: now; VmHWM: the peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(method: str, base_dir: str, args: dict, conn) -> None:
    """In a spawned process: train ``method`` for warm-up + timed steps; send back the figures."""
    import torch
    from safetensors import safe_open

    from shared.train_schema import TrainParams
    from worker.model.data import load_dataset
    from worker.model.training import TrainHooks, TrainingStopped, train

    torch.set_num_threads(args["threads"])
    lora = {"lora_rank": args["rank"]} if method == "lora" else {}
    params = TrainParams(dataset="builtin:digits", base_model="bench-base", method=method, batch_size=args["batch_size"],
                         steps=args["warmup"] + args["steps"], checkpoint_every=10**6, eval_at_checkpoints=False, **lora)
    dataset = load_dataset("builtin:digits", resolution=params.resolution)
    times: list[float] = []
    cpu_marks: list[float] = []  # process CPU seconds at each step's end
    stored: dict = {}

    def step_done(_stage: str, seconds: float) -> None:
        times.append(seconds)
        cpu_marks.append(time.process_time())

    def saved(_step: int, ckpt: Path) -> None:
        f = ckpt / ("unet_lora.safetensors" if method == "lora" else "unet.safetensors")
        with safe_open(f, "pt") as st:
            stored["params"] = sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
        stored["bytes"] = f.stat().st_size

    hooks = TrainHooks(step_done=step_done, save_checkpoint=saved,
                       should_stop=lambda: len(times) >= args["warmup"] + args["steps"])
    rss_before = _vm("VmRSS")
    with tempfile.TemporaryDirectory(prefix="ldmq-bench-lora-") as tmp:
        try:  # stops after the last step, before the final evaluation (the checkpoint is written first)
            train(params, workdir=Path(tmp), dataset=dataset, base_model_dir=Path(base_dir), hooks=hooks)
        except TrainingStopped:
            pass
    w = args["warmup"]
    cpu = [b - a for a, b in zip(cpu_marks[w - 1:], cpu_marks[w:])]  # step i: from step i−1's end (w ≥ 1)
    conn.send({"step_s": times[w:], "cpu_s": cpu, "peak_bytes": _vm("VmHWM") - rss_before, **stored})
    conn.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_method(method: str, base_dir: Path, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(method, str(base_dir), args, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        proc.join()
        raise SystemExit(f"the {method} run died (exit code {proc.exitcode})") from None
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.warmup < 1 or a.steps < 1 or a.rounds < 1:
        raise SystemExit("--warmup, --steps and --rounds must be at least 1")
    channels = tuple(int(c) for c in a.unet_channels.split(","))
    args = {"steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size, "rank": a.rank, "threads": a.threads}
    with tempfile.TemporaryDirectory(prefix="ldmq-bench-lora-base-") as tmp:
        base = build_base(Path(tmp) / "base", channels)
        print(f"LoRA (rank {a.rank}, α = rank, attention projections) against full fine-tuning of one base "
              f"(U-Net {a.unet_channels}), builtin:digits 32px, batch {a.batch_size}, {a.threads} threads, "
              f"{a.steps} timed steps after {a.warmup}", flush=True)
        runs: dict[str, list[dict]] = {"full": [], "lora": []}
        for r in range(a.rounds):
            for m in runs:
                runs[m].append(run_method(m, base, args))
                print(f"  round {r + 1} {m}: {1000 * statistics.median(runs[m][-1]['step_s']):.1f} ms a step", flush=True)
    results = {m: _summary(rs) for m, rs in runs.items()}
    full, lo = results["full"], results["lora"]
    print(f"{'method':<6} {'trained params':>15} {'share':>7} {'step ms':>8} {'CPU ms':>8} {'peak MiB':>9} {'stored KiB':>11}")
    for m, r in results.items():
        print(f"{m:<6} {r['params']:>15,} {r['params'] / full['params']:>7.1%} {1000 * r['step_s']:>8.1f} "
              f"{1000 * r['cpu_s']:>8.1f} {r['peak_bytes'] / 2**20:>9.1f} {r['bytes'] / 1024:>11.1f}")
    print(f"lora/full: params {lo['params'] / full['params']:.3f}, step time {lo['step_s'] / full['step_s']:.2f}, "
          f"CPU time {lo['cpu_s'] / full['cpu_s']:.2f}, peak memory {lo['peak_bytes'] / max(1, full['peak_bytes']):.2f}, "
          f"stored {lo['bytes'] / full['bytes']:.3f}")
    print("(step and CPU ms: medians over every timed step of every round; peak: the largest round's)")
    return 0


def _summary(runs: list[dict]) -> dict:
    """One method's rounds as one row: step medians over all timed steps, the largest peak."""
    return {"params": runs[0]["params"], "bytes": runs[0]["bytes"],
            "step_s": statistics.median(t for r in runs for t in r["step_s"]),
            "cpu_s": statistics.median(t for r in runs for t in r["cpu_s"]),
            "peak_bytes": max(r["peak_bytes"] for r in runs)}


if __name__ == "__main__":
    raise SystemExit(main())
