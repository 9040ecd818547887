"""Datasets as tensors (worker/model/data.py)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from shared.datasets import DatasetValidationError
from worker.model.data import digit_caption, load_dataset


def test_builtin_digits_are_the_real_digits_upsampled():
    from sklearn.datasets import load_digits

    ds = load_dataset("builtin:digits", resolution=32)
    assert ds.images.shape == (1797, 3, 32, 32) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert len(ds.captions) == 1797 and ds.labels.shape == (1797,)
    real = load_digits()
    assert ds.captions[0] == "a handwritten digit zero" == digit_caption(int(real.target[0]))
    assert digit_caption(7) == "a handwritten digit seven"
    # 4x4 block averages give back the exact 8x8 digits (values 0..16)
    back = torch.nn.functional.avg_pool2d(ds.images[:, :1], 4)[:, 0]
    np.testing.assert_allclose((back.numpy() + 1) * 8, real.images, atol=1e-5)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # gray as RGB
    assert ds.resolution == 32


def test_split_is_seeded_and_disjoint():
    ds = load_dataset("builtin:digits", resolution=8)
    train, held = ds.split(0.1, seed=3)
    assert len(train) + len(held) == len(ds) and len(held) == 180
    train2, held2 = ds.split(0.1, seed=3)
    assert torch.equal(held.images, held2.images) and held.captions == held2.captions
    _, held3 = ds.split(0.1, seed=4)
    assert not torch.equal(held.images, held3.images)


def test_unknown_builtin_and_missing_archive_and_bad_resolution():
    with pytest.raises(ValueError, match="valid: builtin:digits"):
        load_dataset("builtin:mnist")
    with pytest.raises(ValueError, match="archive_path is required"):
        load_dataset("ds_123")
    with pytest.raises(ValueError, match="multiple of 8"):
        load_dataset("builtin:digits", resolution=20)


def _png(size, colour):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_zip_archive_with_csv(tmp_path):
    path = tmp_path / "upload.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("red.png", _png((40, 20), (255, 0, 0)))
        zf.writestr("blue.png", _png((16, 16), (0, 0, 255)))
        zf.writestr("metadata.csv", "file_name,text\nred.png,a red thing\nblue.png,a blue thing\n")
    ds = load_dataset("ds_1", archive_path=path, resolution=16)
    assert ds.images.shape == (2, 3, 16, 16) and ds.labels is None
    assert ds.captions == ["a red thing", "a blue thing"] and ds.name == "ds_1"
    assert torch.allclose(ds.images[0, 0], torch.ones(16, 16)) and torch.allclose(ds.images[0, 2], -torch.ones(16, 16))
    assert torch.allclose(ds.images[1, 2], torch.ones(16, 16))


def test_tar_gz_archive_without_suffix_is_sniffed(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in [
            ("g.png", _png((8, 8), (0, 255, 0))),
            ("metadata.jsonl", (json.dumps({"file_name": "g.png", "text": "green"}) + "\n").encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path = tmp_path / "archive"  # a downloaded object without a suffix
    path.write_bytes(buf.getvalue())
    ds = load_dataset("ds_2", archive_path=path, resolution=8)
    assert ds.captions == ["green"] and torch.allclose(ds.images[0, 1], torch.ones(8, 8))


def test_bad_archive_raises_validation_error(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.csv", "file_name,text\nmissing.png,x\n")
    with pytest.raises(DatasetValidationError):
        load_dataset("ds_3", archive_path=path, resolution=8)
    junk = tmp_path / "junk"
    junk.write_bytes(b"neither zip nor tar")
    with pytest.raises(ValueError, match="not a zip, tar or tar.gz"):
        load_dataset("ds_4", archive_path=junk, resolution=8)
