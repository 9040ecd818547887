"""worker.jobs.train.CheckpointUploader: background uploads, in order, pointer after the files."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from shared.jobstate import LeaseLost
from shared.storage import FileStorage
from worker.jobs.train import CheckpointUploader


class Run:
    """The two things the uploader reads of a JobRun, and its fenced pointer write."""

    def __init__(self, fail_at: int | None = None):
        self.job_id, self.attempt = "job1", 2
        self.pointers: list[str] = []
        self.infos: list[dict] = []
        self.fail_at = fail_at
        self.gate = threading.Event()
        self.gate.set()

    def set_checkpoint(self, prefix: str, info: dict | None = None) -> None:
        self.gate.wait(30)
        if self.fail_at is not None and len(self.pointers) + 1 == self.fail_at:
            raise LeaseLost(self.job_id)
        self.pointers.append(prefix)
        self.infos.append(info)


def checkpoint(root: Path, step: int) -> Path:
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(f'{{"step": {step}}}')
    (d / "unet.safetensors").write_bytes(bytes([step]) * 100)
    if step == 20:  # evaluated: its metrics travel in the checkpoint's event
        (d / "metrics.json").write_text(f'{{"step": {step}, "heldout_bits_per_dim": 1.5}}')
    if step == 30:  # not an object: left out, the checkpoint still counts
        (d / "metrics.json").write_text("[1, 2]")
    return d


def test_uploads_in_order_keep_the_last_k_and_survive_local_pruning(tmp_path):
    storage, run = FileStorage(tmp_path / "objects"), Run()
    up = CheckpointUploader(storage, run, "t1", keep=2, staging=tmp_path / "staging", saved=[])
    run.gate.clear()  # hold the uploads: submit must not wait for them
    for step in (10, 20):
        local = checkpoint(tmp_path / "loop", step)
        up.submit(step, local)
        shutil.rmtree(local)  # the loop prunes its own copy at once
    assert run.pointers == []  # nothing stored yet, and submit returned
    run.gate.set()
    up.submit(30, checkpoint(tmp_path / "loop", 30))
    up.wait()
    up.close()
    assert [p.rsplit("/", 1)[1] for p in run.pointers] == ["step-00000010-a2", "step-00000020-a2", "step-00000030-a2"]
    assert run.infos == [{"step": 10, "metrics": {}}, {"step": 20, "metrics": {"step": 20, "heldout_bits_per_dim": 1.5}},
                         {"step": 30, "metrics": {}}]
    kept = sorted({k.split("/")[-2] for k in storage.list("t1/")})
    assert kept == ["step-00000020-a2", "step-00000030-a2"]  # the oldest was deleted after the newest landed
    assert storage.get_bytes(run.pointers[-1] + "/unet.safetensors") == bytes([30]) * 100
    assert not any((tmp_path / "staging").iterdir())


def test_a_failed_upload_is_raised_by_the_next_call(tmp_path):
    storage, run = FileStorage(tmp_path / "objects"), Run(fail_at=1)
    up = CheckpointUploader(storage, run, "t1", keep=3, staging=tmp_path / "staging", saved=[])
    up.submit(10, checkpoint(tmp_path / "loop", 10))
    with pytest.raises(LeaseLost):
        up.wait()
    up.close()
    assert run.pointers == []
