"""Load diffusers text-to-image pipelines from local folders, cached per worker process (LRU by memory).

Only safetensors weights are accepted: the file list is checked before anything is loaded, and
``from_pretrained`` is told ``use_safetensors=True``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from shared.pipelines import check_pipeline_dir
from worker.model.schedulers import make_scheduler

log = logging.getLogger(__name__)

def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu" or name.startswith("cuda"):
        return name
    raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")


def device_kind(device: str) -> str:
    """What a measured timing is keyed by: ``cpu``, or ``cuda:<device name>`` (an H200 and a T4
    differ by 20x; two H200s do not)."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"


def pipeline_view(pipe, scheduler: str):
    """A shallow copy of ``pipe`` with a scheduler of its own: the same modules (no weights copied),
    its own attributes, so several sampling calls can share a cached pipeline at once."""
    import copy

    view = copy.copy(pipe)
    view.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return view


DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_dtype(name: str, device: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_pipeline_dir(path: Path, device: str = "cpu", *, dtype: str = "auto", channels_last: bool = False,
                      compile_unet: bool = False):
    """Load a StableDiffusionPipeline-format directory after checking it holds no pickles.

    On GPU: half precision, PyTorch SDPA attention (diffusers' default processor), optional
    channels_last and ``torch.compile`` of the U-Net.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    check_pipeline_dir(path)
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        use_safetensors=True, local_files_only=True, dtype=resolve_dtype(dtype, device),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return pipe


def pipeline_bytes(pipe) -> int:
    """Bytes of the pipeline's weights and buffers (what it holds on its device while cached)."""
    import torch

    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in component.parameters())
            total += sum(t.numel() * t.element_size() for t in component.buffers())
    return total


def default_cache_bytes(device: str) -> int:
    """Auto budget: half the GPU's memory (the rest is for activations), or a quarter of the RAM."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def fetch_dir_once(local: Path, fetch: Callable[[Path], object], marker: str) -> Path:
    """``local``, holding a whole copy of what ``fetch(dir)`` writes into a directory, fetched once
    per machine. Workers on one machine share the cache folder, and the pieces of a spread job
    load the same model at the same moment: one worker checking for ``marker`` while another was
    still writing the files loaded a half-written copy (``text_encoder`` missing, seen in
    tests/faults/test_piece_faults.py). So the files go to a private temporary sibling that is
    renamed into place whole (``rename`` is atomic on one file system); a worker that loses the
    race drops its copy and uses the winner's. A folder without ``marker`` (a fetch that died under
    an older layout) is replaced."""
    if (local / marker).exists():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        fetch(tmp)
        if local.exists() and not (local / marker).exists():
            shutil.rmtree(local, ignore_errors=True)
        try:
            os.rename(tmp, local)
        except OSError:
            if not (local / marker).exists():  # not another worker's whole copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


class PipelineCache:
    """Loaded pipelines keyed by model id, least recently used evicted first: past ``capacity``
    pipelines, or once their weights take more than ``max_bytes`` (the pipeline just loaded always
    stays). The files are kept under ``cache_dir``, so a reload reads the disk, not the storage."""

    def __init__(self, cache_dir: Path, capacity: int = 4, max_bytes: int | None = None):
        self.cache_dir = Path(cache_dir)
        self.capacity = capacity
        self.max_bytes = max_bytes  # None: decided on the first load, from its device
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def get(self, model_id: str, fetch: Callable[[Path], object], device: str, **load_options):
        """The pipeline of ``model_id`` on ``device``; on a miss ``fetch(local_dir)`` puts its files
        there first (unless an earlier load left them), then :func:`load_pipeline_dir` loads them
        with ``load_options`` (dtype, channels_last, compile_unet)."""
        with self._lock:
            if model_id in self._items:
                self._items.move_to_end(model_id)
                return self._items[model_id][0]
            local = fetch_dir_once(self.cache_dir / model_id, fetch, "model_index.json")
            pipe = load_pipeline_dir(local, device, **load_options)
            self.loads += 1
            self._items[model_id] = (pipe, pipeline_bytes(pipe))
            if self.max_bytes is None:
                self.max_bytes = default_cache_bytes(device)
            self._evict(device)
            return pipe

    def _evict(self, device: str) -> None:
        evicted = False
        while len(self._items) > 1 and (len(self._items) > self.capacity or self.bytes > self.max_bytes):
            model_id, (_, size) = self._items.popitem(last=False)
            evicted = True
            log.info("pipeline cache: evicted %s (%.0f MiB); %d cached, %.0f MiB", model_id, size / 2**20,
                     len(self._items), self.bytes / 2**20)
        if evicted and device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # hand the evicted weights' memory back for the next batch
