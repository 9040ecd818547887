"""LoRA models: a stored adapter that names the pipeline it adapts (no torch; api and worker share it).

A LoRA train job stores the adapter alone (a few KB to MB, against the base pipeline's whole
weights), in diffusers' format, so ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(dir)``
loads it with no ldmq code. Its model record's ``config`` holds:

- ``base_model``: the id of the pipeline model it adapts (a model named there cannot be deleted:
  ``shared.deletion.model_users``);
- ``lora``: ``{"rank", "alpha", "target_modules"}``, what it was trained with (ΔW = (α / r) B A).

The folder is tenant-visible output that a worker loads again, so it gets the same kind of check as
a pipeline folder (:mod:`shared.pipelines`): plain relative paths, and exactly the one safetensors
file diffusers reads, nothing else (no pickle, no code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.paths import plain_relative_path
from shared.pipelines import PipelineRejected

# diffusers' file name for LoRA weights in safetensors (diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE),
# the one it looks for when load_lora_weights is given a folder.
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
CONFIG_BASE_MODEL = "base_model"
CONFIG_LORA = "lora"


def base_of(config: dict[str, Any] | None) -> str | None:
    """The id of the pipeline a model adapts, or None for a pipeline model."""
    return (config or {}).get(CONFIG_BASE_MODEL)


def lora_config(rank: int, alpha: float, target_modules: list[str]) -> dict[str, Any]:
    """The ``config["lora"]`` entry of a LoRA model."""
    return {"rank": rank, "alpha": alpha, "target_modules": list(target_modules)}


def check_adapter_files(rel_paths: list[str]) -> None:
    """Refuse anything but the adapter's one safetensors file at the folder's root."""
    problems = [f"{p!r}: {why}" for p in rel_paths if (why := plain_relative_path(p))]
    others = sorted(p for p in rel_paths if p != ADAPTER_WEIGHTS)
    if others:
        problems.append(f"an adapter folder holds only {ADAPTER_WEIGHTS}; also found: {', '.join(others[:20])}")
    if ADAPTER_WEIGHTS not in rel_paths:
        problems.append(f"{ADAPTER_WEIGHTS} is missing")
    if problems:
        raise PipelineRejected(problems)


def check_adapter_dir(path: Path) -> None:
    """:func:`check_adapter_files` on a local folder; links are refused."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineRejected([f"{path} is not a directory"])
    if any(p.is_symlink() for p in path.rglob("*")):
        raise PipelineRejected(["symbolic links are refused"])
    check_adapter_files([p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()])
