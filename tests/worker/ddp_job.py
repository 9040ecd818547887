"""A train job's process for tests/worker/test_distributed.py: trains the tiny configuration on two
gloo ranks, copies each checkpoint to OUT/step-N, and at global step PAUSE_AT writes OUT/paused
(with the pids of its rank children) and waits there for the test to SIGKILL it.

    python -m tests.worker.ddp_job OUT PAUSE_AT
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import threading
from pathlib import Path


AE_STEPS, UNET_STEPS = 4, 6


def ddp_params(**overrides):
    """tests/worker/test_training.py's tiny configuration, shorter, with a batch of 15 that two
    ranks split 8 + 7 (the uneven case of the loss weighting), a checkpoint every 3 global steps."""
    from tests.worker.test_training import tiny_params

    fields = dict(steps=UNET_STEPS, autoencoder_steps=AE_STEPS, batch_size=15, checkpoint_every=3)
    return tiny_params(**{**fields, **overrides})


def main(out: Path, pause_at: int) -> None:
    import torch

    from worker.model.data import load_dataset
    from worker.model.training import TrainHooks, train

    torch.set_num_threads(1)

    def save_checkpoint(step: int, path: Path) -> None:
        shutil.copytree(path, out / f"step-{step:08d}")
        if step == pause_at:
            ranks = [p.pid for p in multiprocessing.active_children() if p.name.startswith("ldmq-rank-")]
            (out / "paused").write_text(json.dumps({"pid": os.getpid(), "ranks": ranks}))
            threading.Event().wait()  # until the test kills this process

    dataset = load_dataset("builtin:digits", resolution=16)
    train(ddp_params(), workdir=out / "run", dataset=dataset, base_model_dir=None,
          hooks=TrainHooks(save_checkpoint=save_checkpoint), progress_every=1, world_size=2)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
