"""Every benchmark of ldmq, one module each; ``ldmq bench <name> [flags]`` runs one. They print
figures (they are not timed tests); docs/benchmarks.md records the results and what they taught.

- ``sample`` (:mod:`ldmq.bench.sample`): sampling throughput, in-process and end to end
- ``api`` (:mod:`ldmq.bench.api`): submit latency under load, and dispatch latency
- ``train`` (:mod:`ldmq.bench.train`): training quality on builtin:digits
- ``samplers`` (:mod:`ldmq.bench.samplers`): one digits model's samplers (langevin-pc among them) at equal network evaluations
- ``train-speed`` (:mod:`ldmq.bench.train_speed`): U-Net training steps/s against a diffusers-style loop
- ``lora`` (:mod:`ldmq.bench.lora`): LoRA against full fine-tuning of one base (parameters, step time, memory)
- ``train-ddp`` (:mod:`ldmq.bench.train_ddp`): U-Net step time on two data-parallel ranks against one
- ``gpu`` (:mod:`ldmq.bench.gpu`): an SD-1.5-sized U-Net on a CUDA device against diffusers' fp16 pipeline
- ``ratelimit`` (:mod:`ldmq.bench.ratelimit`): the cost of a tenant's rate check, and one rate across two processes
- ``stream`` (:mod:`ldmq.bench.stream`): what a job's event stream costs: a poll, idle streams, delivery latency
- ``scheduler`` (:mod:`ldmq.bench.scheduler`): the claim path and the policy with hundreds of simulated
  workers against a real PostgreSQL (claims/s, latency, utilisation, fairness, waits under a flood)
- ``estimate`` (:mod:`ldmq.bench.estimate`): dry-run estimates against real runs of the digits demo
- ``spread`` (:mod:`ldmq.bench.spread`): one big sample job on two one-thread workers against one

:mod:`ldmq.bench.stack` starts ldmq's processes on loopback for the benches that need a running
system. Benchmarks import the worker's public names (``worker.model``, ``worker.jobs``) and
``shared``; nothing outside this package imports it but the ``ldmq`` command line. Each module
imports torch, diffusers and the rest inside its functions, so ``ldmq --help`` stays light and
``ldmq.bench.gpu`` needs no more than the device machine holds.
"""

from __future__ import annotations

import importlib

#: ``ldmq bench`` names and the module whose ``main(argv)`` runs each.
BENCHES = {
    "train": "ldmq.bench.train",
    "samplers": "ldmq.bench.samplers",
    "train-speed": "ldmq.bench.train_speed",
    "lora": "ldmq.bench.lora",
    "train-ddp": "ldmq.bench.train_ddp",
    "sample": "ldmq.bench.sample",
    "api": "ldmq.bench.api",
    "gpu": "ldmq.bench.gpu",
    "ratelimit": "ldmq.bench.ratelimit",
    "stream": "ldmq.bench.stream",
    "scheduler": "ldmq.bench.scheduler",
    "estimate": "ldmq.bench.estimate",
    "spread": "ldmq.bench.spread",
}


def main(name: str, argv: list[str]) -> int:
    """Run the bench ``name`` with its own command-line flags ``argv``."""
    return importlib.import_module(BENCHES[name]).main(argv) or 0
