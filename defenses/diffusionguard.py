"""DiffusionGuard: adversarial noise against the early denoising step of inpainting editors.

Choi et al., "DiffusionGuard: A Robust Defense Against Malicious Diffusion-based Image
Editing", ICLR 2025.

Threat: an attacker keeps a sensitive region of a photo (a face) and lets an inpainting
model regenerate everything else from a prompt. Defense: perturb only that region, within an
L∞ budget, so that the editor's output falls apart. The paper observes that inpainting
models commit to the content of the repainted area in the very first denoising steps, so it
attacks there: it maximises the norm of the UNet's noise prediction at the first timestep of
the editor's schedule, which pushes the first step (and so the whole trajectory) far off.
Because the attacker's mask will differ from the defender's, each step trains against a
randomly shrunken mask (``MaskAugmentation``).

    given image x, protected region m, inpainting UNet ε_θ, editor schedule t_1 > t_2 > …
    repeat N times:
        m' ← augment(m)                                  random shrunken mask, ⊆ m
        z ~ N(0, I) · σ_init                             fresh initial noise
        c ← (1 − m'↓, E((2(x + δ) − 1) ⊙ m'))            the editor's repaint mask + masked-image latents
        L ← ‖ε_θ([z, c], t_1, ∅)‖₂                       empty prompt: the attacker's prompt is unknown
        δ ← Π(δ + α · sign(∇_x L) ⊙ m')                  ascend on the protected pixels, project

One UNet call and one VAE encoding per step. The reference code runs 800 steps of
0.5/255 within 8/255 (its 1/255 and 16/255 are in [-1, 1] units, see
``diffalign.defenses.common``) against a 4-step schedule, whose first timestep is 751 for
Stable Diffusion's PNDM or DDIM ("leading" spacing) and not 999.
"""

from __future__ import annotations

import torch
from diffalign.defenses.common import (
    MaskAugmentation,
    PassCounter,
    ProgressCallback,
    ProtectionError,
    ProtectionResult,
    frozen,
    pgd,
    prepare_inputs,
    seeded,
)
from diffusers import StableDiffusionInpaintPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from diffalign.inpainting import check_inpainting_unet, encode_text, inpainting_condition, inpainting_unet

# The reference implementation's settings, in [0, 1] pixel units.
BUDGET = 8 / 255
STEP_SIZE = 0.5 / 255
STEPS = 800
EDITOR_STEPS = 4
DEFAULT_AUGMENTATION = MaskAugmentation()


def editor_schedule(scheduler: SchedulerMixin, editor_steps: int) -> SchedulerMixin:
    """A copy of the editor's scheduler set to ``editor_steps`` steps; the pipe's own is untouched."""
    schedule = type(scheduler).from_config(scheduler.config)
    schedule.set_timesteps(editor_steps)
    return schedule


def attacked_timestep(scheduler: SchedulerMixin, editor_steps: int = EDITOR_STEPS) -> int | float:
    """The first timestep of the editor's ``editor_steps``-step schedule: the one DiffusionGuard attacks.

    It depends on the scheduler's spacing, so it is read from the scheduler rather than
    assumed to be the last training timestep: SD's DDIM or PNDM with 4 steps start at 751,
    DDIM with "trailing" spacing at 999, with 50 steps at 981.
    """
    return editor_schedule(scheduler, editor_steps).timesteps[0].item()


def noise_prediction_norm(
    pipe: StableDiffusionInpaintPipeline,
    image: torch.Tensor,
    keep_mask: torch.Tensor,
    timestep: float,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
) -> torch.Tensor:
    """DiffusionGuard's objective: ``‖ε_θ(latents, timestep | mask, image)‖₂`` per noise, ``[B]`` fp32.

    ``image  # [1, 3, H, W] in [0, 1]``, ``keep_mask  # [1, 1, H, W]`` (1 = kept by the editor),
    ``latents  # [B, C, h, w]`` the editor's initial latents after ``scale_model_input``.
    """
    condition = inpainting_condition(pipe, image, keep_mask)
    prediction = inpainting_unet(pipe, latents, timestep, condition, prompt_embeds)
    return prediction.float().flatten(1).norm(dim=1)


def protect(
    pipe: StableDiffusionInpaintPipeline,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    budget: float = BUDGET,
    step_size: float = STEP_SIZE,
    steps: int = STEPS,
    augment: MaskAugmentation | None = DEFAULT_AUGMENTATION,
    editor_steps: int = EDITOR_STEPS,
    noise_batch: int = 1,
    prompt: str = "",
    generator: torch.Generator | None = None,
    progress: ProgressCallback | None = None,
) -> ProtectionResult:
    """Protect ``mask``'s region of ``image`` against inpainting edits with DiffusionGuard.

    ``image  # [3, H, W] in [0, 1]``; ``mask  # [1, H, W]``, 1 = the region to protect.
    ``budget`` and ``step_size`` are in [0, 1] pixel units. The attacked timestep is
    ``attacked_timestep(pipe.scheduler, editor_steps)``: the first step of the editor's
    schedule. ``noise_batch`` initial noises share each step's single UNet call (the reference
    uses 1). ``augment=None`` trains against the given mask only. ``generator`` (default:
    seed 0) draws the noises and the masks. ``objective`` in the result is the mean
    noise-prediction norm at each step (higher is stronger protection).
    """
    check_inpainting_unet(pipe)
    if editor_steps < 1 or noise_batch < 1:
        raise ProtectionError(
            f"editor_steps and noise_batch must be ≥ 1, got {editor_steps} and {noise_batch}"
        )
    image, protected = prepare_inputs(pipe, image, mask, budget=budget, step_size=step_size, steps=steps)
    generator = seeded(generator)
    schedule = editor_schedule(pipe.scheduler, editor_steps)
    timestep = schedule.timesteps[0].item()
    factor = pipe.vae_scale_factor
    latent_shape = (
        noise_batch,
        pipe.vae.config.latent_channels,
        image.shape[-2] // factor,
        image.shape[-1] // factor,
    )

    with PassCounter(pipe) as counter, frozen(pipe.unet, pipe.vae):
        prompt_embeds = encode_text(pipe, prompt)

        def objective(adversarial: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            noise = randn_tensor(latent_shape, generator=generator, device=pipe.device, dtype=pipe.unet.dtype)
            latents = schedule.scale_model_input(noise * schedule.init_noise_sigma, timestep)
            return noise_prediction_norm(pipe, adversarial, keep, timestep, latents, prompt_embeds).mean()

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
    return counter.result("diffusionguard", image, delta, protected, history)
