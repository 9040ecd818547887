"""Training data as tensors: images (N, 3, R, R) in [−1, 1] with one caption each.

Two sources:
- ``builtin:digits`` — scikit-learn's 1,797 real 8×8 handwritten digits (values 0..16), upsampled to
  R×R by pixel repetition (nearest neighbour, so R/8 × R/8 blocks: averaging the blocks gives back
  the exact 8×8 image, which the digits evaluation relies on), as RGB, captioned in words
  ("a handwritten digit seven").
- an uploaded zip / tar / tar.gz archive with ``metadata.csv`` or ``metadata.jsonl`` (columns
  ``file_name``, ``text``), validated by :mod:`shared.datasets`; images are converted to RGB, the
  shorter side resized to R (bicubic, antialiased) and centre-cropped to R×R.

:class:`BatchOrder` is the order training visits them in.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.catalog import BUILTIN_DATASETS
from shared.datasets import archive_format, read_records

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(label: int) -> str:
    """The caption of digit ``label`` (0..9): "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


@dataclass
class ImageCaptionDataset:
    """Images (N, 3, R, R) float32 in [−1, 1] and N captions; ``labels`` (N,) int64 when the data
    has classes (digits), else None."""

    name: str
    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, R, R); got {tuple(self.images.shape)}")
        if len(self.captions) != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {len(self.captions)} captions")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be (N,)")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index: torch.Tensor) -> "ImageCaptionDataset":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageCaptionDataset(
            name=self.name,
            images=self.images[index],
            captions=[self.captions[i] for i in index.tolist()],
            labels=None if self.labels is None else self.labels[index],
        )

    def split(self, holdout_fraction: float, seed: int) -> tuple["ImageCaptionDataset", "ImageCaptionDataset"]:
        """(train, held-out): a seeded random ``holdout_fraction`` of the images is held out (at
        least one image each side when there are two or more)."""
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must be in [0, 1)")
        n = len(self)
        n_hold = int(round(n * holdout_fraction))
        if holdout_fraction > 0 and n >= 2:
            n_hold = min(max(n_hold, 1), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_hold:].sort().values), self.subset(perm[:n_hold].sort().values)



class BatchOrder:
    """Indices of successive batches: a fresh random permutation of the data each epoch (from the
    training generator); a batch that crosses an epoch boundary continues into the next one.

    Its state (the current permutation and the position in it) is part of every training checkpoint
    (:mod:`worker.model.checkpoint`), so a resumed run visits the data in the same order."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        """The next ``batch_size`` indices (int64, on the CPU)."""
        parts, need = [], self.batch_size
        while need:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(parts)

def load_dataset(ref: str, *, archive_path: Path | None = None, resolution: int = 32) -> ImageCaptionDataset:
    """``ref`` is ``builtin:digits`` or a dataset id whose archive the caller downloaded to
    ``archive_path``. Raises ValueError for an unknown builtin (listing the valid ones) or a missing
    archive, and :class:`shared.datasets.DatasetValidationError` for a bad archive."""
    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8; got {resolution}")
    if ref.startswith("builtin:"):
        if ref == "builtin:digits":
            return load_digits(resolution)
        raise ValueError(f"unknown builtin dataset {ref!r}; valid: {', '.join(BUILTIN_DATASETS)}")
    if archive_path is None:
        raise ValueError(f"dataset {ref!r} is not builtin ({', '.join(BUILTIN_DATASETS)}): archive_path is required")
    return load_archive(Path(archive_path), resolution, name=ref)


def load_digits(resolution: int = 32) -> ImageCaptionDataset:
    """scikit-learn's digits: (1797, 3, R, R) in [−1, 1] (0..16 mapped linearly), words as captions."""
    from sklearn.datasets import load_digits as sk_load_digits

    if resolution % 8:
        raise ValueError(f"digits resolution must be a multiple of 8; got {resolution}")
    digits = sk_load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)) / 8.0 - 1.0  # (N, 8, 8) in [-1, 1]
    k = resolution // 8
    x = x.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)  # nearest-neighbour upsampling
    images = x[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageCaptionDataset(
        name="builtin:digits",
        images=images,
        captions=[digit_caption(int(y)) for y in labels],
        labels=labels,
    )


def _detect_format(path: Path) -> str:
    """Archive format from the file name, else from magic bytes; ValueError if neither tells."""
    try:
        return archive_format(path.name)
    except ValueError:
        pass
    with open(path, "rb") as f:
        data = f.read(512)
    if data[:4] == b"PK\x03\x04":
        return "zip"
    if data[:2] == b"\x1f\x8b":
        return "tar.gz"
    if data[257:262] == b"ustar":
        return "tar"
    raise ValueError(f"{path.name}: not a zip, tar or tar.gz archive (by name or content)")


def load_archive(path: Path, resolution: int, name: str = "") -> ImageCaptionDataset:
    """Decode an uploaded archive (see the module docstring) into an :class:`ImageCaptionDataset`."""
    from PIL import Image

    fmt = _detect_format(path)
    with open(path, "rb") as f:  # read member by member, never the archive whole in memory
        _, records = read_records(f, f"archive.{fmt}")
    images = torch.empty(len(records), 3, resolution, resolution)
    for i, rec in enumerate(records):
        with Image.open(io.BytesIO(rec.data)) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = resolution / min(w, h)
            img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        images[i] = torch.from_numpy(arr).permute(2, 0, 1)
    return ImageCaptionDataset(name=name or path.name, images=images, captions=[r.text for r in records])
