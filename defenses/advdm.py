"""AdvDM: maximise the diffusion model's denoising loss on the image.

Liang et al., "Adversarial Example Does Good: Preventing Painting Imitation from Diffusion
Models via Adversarial Examples", ICML 2023.

AdvDM makes an image a bad training/conditioning example for a latent diffusion model by
maximising the model's own training loss on it, a Monte-Carlo estimate over a random
timestep and noise per step:

    repeat N times:
        t ~ U{0, …, T−1},  ε ~ N(0, I)
        z_t ← √ᾱ_t · E(x + δ) + √(1 − ᾱ_t) · ε
        L ← ‖ε − ε_θ(z_t, t, c)‖²
        δ ← Π(δ + α · sign(∇_x L) ⊙ m')

The original attacks a text-to-image UNet. Against an inpainting editor the UNet is the
9-channel one, so ε_θ also gets the editor's conditioning, computed from the perturbed image
exactly as DiffusionGuard does: ``[z_t, repaint mask, E(masked image)]``. The gradient thus
flows through both the noised latent and the masked-image latents. c is the empty prompt
(the attacker's prompt is unknown). Same budget, region and projection as every method in
``diffalign.defenses``. Per step: one UNet call and two VAE encodings (whole image and
masked image). For v-prediction models the target is the velocity instead of ε.
"""

from __future__ import annotations

import torch
from diffalign.defenses.common import (
    MaskAugmentation,
    PassCounter,
    ProgressCallback,
    ProtectionResult,
    frozen,
    pgd,
    prepare_inputs,
    seeded,
)
from diffalign.defenses.diffusionguard import BUDGET, STEP_SIZE, STEPS
from diffusers import DDPMScheduler, StableDiffusionInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from diffalign.inpainting import check_inpainting_unet, encode_text, inpainting_condition, inpainting_unet


def denoising_loss(
    pipe: StableDiffusionInpaintPipeline,
    noise_schedule: DDPMScheduler,
    image: torch.Tensor,
    keep_mask: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
) -> torch.Tensor:
    """The inpainting UNet's training loss on ``image`` for each (timestep, noise) pair, ``[B]`` fp32.

    ``image  # [1, 3, H, W] in [0, 1]``, ``keep_mask  # [1, 1, H, W]`` (1 = kept by the editor),
    ``timesteps  # [B]`` long, ``noise  # [B, C, h, w]``. ``noise_schedule`` is the model's
    training forward process (a ``DDPMScheduler`` built from the pipeline's scheduler config).
    """
    vae = pipe.vae
    clean = vae.encode((2 * image - 1).to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    clean = clean.expand(noise.shape[0], -1, -1, -1)
    noisy = noise_schedule.add_noise(clean, noise, timesteps)
    condition = inpainting_condition(pipe, image, keep_mask)
    prediction = inpainting_unet(pipe, noisy, timesteps, condition, prompt_embeds)
    prediction_type = noise_schedule.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_schedule.get_velocity(clean, noise, timesteps)
    elif prediction_type == "sample":
        target = clean
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    # fp32: the loss is a small difference of large activations in fp16 pipelines.
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def protect(
    pipe: StableDiffusionInpaintPipeline,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    budget: float = BUDGET,
    step_size: float = STEP_SIZE,
    steps: int = STEPS,
    augment: MaskAugmentation | None = None,
    prompt: str = "",
    generator: torch.Generator | None = None,
    progress: ProgressCallback | None = None,
) -> ProtectionResult:
    """Protect ``mask``'s region of ``image`` with AdvDM against an inpainting editor.

    Same inputs and units as ``diffusionguard.protect``. ``generator`` (default: seed 0)
    draws the timesteps, noises and masks. ``objective`` in the result is the denoising loss
    at each step's random (t, ε) — noisy by nature; compare runs at fixed (t, ε) with
    ``denoising_loss``.
    """
    check_inpainting_unet(pipe)
    image, protected = prepare_inputs(pipe, image, mask, budget=budget, step_size=step_size, steps=steps)
    generator = seeded(generator)
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    factor = pipe.vae_scale_factor
    latent_shape = (1, pipe.vae.config.latent_channels, image.shape[-2] // factor, image.shape[-1] // factor)

    with PassCounter(pipe) as counter, frozen(pipe.unet, pipe.vae):
        prompt_embeds = encode_text(pipe, prompt)

        def objective(adversarial: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            timestep = torch.randint(
                0,
                noise_schedule.config.num_train_timesteps,
                (1,),
                generator=generator,
                device=generator.device,
            )
            noise = randn_tensor(latent_shape, generator=generator, device=pipe.device, dtype=pipe.unet.dtype)
            loss = denoising_loss(
                pipe, noise_schedule, adversarial, keep, timestep.to(pipe.device), noise, prompt_embeds
            )
            return loss.mean()

        delta, history = pgd(
            objective,
            image,
            protected,
            budget=budget,
            step_size=step_size,
            steps=steps,
            augment=augment,
            generator=generator,
            progress=progress,
        )
    return counter.result("advdm", image, delta, protected, history)
