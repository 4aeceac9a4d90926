"""PhotoGuard's encoder attack: push the image's VAE encoding toward that of a grey image.

Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023.

A latent diffusion editor only sees the image through its VAE encoder. If the encoding of
the protected image is close to the encoding of a meaningless target (a flat grey image),
the editor works from that target instead of the photo:

    z* ← E(grey)
    repeat N times:
        L ← −‖E(x + δ) − z*‖₂                    E = the posterior mean of the VAE encoder
        δ ← Π(δ + α · sign(∇_x L) ⊙ m')           ascend on the protected pixels, project

Here with the same budget, region and projection as every method in
``diffalign.defenses``: the whole perturbed image is encoded, only the protected pixels
move. Two simplifications of the public code, so that methods compare at equal settings:
the step size is constant (the public code decays it linearly) and PGD starts from δ = 0
(not a random point in the budget). The target is the encoding of a flat grey image (the
paper's encoder attack targets the encoding of a chosen target image; the public
inpainting demo targets the zero latent). One VAE encoding per step,
no UNet call; it works with any pipeline that has a VAE.
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
from diffusers import DiffusionPipeline


def encoder_distance(
    pipe: DiffusionPipeline, image: torch.Tensor, target_latent: torch.Tensor
) -> torch.Tensor:
    """``‖E(image) − target_latent‖₂`` per image, ``[B]`` fp32; ``image  # [B, 3, H, W] in [0, 1]``."""
    latent = pipe.vae.encode((2 * image - 1).to(pipe.vae.dtype)).latent_dist.mean
    return (latent.float() - target_latent.float()).flatten(1).norm(dim=1)


def target_latent(pipe: DiffusionPipeline, image: torch.Tensor, grey: float = 0.5) -> torch.Tensor:
    """The VAE posterior mean of a flat image of level ``grey`` shaped like ``image  # [B, 3, H, W]``."""
    with torch.no_grad():
        flat = torch.full_like(image, 2 * grey - 1, dtype=pipe.vae.dtype)
        return pipe.vae.encode(flat).latent_dist.mean


def protect(
    pipe: DiffusionPipeline,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    budget: float = BUDGET,
    step_size: float = STEP_SIZE,
    steps: int = STEPS,
    augment: MaskAugmentation | None = None,
    grey: float = 0.5,
    generator: torch.Generator | None = None,
    progress: ProgressCallback | None = None,
) -> ProtectionResult:
    """Protect ``mask``'s region of ``image`` with PhotoGuard's encoder attack toward a ``grey`` image.

    Same inputs and units as ``diffusionguard.protect``. ``generator`` only draws augmented
    masks (the attack itself is deterministic). ``objective`` in the result is the negative
    encoder distance to the target at each step (it rises as the attack succeeds).
    """
    image, protected = prepare_inputs(pipe, image, mask, budget=budget, step_size=step_size, steps=steps)
    generator = seeded(generator)
    with PassCounter(pipe) as counter, frozen(pipe.vae):
        target = target_latent(pipe, image, grey)

        def objective(adversarial: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            return -encoder_distance(pipe, adversarial, target).mean()

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
    return counter.result("photoguard", image, delta, protected, history)
