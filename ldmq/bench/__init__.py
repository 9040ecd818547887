"""Every benchmark of ldmq, one module each; ``ldmq bench <name> [flags]`` runs one. They print
figures (they are not timed tests); docs/benchmarks.md records the results and what they taught.

- ``sample`` (:mod:`ldmq.bench.sample`): sampling throughput, in-process and end to end
- ``api`` (:mod:`ldmq.bench.api`): submit latency under load, and dispatch latency
- ``train`` (:mod:`ldmq.bench.train`): training quality on builtin:digits
- ``train-speed`` (:mod:`ldmq.bench.train_speed`): U-Net training steps/s against a diffusers-style loop
- ``train-ddp`` (:mod:`ldmq.bench.train_ddp`): U-Net step time on two data-parallel ranks against one
- ``gpu`` (:mod:`ldmq.bench.gpu`): an SD-1.5-sized U-Net on a CUDA device against diffusers' fp16 pipeline

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
    "train-speed": "ldmq.bench.train_speed",
    "train-ddp": "ldmq.bench.train_ddp",
    "sample": "ldmq.bench.sample",
    "api": "ldmq.bench.api",
    "gpu": "ldmq.bench.gpu",
}


def main(name: str, argv: list[str]) -> int:
    """Run the bench ``name`` with its own command-line flags ``argv``."""
    return importlib.import_module(BENCHES[name]).main(argv) or 0
