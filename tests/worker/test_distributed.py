"""Training across devices (worker/model/distributed.py and its hooks in worker/model/training.py):
two gloo ranks on the CPU train what one rank trains with the same global batch, stop together,
never outlive a killed job process, and resume from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import wait_until
from tests.worker.ddp_job import AE_STEPS, UNET_STEPS, ddp_params
from tests.worker.test_training import Recorder
from worker.model.data import load_dataset
from worker.model.distributed import World, resolve_world_size
from worker.model.training import TrainingStopped, train

REPO = Path(__file__).resolve().parents[2]
TOTAL = AE_STEPS + UNET_STEPS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# One process: the world size, the one-rank identities, the loss weighting
# ------------------------------------------------------------------------------------------------


def test_world_size_auto_is_one_on_the_cpu_and_a_count_is_taken_as_given():
    assert resolve_world_size("auto", "cpu", batch_size=64) == 1
    assert resolve_world_size(3, "cpu", batch_size=64) == 3
    assert resolve_world_size(4, "cpu", batch_size=2) == 2  # never more ranks than examples
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ValueError, match="'auto' or a positive integer"):
            resolve_world_size(bad, "cpu", batch_size=64)
    with pytest.raises(ValueError, match="not cuda:1"):
        resolve_world_size(2, "cuda:1", batch_size=64)
    with pytest.raises(ValueError, match="cpu .gloo. or cuda .NCCL., not mps"):
        resolve_world_size(2, "mps", batch_size=64)


def test_one_rank_is_the_identity():
    world = World.solo("cpu")
    a, b = torch.randn(4, 3), torch.randn(4)
    module = torch.nn.Linear(3, 1)
    loss = torch.tensor(0.5)
    assert world.is_main and world.shard(a, b) == (a, b)
    assert world.wrap(module) is module
    assert world.weigh(loss, 4, 4) is loss and world.mean_loss(loss) is loss
    assert world.agree(True) is True and world.agree(False) is False


@pytest.mark.parametrize("batch,ranks", [(8, 2), (7, 3), (15, 2), (5, 4)])
def test_sharded_weighted_gradients_average_to_the_global_mean_gradient(batch, ranks):
    """What DDP computes, in one process: each rank's gradient of its weighed slice mean, averaged
    over the ranks, is the gradient of the global batch mean, also when the slices are unequal."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    x, y = torch.randn(batch, 6), torch.randn(batch, 1)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    want = grads(((model(x) - y) ** 2).mean())
    got = torch.zeros_like(want)
    for rank in range(ranks):
        world = World(rank, ranks, torch.device("cpu"))
        xs, ys = world.shard(x, y)
        got += grads(world.weigh(((model(xs) - ys) ** 2).mean(), len(xs), batch)) / ranks
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Two gloo ranks (real processes)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("builtin:digits", resolution=16)


def _run(tmp: Path, dataset, world_size: int, rec: Recorder):
    return train(ddp_params(), workdir=tmp, dataset=dataset, base_model_dir=None, hooks=rec.hooks(),
                 progress_every=1, world_size=world_size)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, dataset):
    rec = Recorder()
    return rec, _run(tmp_path_factory.mktemp("one"), dataset, 1, rec)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, dataset):
    rec = Recorder()
    return rec, _run(tmp_path_factory.mktemp("two"), dataset, 2, rec)


def _weights(result, part: str) -> dict[str, torch.Tensor]:
    return load_file(next((result.pipeline_dir / part).glob("*.safetensors")))


@pytest.mark.slow
def test_two_ranks_train_what_one_rank_trains(one_rank, two_ranks):
    (one, one_result), (two, two_result) = one_rank, two_ranks
    # rank 0 alone reports, once per step, and alone checkpoints, at the same steps
    assert [p["step"] for p in two.progress] == [p["step"] for p in one.progress] == list(range(1, TOTAL + 1))
    assert [st for st, _ in two.steps] == ["autoencoder"] * AE_STEPS + ["unet"] * UNET_STEPS
    assert [s for s, _ in two.saved] == [s for s, _ in one.saved] == [3, 4, 6, 9, 10]
    # the same losses: the global batch's mean, all-reduced, to float reduction order
    ref, got = one.losses(), two.losses()
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-4)
    # the same weights, to float reduction order. AdamW's update is about ±lr wherever √v is near |g|,
    # so an element whose true gradient is ~0 (a conv bias ahead of a GroupNorm) moves by up to the
    # learning rate either way on noise alone: the claim is on the model as a whole, and on almost
    # every element
    for part in ("unet", "vae"):
        mine, theirs = _weights(two_result, part), _weights(one_result, part)
        assert mine.keys() == theirs.keys()
        diff = torch.cat([(mine[k] - theirs[k]).flatten() for k in theirs])
        whole = torch.cat([theirs[k].flatten() for k in theirs])
        assert diff.norm() / whole.norm() < 1e-3, part
        assert (diff.abs() > 1e-4).float().mean() < 1e-3, part
    assert two_result.metrics["train_world_size"] == 2 and one_result.metrics["train_world_size"] == 1
    assert two_result.metrics["final_loss_unet"] == pytest.approx(one_result.metrics["final_loss_unet"], rel=1e-4)


@pytest.mark.slow
def test_a_stop_stops_every_rank_at_the_same_step_with_a_checkpoint(one_rank, dataset, tmp_path):
    """Rank 0's should_stop() is broadcast: rank 1 stops at the same step (had it gone on, it
    would have ended apart or failed, and train would raise RuntimeError, not TrainingStopped).
    With gradient checkpointing, under DDP: the same losses."""
    rec = Recorder(stop_at=AE_STEPS + 1)
    with pytest.raises(TrainingStopped, match=f"stopped at step {AE_STEPS + 1}"):
        train(ddp_params(gradient_checkpointing=True), workdir=tmp_path, dataset=dataset, base_model_dir=None,
              hooks=rec.hooks(), progress_every=1, world_size=2)
    assert rec.progress[-1]["step"] == AE_STEPS + 1
    ref, got = one_rank[0].losses(), rec.losses()
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-4)
    step, ckpt = rec.saved[-1]
    assert step == AE_STEPS + 1
    assert json.loads((ckpt / "state.json").read_text())["global_step"] == AE_STEPS + 1


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for init to reap it, is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


_ORPHAN = """
import multiprocessing, os, sys, threading
from worker.model.distributed import die_with_parent

def rank(parent_pid, path):
    die_with_parent(parent_pid)
    open(path, "w").write(str(os.getpid()))
    threading.Event().wait()  # in no collective: nothing but die_with_parent ends it

if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(target=rank, args=(os.getpid(), sys.argv[1])).start()
    threading.Event().wait()
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_dies_with_its_parent_even_by_sigkill(tmp_path):
    """The mechanism alone (the test below also passes through gloo: a rank waiting in a collective
    sees the dead peer's connection close): a child that only waits outlives a SIGKILLed parent
    unless die_with_parent took hold."""
    script, pid_file = tmp_path / "orphan.py", tmp_path / "rank.pid"
    script.write_text(_ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = None
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 120, "the child to start")
        child = int(pid_file.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not _alive(child), 10, "the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):  # the test failed: leave no orphan behind
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_job_process_leaves_no_rank_and_its_checkpoint_resumes(one_rank, dataset, tmp_path):
    pause_at = AE_STEPS + 2  # a checkpoint step in the U-Net stage
    out = tmp_path / "job"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-m", "tests.worker.ddp_job", str(out), str(pause_at)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        paused = wait_until(lambda: (out / "paused").exists() or job.poll() is not None, 600, "the job to pause")
        assert paused and job.poll() is None, job.stderr.read().decode()[-3000:]
        info = json.loads((out / "paused").read_text())
        assert info["pid"] == job.pid and len(info["ranks"]) == 1
        assert all(_alive(pid) for pid in info["ranks"])
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        wait_until(lambda: not any(_alive(pid) for pid in info["ranks"]), 15, "the ranks to die with the job")
    finally:
        if job.poll() is None:
            job.kill()
        job.stderr.close()
        for pid in json.loads((out / "paused").read_text())["ranks"] if (out / "paused").exists() else []:
            if _alive(pid):  # the test failed: leave no orphan behind
                os.kill(pid, signal.SIGKILL)

    # a new run resumes from the checkpoint the killed one stored, on two ranks, and finishes
    rec = Recorder(resume_from=out / f"step-{pause_at:08d}")
    result = _run(tmp_path / "resumed", dataset, 2, rec)
    assert [p["step"] for p in rec.progress] == list(range(pause_at + 1, TOTAL + 1))
    ref = one_rank[0].losses()
    got = rec.losses()
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-4)
    history = json.loads(result.artifacts["loss_history.json"].read_text())
    assert [s for s, _ in history["unet"]] == list(range(AE_STEPS + 1, TOTAL + 1))  # the killed run's steps kept


@pytest.mark.slow
def test_fine_tuning_a_base_model_on_two_ranks_matches_one_rank(one_rank, dataset, tmp_path):
    """With a base model only the U-Net trains (no autoencoder stage): every rank loads the base
    pipeline itself and the losses are one rank's."""
    base = one_rank[1].pipeline_dir
    recs = {}
    for world_size in (1, 2):
        recs[world_size] = Recorder()
        result = train(ddp_params(base_model="m_base", steps=3), workdir=tmp_path / str(world_size), dataset=dataset,
                       base_model_dir=base, hooks=recs[world_size].hooks(), progress_every=1, world_size=world_size)
        assert result.metrics["train_world_size"] == world_size
    ref, got = recs[1].losses(), recs[2].losses()
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-4)
    vae = load_file(next((base / "vae").glob("*.safetensors")))
    tuned = load_file(next((result.pipeline_dir / "vae").glob("*.safetensors")))
    assert all(torch.equal(tuned[k], vae[k]) for k in vae)  # the base's autoencoder, untouched
