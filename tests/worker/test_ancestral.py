"""The ddpm sampler (worker/model/ancestral.py): Algorithm 2 over a StableDiffusionPipeline's parts
gives diffusers' DDPMScheduler pipeline images, to float rounding, for the same seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a digit", "another digit", "a digit"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from worker.model.pipelines import load_pipeline_dir

    return load_pipeline_dir(tiny_pipeline_dir)


def _gens():
    return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]


def _with_ddpm(pipe, **config):
    from diffusers import DDPMScheduler

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False, **config)
    return pipe


@pytest.mark.parametrize("guidance,prediction_type", [(4.0, "epsilon"), (1.0, "epsilon"), (3.0, "v_prediction")])
def test_ddpm_call_gives_the_diffusers_pipelines_images(pipe, guidance, prediction_type):
    from worker.model.ancestral import ddpm_pipeline_call

    _with_ddpm(pipe, prediction_type=prediction_type)
    kw = dict(prompt=PROMPTS, num_inference_steps=10, guidance_scale=guidance, output_type="np")
    theirs = pipe(generator=_gens(), **kw).images
    ours = ddpm_pipeline_call(pipe, generator=_gens(), **kw).images
    assert ours.shape == theirs.shape == (3, 32, 32, 3)
    assert np.abs(ours - theirs).max() < 1e-5  # measured 5e-7 (2.6e-6 over 1000 steps)
    assert np.array_equal(np.round(ours * 255), np.round(theirs * 255))  # the same 8-bit pixels
    assert not np.allclose(ours[0], ours[1], atol=1e-3)  # different seeds, different images


def test_run_pipeline_sends_ddpm_through_algorithm_2_and_the_rest_through_the_pipeline(pipe):
    from worker.model.ancestral import ddpm_pipeline_call, run_pipeline
    from worker.model.schedulers import make_scheduler

    kw = dict(prompt=PROMPTS, num_inference_steps=6, guidance_scale=2.0, output_type="np")
    base = pipe.scheduler.config
    pipe.scheduler = make_scheduler("ddpm", base)
    routed = run_pipeline(pipe, generator=_gens(), **kw).images
    assert np.array_equal(routed, ddpm_pipeline_call(pipe, generator=_gens(), **kw).images)
    assert not np.array_equal(routed, pipe(generator=_gens(), **kw).images)  # rounding tells them apart
    pipe.scheduler = make_scheduler("ddim", base)
    assert np.array_equal(run_pipeline(pipe, generator=_gens(), **kw).images, pipe(generator=_gens(), **kw).images)


def test_ddpm_refuses_what_algorithm_2_does_not_cover(pipe):
    from worker.model.ancestral import ddpm_pipeline_call

    _with_ddpm(pipe, variance_type="learned_range")
    with pytest.raises(ValueError, match="fixed_small, fixed_large"):
        ddpm_pipeline_call(pipe, prompt=PROMPTS, num_inference_steps=2, generator=_gens())
