"""The one pipeline check (import, registry, load): plain paths, no pickles, no code, known classes."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from shared.paths import plain_relative_path
from shared.pipelines import PipelineRejected, check_pipeline_dir, check_pipeline_files


@pytest.fixture
def pipeline(tiny_pipeline_dir, tmp_path):
    """A private copy of the tiny pipeline that a test may spoil."""
    return shutil.copytree(tiny_pipeline_dir, tmp_path / "pipe")


def _problems(path) -> str:
    with pytest.raises(PipelineRejected) as info:
        check_pipeline_dir(path)
    return " | ".join(info.value.problems)


def test_the_tiny_pipeline_passes(pipeline):
    index = check_pipeline_dir(pipeline)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


@pytest.mark.parametrize("path", ["../x", "a/../../b", "/etc/passwd", "a\\..\\b", "a//b", "./a", "a/./b", "",
                                  "a/\x00b", "C:/x", "x" * 600])
def test_paths_that_are_not_plain_relative_are_refused(path):
    assert plain_relative_path(path) is not None


@pytest.mark.parametrize("path", ["unet/config.json", "a/b/c.safetensors", "x..y/z", "..a/b"])
def test_plain_relative_paths_pass(path):
    assert plain_relative_path(path) is None


def test_a_traversal_key_is_refused_before_anything_else_is_read():
    rel = ["model_index.json", "unet/config.json", "../../victim/unet/diffusion_pytorch_model.safetensors"]
    with pytest.raises(PipelineRejected, match="plain relative paths"):
        check_pipeline_files(rel, b"{}", read_config=lambda r: pytest.fail(f"read {r}"))


def test_code_files_are_refused(pipeline):
    (pipeline / "unet" / "my_unet.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    assert "code files are refused" in _problems(pipeline)


def test_a_custom_component_class_is_refused_listing_the_valid_ones(pipeline):
    index = json.loads((pipeline / "model_index.json").read_text())
    index["unet"] = ["my_unet", "EvilUNet"]
    (pipeline / "model_index.json").write_text(json.dumps(index))
    problems = _problems(pipeline)
    assert "my_unet.EvilUNet" in problems and "diffusers.UNet2DConditionModel" in problems


def test_an_unknown_component_or_a_safety_checker_is_refused(pipeline):
    index = json.loads((pipeline / "model_index.json").read_text())
    index["controlnet"] = ["diffusers", "ControlNetModel"]
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (pipeline / "model_index.json").write_text(json.dumps(index))
    problems = _problems(pipeline)
    assert "unknown component 'controlnet'" in problems and "'safety_checker' must be null" in problems


def test_another_pipeline_class_is_refused(pipeline):
    index = json.loads((pipeline / "model_index.json").read_text())
    index["_class_name"] = "MyPipeline"
    (pipeline / "model_index.json").write_text(json.dumps(index))
    assert "_class_name 'MyPipeline'" in _problems(pipeline)


def test_remote_code_hooks_in_a_component_config_are_refused(pipeline):
    config = json.loads((pipeline / "text_encoder" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (pipeline / "text_encoder" / "config.json").write_text(json.dumps(config))
    assert "auto_map" in _problems(pipeline)


def test_pickles_are_refused_by_name(pipeline):
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    assert "pickle weight files are refused" in _problems(pipeline)


def test_symbolic_links_are_refused(pipeline, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    os.symlink(secret, pipeline / "vae" / "extra.json")
    assert "symbolic links are refused" in _problems(pipeline)
