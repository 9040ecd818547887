"""Checks on a diffusers-format pipeline directory before it is stored or loaded.

Weights are accepted only as safetensors: a pickle (``.bin``, ``.pt``, ``.ckpt`` …) is refused by
its name, before any byte of it is read, let alone unpickled.
"""

from __future__ import annotations

import json

# Weight files that are pickles: refused by name, never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")


class PipelineRejected(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def check_pipeline_files(rel_paths: list[str], model_index: bytes | None) -> dict:
    """Validate the file list (paths relative to the pipeline root) and model_index.json.

    Returns the parsed model_index; raises PipelineRejected listing every problem.
    """
    problems: list[str] = []
    pickles = [p for p in rel_paths if p.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append("pickle weight files are refused (only safetensors are accepted): " + ", ".join(sorted(pickles)))
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
    for comp in REQUIRED_COMPONENTS:
        if not any(p.startswith(comp + "/") for p in rel_paths):
            problems.append(f"component directory {comp}/ is missing")
    for comp in WEIGHT_COMPONENTS:
        if any(p.startswith(comp + "/") for p in rel_paths) and not any(
            p.startswith(comp + "/") and p.endswith(".safetensors") for p in rel_paths
        ):
            problems.append(f"{comp}/ has no .safetensors weights")
    if problems:
        raise PipelineRejected(problems)
    return index
