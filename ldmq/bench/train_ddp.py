"""``ldmq bench train-ddp``: U-Net training step time on two data-parallel ranks against one, at the
same global batch (``worker.model.training.train(world_size=N)``, gloo ranks on the CPU).

Four configurations, each timed per optimisation step on rank 0 (its ``step_done`` hook: batch
draw to EMA update, with DDP's gradient all-reduce and the loss/stop sync), after a warm-up:

- (1×1) one rank, 1 torch thread;
- (1×T) one rank, T threads (T = ranks × 1: the same cores as (2×1));
- (2×1) two ranks, 1 thread each;
- (share) one rank, 1 thread, on one rank's share of the batch (64 / 2): the step (2×1) would take
  if its ranks ran side by side with no cost of their own; (2×1) / (share) is what data-parallel
  costs here (the all-reduce, the syncs, and the ranks competing for cores and memory bandwidth).

The models are the ``{"dataset": "builtin:digits"}`` defaults, batch 64 (32 per rank), random
weights. On a CPU the ranks share the machine's cores and memory bandwidth, so what this measures
is the data-parallel overhead and how two processes use two cores against intra-op threads; on a
multi-GPU worker each rank has its own device and the same code path scales with the devices.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmq bench train-ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration and round (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three configurations, interleaved (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (default 64)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel configuration (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a TrainParams field of the builtin:digits defaults")
    return p


def step_times(params, dataset, *, ranks: int, threads: int, steps: int, warmup: int) -> list[float]:
    """Rank 0's per-step seconds of the U-Net stage on ``ranks`` ranks of ``threads`` threads each."""
    import torch

    from worker.model.training import TrainHooks, TrainingStopped, train

    p = params.model_copy(update={"steps": warmup + steps, "autoencoder_steps": 1, "checkpoint_every": 10**6,
                                  "eval_at_checkpoints": False})
    times: list[float] = []

    def step_done(stage: str, seconds: float) -> None:
        if stage == "unet":
            times.append(seconds)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the ranks take rank 0's thread count
    try:
        with tempfile.TemporaryDirectory(prefix="ldmq-bench-ddp-") as tmp:
            hooks = TrainHooks(step_done=step_done, should_stop=lambda: len(times) >= warmup + steps)
            try:  # stop after the last timed step, before the final evaluation
                train(p, workdir=Path(tmp), dataset=dataset, base_model_dir=None, hooks=hooks, world_size=ranks)
            except TrainingStopped:
                pass
    finally:
        torch.set_num_threads(before)
    return times[warmup:]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import os

    from ldmq.bench.train import params_with_overrides
    from worker.model.data import load_dataset

    params = params_with_overrides({"dataset": "builtin:digits", "batch_size": args.batch_size}, args.set)
    dataset = load_dataset("builtin:digits", resolution=params.resolution)
    n = args.ranks
    configs = {"1x1": (1, 1), f"1x{n}": (1, n), f"{n}x1": (n, 1), "share": (1, 1)}
    share = params.model_copy(update={"batch_size": args.batch_size // n})
    print(f"U-Net step time, builtin:digits defaults, global batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"{args.steps} timed steps × {args.rounds} rounds after {args.warmup} warm-up steps"
          + (f"; {' '.join(args.set)}" if args.set else ""), flush=True)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, (ranks, threads) in configs.items():
            t = step_times(share if name == "share" else params, dataset, ranks=ranks, threads=threads,
                           steps=args.steps, warmup=args.warmup)
            times[name] += t
            print(f"  round {r + 1} {name}: {1000 * statistics.median(t):.1f} ms/step", flush=True)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print()
    for name, (ranks, threads) in configs.items():
        batch = args.batch_size // n if name == "share" else args.batch_size
        print(f"({name}) {ranks} rank(s) × {threads} thread(s), batch {batch}   {ms[name]:7.1f} ms/step   "
              f"{1000 / ms[name]:6.2f} steps/s")
    print(f"speed-up of {n} ranks: {ms['1x1'] / ms[f'{n}x1']:.2f}× against one rank on one thread, "
          f"{ms[f'1x{n}'] / ms[f'{n}x1']:.2f}× against one rank on {n} threads; "
          f"{ms[f'{n}x1'] / ms['share']:.2f}× the step of one rank's share alone")
    print("(medians of rank 0's per-step wall times, DDP all-reduce and loss/stop sync included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
