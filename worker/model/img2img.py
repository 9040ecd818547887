"""Image-to-image and inpainting over a loaded text-to-image pipeline's own parts: the same U-Net,
VAE, text encoder and scheduler objects (no second copy of any weight).

Pure torch and diffusers (no database, no storage): the caller hands in decoded images
(``PIL.Image``); ``worker.jobs`` fetches them.

Why a loop of its own rather than diffusers' ``StableDiffusionImg2ImgPipeline(**pipe.components)``
/ ``StableDiffusionInpaintPipeline``: diffusers' inpainting pipeline accepts only U-Nets of 4 input
channels (latent blending) or 9 (an inpainting U-Net), and ldmq's trained models have
``latent_channels`` latents (2 by default, ``shared.train_schema``) and a U-Net of as many
channels. The loop below is those two pipelines' ``__call__`` for the arguments ldmq uses, for any
number of latent channels, with one loop for both modes:

- the start (the forward process q(x_t | x_0), docs/model.md): z_0 = E(x) · scaling_factor, one
  posterior draw per image from its own generator; the sampler's schedule for ``steps`` is cut to
  its last ⌊strength · steps⌋ steps (diffusers' ``get_timesteps``), and
  z_{t_s} = √ᾱ_{t_s} z_0 + √(1 − ᾱ_{t_s}) ε with t_s the first kept step (≈ strength · T with
  ldmq's trailing spacing), ε drawn from the image's generator;
- the same denoising steps as text-to-image (classifier-free guidance, the scheduler's ``step``,
  the step callback that runs langevin-pc's corrector and the job's progress and stop checks);
- inpainting (a mask; white is redrawn): after every step, the known region is put back at the
  level just reached, z ← (1 − m) · q(z_0 at t_{i+1}, same ε) + m · z, and at the end the known
  region is z_0 itself, so outside the mask the output is the VAE's round trip of the init image
  (tests/worker/test_img2img.py measures it). The blend comes after the step callback, so a
  corrector step never leaves the known region off its level.

Determinism is that of text prompts: every random draw (posterior sample, ε, the scheduler's
noise) comes from the image's own generator, images are encoded one at a time, and the batch is
of a fixed size, so an image depends only on its seed, prompt, input images and strength.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from shared.catalog import denoising_steps

# What an image to make is: a text prompt alone, image-to-image, inpainting. Items of one model
# batch share their mode and strength (strength sets where the batch's denoising starts).
TEXT, IMG2IMG, INPAINT = "text", "img2img", "inpaint"


def mode_of(init_image: str | None, mask_image: str | None) -> str:
    if init_image is None:
        return TEXT
    return INPAINT if mask_image is not None else IMG2IMG


def _mask_processor(pipe):
    from diffusers.image_processor import VaeImageProcessor

    # As StableDiffusionInpaintPipeline builds it: grey levels, [0, 1], binarised at 0.5.
    return VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


def encode_images(pipe, images, *, width: int, height: int, generator: list, device) -> torch.Tensor:
    """z_0 of each image: as RGB (a grey, palette or RGBA upload too), resized to width × height,
    encoded one at a time, a posterior draw from its generator, times the VAE's scaling factor."""
    images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    x = pipe.image_processor.preprocess(images, height=height, width=width).to(device=device, dtype=pipe.vae.dtype)
    latents = [pipe.vae.encode(x[i:i + 1]).latent_dist.sample(generator=generator[i]) for i in range(len(images))]
    return torch.cat(latents) * pipe.vae.config.scaling_factor


def latent_masks(pipe, masks, *, width: int, height: int, device, dtype) -> torch.Tensor:
    """Each mask at the latents' size, 1 where the image is redrawn, 0 where it is kept."""
    m = _mask_processor(pipe).preprocess(masks, height=height, width=width)
    s = pipe.vae_scale_factor
    m = torch.nn.functional.interpolate(m, size=(height // s, width // s))  # nearest, as diffusers does
    return m.to(device=device, dtype=dtype)


@torch.no_grad()
def image_to_image_call(pipe, *, init_images, mask_images=None, strength: float, prompt_embeds,
                        negative_prompt_embeds=None, num_inference_steps: int, guidance_scale: float, generator: list,
                        width: int, height: int, output_type: str = "np", callback_on_step_end=None,
                        callback_on_step_end_tensor_inputs=("latents",)):
    """Image-to-image (``mask_images`` None) or inpainting from ``init_images`` (one ``PIL.Image``
    per image, like ``generator``), with the pipeline's parts; see the module docstring. Returns an
    object with ``.images`` as the pipeline's output of ``output_type`` (``"latent"``: z_0 after
    denoising, for tests)."""
    from diffusers.utils.torch_utils import randn_tensor

    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], not {strength}")
    n = len(init_images)
    if len(generator) != n or (mask_images is not None and len(mask_images) != n):
        raise ValueError("one generator (and one mask, when inpainting) per init image")
    unknown = set(callback_on_step_end_tensor_inputs) - {"latents", "prompt_embeds"}
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)}: valid are latents, prompt_embeds")
    unet_cfg, latent_channels = pipe.unet.config, pipe.vae.config.latent_channels
    if unet_cfg.in_channels != latent_channels:  # e.g. Stable Diffusion's 9-channel inpainting U-Net
        raise ValueError(f"image-to-image needs a U-Net of the latents' {latent_channels} channels; this model's "
                         f"takes {unet_cfg.in_channels} (an inpainting U-Net is not supported)")
    if unet_cfg.time_cond_proj_dim is not None:
        raise ValueError("image-to-image does not drive a U-Net with a guidance embedding (time_cond_proj_dim)")
    device = pipe._execution_device
    # What the pipeline's properties (do_classifier_free_guidance, guidance_scale, ...) read, as its
    # __call__ sets them: the step callback's corrector evaluates the U-Net through them.
    pipe._guidance_scale, pipe._guidance_rescale, pipe._clip_skip = guidance_scale, 0.0, None
    pipe._cross_attention_kwargs, pipe._interrupt = None, False
    cfg = pipe.do_classifier_free_guidance
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        None, device, 1, cfg, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
    context = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds

    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    kept = denoising_steps(num_inference_steps, strength)
    if kept < 1:
        raise ValueError(f"strength {strength} x steps {num_inference_steps} leaves no denoising step")
    start = (num_inference_steps - kept) * scheduler.order
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):  # multistep solvers index their sigmas from here
        scheduler.set_begin_index(start)

    z0 = encode_images(pipe, init_images, width=width, height=height, generator=generator, device=device)
    z0 = z0.to(prompt_embeds.dtype)
    noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=z0.dtype)
    latents = scheduler.add_noise(z0, noise, timesteps[:1].repeat(n))  # q(z_{t_s} | z_0)
    mask = None if mask_images is None else latent_masks(pipe, mask_images, width=width, height=height,
                                                          device=device, dtype=z0.dtype)

    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        eps = pipe.unet(x_in, t, encoder_hidden_states=context, return_dict=False)[0]
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
        if callback_on_step_end is not None:
            tensors = {"latents": latents, "prompt_embeds": context}
            out = callback_on_step_end(pipe, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
            latents = (out or {}).get("latents", latents)
        if mask is not None:
            known = z0 if i == len(timesteps) - 1 else scheduler.add_noise(z0, noise, timesteps[i + 1:i + 2].repeat(n))
            latents = (1 - mask) * known + mask * latents

    if output_type == "latent":
        return SimpleNamespace(images=latents)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
    image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * n)
    return SimpleNamespace(images=image)
