"""Inpainting editors: loading them, running an edit, and their UNet conditioning as differentiable code.

The threat that ``diffalign.defenses`` protects against is an inpainting edit: the attacker
keeps a region of a photo (a face, say) and lets an inpainting model regenerate everything
else from a prompt. The editor is diffusers' ``StableDiffusionInpaintPipeline`` with a
9-channel UNet (Stable Diffusion inpainting checkpoints), used unchanged.

Mask conventions, in one place because they are easy to get backwards:

- diffalign's ``keep_mask`` (``[1, H, W]``) is 1 on the region the attacker keeps. It is the
  region a defender protects, so it is the defenses' "protected mask".
- diffusers' ``mask_image`` is 1 where the image is *repainted*: ``mask_image = 1 - keep_mask``.
- The 9-channel UNet input is ``cat([noisy latents (4), repaint mask at latent size (1),
  masked-image latents (4)])`` along channels, in that order
  (``StableDiffusionInpaintPipeline.__call__``). The masked image is the image in [-1, 1]
  with the repainted pixels set to 0 (mid-grey), i.e. only the kept region is visible.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline, UNet2DConditionModel

from diffalign.pipeline import PipelineError, builtin_names, resolve, sd_ddim_scheduler, tiny_random_pipeline


def tiny_random_inpaint_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """A few-MB ``StableDiffusionInpaintPipeline`` with random weights: 32×32 images, 4×16×16 latents.

    The VAE, text encoder and real CLIP tokenizer are those of ``tiny-random``
    (``diffalign.pipeline.tiny_random_pipeline``); the UNet has the same config with 9 input
    channels, as Stable Diffusion inpainting checkpoints do. DDIM with SD 1.x's noise schedule.
    """
    base = tiny_random_pipeline(seed=seed)
    latent_channels = base.vae.config.latent_channels
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 2 * latent_channels + 1})
    pipe = StableDiffusionInpaintPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_inpainting(
    spec: str | DiffusionPipeline, *, torch_dtype: torch.dtype = torch.float32, seed: int = 0
) -> StableDiffusionInpaintPipeline:
    """A ``StableDiffusionInpaintPipeline`` with a 9-channel UNet, or a ``PipelineError`` that says why not.

    ``spec`` is a pipeline object (a ``StableDiffusionInpaintPipeline``, or any pipeline with
    the same components, which is rebuilt as one), a registered inpainting name
    (``builtin_names("inpainting")``: ``tiny-random-inpaint``, random weights for tests that
    ``seed`` picks, and what providers add, such as ShapesWorld's ``shapes-inpaint``), a local
    pipeline folder or a Hugging Face hub id already in the local cache (``diffalign.pipeline.resolve``,
    the loader path text-to-image pipelines take too). The pipeline keeps its own scheduler: it
    is the editor's, and the defenses read the attacked timestep from it.
    """
    if isinstance(spec, DiffusionPipeline):
        pipe = spec
        if not isinstance(pipe, StableDiffusionInpaintPipeline):
            names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
            components = {name: pipe.components.get(name) for name in names}
            pipe = StableDiffusionInpaintPipeline(
                **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
    else:
        pipe = resolve(
            spec, StableDiffusionInpaintPipeline, torch_dtype=torch_dtype, seed=seed, kind="inpainting"
        )
    check_inpainting_unet(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_inpainting_unet(pipe: DiffusionPipeline) -> None:
    """Refuse a pipeline whose UNet does not take inpainting input (latents, mask, masked-image latents)."""
    expected = 2 * pipe.vae.config.latent_channels + 1
    got = pipe.unet.config.in_channels
    if got != expected:
        kind = (
            "a text-to-image model" if got == pipe.vae.config.latent_channels else "not an inpainting model"
        )
        raise PipelineError(
            f"the pipeline's UNet takes {got} input channels, so it is {kind}. An inpainting UNet takes "
            f"{expected} = {pipe.vae.config.latent_channels} noisy latents + 1 mask + "
            f"{pipe.vae.config.latent_channels} masked-image latents. Load an inpainting checkpoint such as "
            "stable-diffusion-v1-5/stable-diffusion-inpainting or stabilityai/stable-diffusion-2-inpainting "
            f"(or a built-in one: {', '.join(builtin_names('inpainting'))})."
        )


class InpaintingCondition(NamedTuple):
    """The two extra UNet inputs of an inpainting model, at latent resolution."""

    # [B or 1, 1, h, w]: 1 where the editor repaints (diffusers' mask convention)
    repaint_mask: torch.Tensor
    # [B, C, h, w]: scaled VAE latents of the image with the repainted area set to grey
    masked_image_latents: torch.Tensor


def inpainting_condition(
    pipe: StableDiffusionInpaintPipeline, image: torch.Tensor, keep_mask: torch.Tensor
) -> InpaintingCondition:
    """What ``StableDiffusionInpaintPipeline`` feeds its UNet besides the noisy latents, differentiably.

    ``image  # [B, 3, H, W] in [0, 1]``, ``keep_mask  # [B or 1, 1, H, W]`` binary, 1 = kept.
    Mirrors ``prepare_mask_latents``: nearest-neighbour downsampling of the repaint mask, and
    the masked image (kept pixels only, in [-1, 1]) through the VAE encoder times its scaling
    factor. One difference, on purpose: the pipeline *samples* the VAE posterior, this takes
    its mean, so that an objective built on it is a deterministic function of the image and
    of the noise the caller draws (PhotoGuard's encoder attack uses the mean too).
    """
    vae = pipe.vae
    masked_image = (2 * image - 1) * keep_mask
    posterior = vae.encode(masked_image.to(vae.dtype)).latent_dist
    masked_image_latents = posterior.mode() * vae.config.scaling_factor
    repaint_mask = F.interpolate(1 - keep_mask, size=masked_image_latents.shape[-2:])
    return InpaintingCondition(repaint_mask, masked_image_latents)


def inpainting_unet(
    pipe: StableDiffusionInpaintPipeline,
    latents: torch.Tensor,
    timestep: torch.Tensor | float,
    condition: InpaintingCondition,
    prompt_embeds: torch.Tensor,
) -> torch.Tensor:
    """One UNet call on the 9-channel input ``cat([latents, repaint_mask, masked_image_latents])``.

    ``latents  # [B, C, h, w]`` are already scaled by the scheduler (``scale_model_input``);
    the condition and ``prompt_embeds  # [B or 1, L, D]`` are broadcast over the batch. Returns the
    UNet output ``[B, C, h, w]`` (ε for ε-prediction models), without classifier-free guidance.
    """
    batch = latents.shape[0]
    repaint_mask = condition.repaint_mask.expand(batch, -1, -1, -1)
    masked_image_latents = condition.masked_image_latents.expand(batch, -1, -1, -1)
    model_input = torch.cat(
        [latents, repaint_mask.to(latents.dtype), masked_image_latents.to(latents.dtype)], dim=1
    )
    timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch)
    return pipe.unet(
        model_input.to(pipe.unet.dtype),
        timestep,
        encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
        return_dict=False,
    )[0]


def encode_text(pipe: StableDiffusionInpaintPipeline, prompt: str = "") -> torch.Tensor:
    """Text embeddings ``[1, L, D]`` of ``prompt`` (unguided), computed once and detached."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    return embeds


@torch.no_grad()
def edit(
    pipe: StableDiffusionInpaintPipeline,
    image: torch.Tensor,
    keep_mask: torch.Tensor,
    prompt: str,
    *,
    steps: int = 50,
    guidance: float = 7.5,
    generator: torch.Generator | None = None,
    paste_back: bool = False,
) -> torch.Tensor:
    """The attacker's edit: keep ``keep_mask``'s region of ``image`` and repaint the rest from ``prompt``.

    ``image  # [3, H, W] in [0, 1]``, ``keep_mask  # [1, H, W]``, 1 = kept. Runs diffusers'
    pipeline unchanged (``mask_image = 1 - keep_mask``) and returns ``[3, H, W]`` in [0, 1].
    With a 9-channel UNet diffusers does not blend the kept pixels back: the model redraws
    the whole image, conditioned on the kept region, so that region comes out only
    approximately unchanged. ``paste_back=True`` composites the kept pixels of ``image`` over
    the result, as editing apps do.
    """
    height, width = image.shape[-2:]
    output = pipe(
        prompt=prompt,
        image=image[None],
        mask_image=(1 - keep_mask)[None],
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="pt",
    ).images[0]
    output = output.float().cpu()
    if paste_back:
        keep = keep_mask.float().cpu()
        output = keep * image.float().cpu() + (1 - keep) * output
    return output
