"""Checks on a diffusers-format pipeline directory before it is stored or loaded.

A pipeline folder is tenant input, so it is hostile until proven otherwise. One check
(:func:`check_pipeline_files`, or :func:`check_pipeline_dir` for a local folder) serves the API's
import, the registry (a finished train job, ``ldmq models import``) and the worker's load:

- **paths**: every file is a plain relative path (no ``..``, ``\\``, leading ``/``, empty part or
  control character), so no download of it can land outside its folder;
- **no pickles**: weights only as safetensors; a pickle (``.bin``, ``.pt``, ``.ckpt`` …) is refused
  by its name, before any byte of it is read, let alone unpickled;
- **no code**: no ``.py`` file anywhere, and every component in ``model_index.json`` names a class
  of ``diffusers`` or ``transformers`` from a fixed list (a custom component is a Python module that
  ``from_pretrained`` would import); ``safety_checker``/``feature_extractor`` must be null;
- a component config with ``auto_map`` (transformers' "trust remote code" hook) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from shared.paths import plain_relative_path

# Weight files that are pickles: refused by name, never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dll", ".dylib")

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PIPELINE_CLASSES = ("StableDiffusionPipeline",)
# The classes a component may be (library, class). Anything else is refused, listing these.
ALLOWED_COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "unet": {"diffusers": ("UNet2DConditionModel",)},
    "vae": {"diffusers": ("AutoencoderKL", "AutoencoderTiny")},
    "text_encoder": {"transformers": ("CLIPTextModel", "CLIPTextModelWithProjection", "BertModel")},
    "tokenizer": {"transformers": ("CLIPTokenizer", "CLIPTokenizerFast", "BertTokenizer", "BertTokenizerFast")},
    "scheduler": {"diffusers": (
        "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
    )},
}
NULL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
PIPELINE_OPTIONS = ("requires_safety_checker",)  # plain values, not components


class PipelineRejected(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _check_index(index: dict, problems: list[str]) -> None:
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        problems.append(f"model_index.json: _class_name {cls!r} is not one of {', '.join(PIPELINE_CLASSES)}")
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if name in PIPELINE_OPTIONS:
            if not isinstance(spec, (bool, int, float, str, type(None))):
                problems.append(f"model_index.json: option {name!r} must be a plain value")
            continue
        if name in NULL_COMPONENTS:
            if spec not in (None, [None, None]):
                problems.append(f"model_index.json: component {name!r} must be null")
            continue
        allowed = ALLOWED_COMPONENTS.get(name)
        if allowed is None:
            problems.append(f"model_index.json: unknown component {name!r}; valid: {', '.join(ALLOWED_COMPONENTS)}")
            continue
        if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, str) for x in spec)):
            problems.append(f"model_index.json: component {name!r} must be [library, class]")
            continue
        library, class_name = spec
        if class_name not in allowed.get(library, ()):
            valid = ", ".join(f"{lib}.{c}" for lib, classes in allowed.items() for c in classes)
            problems.append(f"model_index.json: component {name!r} is {library}.{class_name}; valid: {valid}")


def check_pipeline_files(rel_paths: list[str], model_index: bytes | None,
                         read_config: Callable[[str], bytes] | None = None) -> dict:
    """Validate the file list (paths relative to the pipeline root) and model_index.json; with
    ``read_config`` (relative path → bytes) also each component's JSON config.

    Returns the parsed model_index; raises PipelineRejected listing every problem.
    """
    problems: list[str] = []
    bad_paths = [f"{p!r}: {why}" for p in rel_paths if (why := plain_relative_path(p))]
    if bad_paths:
        problems.append("file paths must be plain relative paths: " + "; ".join(sorted(bad_paths)[:20]))
    pickles = [p for p in rel_paths if p.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append("pickle weight files are refused (only safetensors are accepted): " + ", ".join(sorted(pickles)))
    code = [p for p in rel_paths if p.lower().endswith(CODE_SUFFIXES)]
    if code:
        problems.append("code files are refused (pipelines carry weights and configs only): " + ", ".join(sorted(code)))
    index: dict = {}
    if model_index is None:
        problems.append("model_index.json is missing")
    else:
        try:
            index = json.loads(model_index)
            if not isinstance(index, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            problems.append(f"model_index.json is not valid JSON: {exc}")
            index = {}
        if index:
            _check_index(index, problems)
    for comp in REQUIRED_COMPONENTS:
        if not any(p.startswith(comp + "/") for p in rel_paths):
            problems.append(f"component directory {comp}/ is missing")
    for comp in WEIGHT_COMPONENTS:
        if any(p.startswith(comp + "/") for p in rel_paths) and not any(
            p.startswith(comp + "/") and p.endswith(".safetensors") for p in rel_paths
        ):
            problems.append(f"{comp}/ has no .safetensors weights")
    if read_config is not None and not bad_paths:
        for rel in rel_paths:
            if rel.count("/") == 1 and rel.endswith(".json") and rel.split("/")[0] in ALLOWED_COMPONENTS:
                try:
                    config = json.loads(read_config(rel))
                except ValueError:
                    problems.append(f"{rel} is not valid JSON")
                    continue
                if isinstance(config, dict) and "auto_map" in config:
                    problems.append(f"{rel} has auto_map (remote code is never run)")
    if problems:
        raise PipelineRejected(problems)
    return index


def check_pipeline_dir(path: Path) -> dict:
    """:func:`check_pipeline_files` on a local folder; links are refused (they could point anywhere)."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineRejected([f"{path} is not a directory"])
    links = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_symlink()]
    if links:
        raise PipelineRejected(["symbolic links are refused: " + ", ".join(sorted(links))])
    rel = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    index = path / "model_index.json"
    return check_pipeline_files(rel, index.read_bytes() if index.is_file() else None,
                                read_config=lambda r: (path / r).read_bytes())
