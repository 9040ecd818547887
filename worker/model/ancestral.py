"""The ``ddpm`` sampler: Algorithm 2 (:meth:`worker.model.diffusion.GaussianDiffusion.ancestral_sample`)
over the parts of a ``diffusers.StableDiffusionPipeline``.

:func:`run_pipeline` is how sampling jobs (``worker.model.sampling.generate``) and evaluation
(``worker.model.evaluation.generate``) call a pipeline: with a ``DDPMScheduler`` (what
``make_scheduler("ddpm", …)`` builds) it runs :func:`ddpm_pipeline_call`, otherwise the pipeline
itself. :func:`ddpm_pipeline_call` is ``StableDiffusionPipeline.__call__`` for the arguments ldmq
uses, with its denoising loop replaced by Algorithm 2: the same prompt encoding
(``encode_prompt``), the same x_T (``prepare_latents``, one draw per generator), the same
classifier-free guidance ε = ε_u + w (ε_c − ε_u), the same per-step noise source as
``DDPMScheduler.step`` (``randn_tensor`` on the same generators), the same decoding and
post-processing. The scheduler only chooses the timesteps (``set_timesteps``, so its
``timestep_spacing`` holds) and gives the β (its own float32 ``betas``).

Pixels against the diffusers loop it replaced: the same to float rounding (μ_θ is computed as
(x_t − β/√(1−ᾱ) ε)/√α rather than from the predicted x_0, and diffusers' 10⁻¹⁰·z at the last
step is not added), so a ``ddpm`` image can differ from the one the same seed gave before by
rounding only (tiny pipeline, 10 steps: max |Δ| below one 8-bit level; tests/worker/test_ancestral.py).
Each image still depends only on its seed (fixed batch size, one generator per image).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from worker.model.diffusion import VARIANCE_TYPES, GaussianDiffusion


def run_pipeline(pipe, **kwargs):
    """``pipe(**kwargs)``, except that the ``ddpm`` sampler (a ``DDPMScheduler``, exactly: not a
    subclass) runs Algorithm 2 (:func:`ddpm_pipeline_call`)."""
    from diffusers import DDPMScheduler

    if type(pipe.scheduler) is DDPMScheduler:
        return ddpm_pipeline_call(pipe, **kwargs)
    return pipe(**kwargs)


def _diffusion_of(scheduler) -> tuple[GaussianDiffusion, str]:
    """The process of a ``DDPMScheduler`` (its own β) and its σ_t² choice; refuses what Algorithm 2
    does not cover, listing what it does."""
    cfg = scheduler.config
    if cfg.get("variance_type", "fixed_small") not in VARIANCE_TYPES:
        raise ValueError(f"the ddpm sampler supports variance_type {', '.join(VARIANCE_TYPES)}; "
                         f"this model's scheduler has {cfg.variance_type!r}: use ddim or dpm-solver++")
    if cfg.get("thresholding") or cfg.get("clip_sample"):
        raise ValueError("the ddpm sampler does not threshold or clip x_0; this scheduler config asks for it")
    return GaussianDiffusion.from_betas(scheduler.betas.double().cpu().numpy()), cfg.get("variance_type", "fixed_small")


@torch.no_grad()
def ddpm_pipeline_call(pipe, *, prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5, generator=None,
                       width: int | None = None, height: int | None = None, output_type: str = "pil",
                       callback_on_step_end=None, callback_on_step_end_tensor_inputs=()):
    """``pipe(...)`` with Algorithm 2 as its loop (see the module docstring). Returns an object with
    ``.images`` as the pipeline's output of ``output_type``. ``callback_on_step_end(pipe, i, t,
    tensors)`` is called after each step, as the pipeline does, with the tensors named in
    ``callback_on_step_end_tensor_inputs`` (``latents``: x_{t-1}, ``prompt_embeds``: the guided
    batch's context); its return value is ignored: Algorithm 2 has no corrector to hand back to."""
    from diffusers.utils.torch_utils import randn_tensor

    device = pipe._execution_device
    cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        prompt, device, 1, cfg, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
    context = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor

    scheduler = pipe.scheduler
    diffusion, variance_type = _diffusion_of(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps  # descending, as the pipeline visits them
    x_T = pipe.prepare_latents(prompt_embeds.shape[0], pipe.unet.config.in_channels, height, width,
                               prompt_embeds.dtype, device, generator)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    by_index = {int(t): t for t in timesteps}

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x_t] * 2) if cfg else x_t
        out = pipe.unet(x_in, by_index[int(t[0])], encoder_hidden_states=context, return_dict=False)[0]
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return diffusion.eps_from_prediction(out, x_t, t, prediction_type)

    unknown = set(callback_on_step_end_tensor_inputs) - {"latents", "prompt_embeds"}
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)}: valid are latents, prompt_embeds")

    def on_step(i: int, t: int, x) -> None:
        if callback_on_step_end is not None:
            tensors = {"latents": x, "prompt_embeds": context}
            callback_on_step_end(pipe, i, by_index[t], {k: tensors[k] for k in callback_on_step_end_tensor_inputs})

    latents = diffusion.ancestral_sample(
        eps_fn, x_T, timesteps=sorted(by_index), variance_type=variance_type, on_step=on_step,
        noise=lambda shape: randn_tensor(shape, generator=generator, device=device, dtype=x_T.dtype),
    )
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
    image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])
    return SimpleNamespace(images=image)
