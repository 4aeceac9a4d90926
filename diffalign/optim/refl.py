"""ReFL: reward feedback learning on the one-step prediction x̂_0 at a drawn denoising step
(Xu, Liu, Wu, Tong, Li, Ding, Tang, Dong; "ImageReward: Learning and Evaluating Human
Preferences for Text-to-Image Generation", NeurIPS 2023, section 4 and algorithm 1).

For each update ReFL samples from noise without gradient down to a denoising step t drawn
uniformly from a window [T1, T2], makes one UNet call at t *with* gradient, and scores the
image decoded from that call's direct prediction of the clean latent,

    x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ(x_t, t, c)) / √ᾱ_t        (epsilon prediction; the scheduler's
                                                           sample / v forms otherwise),

with a differentiable reward r: the loss is −λ · r(decode(x̂_0), c) (here λ =
``refl.reward_scale``). The gradient reaches the UNet only through that one call, so an update
costs t + 1 UNet calls forward and one backward, and — unlike AlignProp's truncated chain
(``alignprop.py``), whose gradient only ever sees the last few steps — it lands on whichever
step of the chain the window names.

Which window: the paper takes t late (its 40-step sampler, t among the last 10 steps) because
its reward model only reads near-finished images; the defaults here are that window on the
default 20-step sampler (steps 15–19). Which step *decides* a property is a fact about the
model: on ShapesWorld the layout of a relation prompt is fixed by the 5th–7th of 20 DDIM steps
(x̂_0 at step 6 already puts the objects on the side of each other they end on in 23 of 23
detectable cases) and ``shapes-negclip`` reads the relation from x̂_0 there (AUROC 0.90). Drawing
t from those steps (``refl.first_step=3 refl.last_step=8``) was measured and made the model
worse, not better: the reward of x̂_0 rose while the finished images' oracle alignment fell
(−0.130 after 40 epochs on seed 2, shapes deformed) — see ``docs/studies/default-job.md``.

Deviations from the paper, and why:
- No pre-training-data loss is mixed in (the paper's regulariser, with a second data loader):
  diffalign trains a LoRA adapter, which already bounds how far the model moves, and the
  library has no image-caption dataset to draw from. The paper's ReLU reward-to-loss map
  φ is replaced by the identity (as AlignProp and DRaFT do), because the rewards here are
  bounded similarities.
- The window is given in denoising steps of the configured sampler (``refl.first_step``,
  ``refl.last_step``, 0-based, both inclusive), not fixed to 40 steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from diffalign import families
from diffalign.config import ConfigError, doc
from diffalign.families import Conditioning
from diffalign.optim.alignprop import AlignProp, GradientWindow
from diffalign.optim.base import register

if TYPE_CHECKING:
    from diffalign.config import TrainConfig
    from diffalign.optim.base import TrainContext


@dataclass
class ReFLSection:
    """ReFL (Xu et al. 2023): a differentiable reward read from the one-step prediction x̂_0 at a drawn step."""

    first_step: int = doc(
        15,
        "first denoising step (0-based) the gradient step is drawn from (the paper: the "
        "last quarter of the chain)",
    )
    last_step: int = doc(
        19, "last denoising step (0-based, inclusive) the gradient step is drawn from; < sample.num_steps"
    )
    checkpoint_unet: bool = doc(True, "gradient-checkpoint the UNet call with gradients")
    reward_scale: float = doc(1.0, "the loss is -reward_scale x mean reward")


def x0_at_step(
    context: TrainContext,
    conditioning: Conditioning,
    guidance_scales: torch.Tensor,
    *,
    num_steps: int,
    eta: float,
    gradient_step: int,
    checkpointed: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Decoded one-step predictions ``[B, 3, H, W]`` in [0, 1] made at denoising step ``gradient_step``.

    Steps ``0 .. gradient_step - 1`` run without gradient (the family's stochastic sampler, like
    training samples); the denoiser call at ``gradient_step`` carries the graph. ``guidance_scales  # [B, T]``.
    On a flow model the one-step prediction is x̂_0 = x − s v (``diffalign.flow``).
    """
    pipe, denoiser = context.pipe, context.unet
    family = families.of(pipe)
    scheduler = pipe.scheduler
    timesteps = family.set_timesteps(pipe, num_steps)
    latents = family.initial_latents(pipe, conditioning.embeds.shape[0], generator)
    with torch.no_grad():
        for step in range(gradient_step):
            prediction = family.predict(
                denoiser, latents, timesteps[step], conditioning, guidance_scales[:, step]
            )
            latents, _ = family.step_with_logprob(
                scheduler, prediction, step, latents, eta, generator=generator
            )
    timestep = timesteps[gradient_step]

    def predict(x: torch.Tensor) -> torch.Tensor:
        return family.predict(denoiser, x, timestep, conditioning, guidance_scales[:, gradient_step])

    prediction = checkpoint(predict, latents, use_reentrant=False) if checkpointed else predict(latents)
    clean = family.predict_clean(scheduler, prediction, gradient_step, latents)
    return family.decode(pipe, clean.to(latents.dtype))


@register
class ReFL(AlignProp):
    """The ReFL epoch: AlignProp's loop (``num_batches_per_epoch`` updates, one per sampled batch)
    with the reward read from x̂_0 at a step drawn from the window instead of the finished image."""

    name = "refl"
    description = (
        "ReFL (Xu et al. 2023): a differentiable reward on the one-step x0 prediction at a drawn step"
    )
    section = ReFLSection
    label = "ReFL"
    window_metric = "gradient_step"

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """The window must lie inside the sampler's steps; checked only for refl runs, which use it."""
        section, steps = config.refl, config.sample.num_steps
        if not 0 <= section.first_step <= section.last_step < steps:
            raise ConfigError(
                f"refl.first_step..refl.last_step must be a window of denoising steps 0..{steps - 1} "
                f"(sample.num_steps={steps}), got {section.first_step}..{section.last_step}"
            )
        if section.reward_scale <= 0:
            raise ConfigError(f"refl.reward_scale must be positive, got {section.reward_scale}")

    @property
    def reward_scale(self) -> float:
        return self.config.refl.reward_scale

    def window(self, generator: torch.Generator) -> GradientWindow:
        """``steps`` holds the drawn gradient step t (0-based) for ReFL."""
        section = self.config.refl
        step = int(torch.randint(section.first_step, section.last_step + 1, (), generator=generator))
        return GradientWindow(step, section.checkpoint_unet)

    def sample_images(
        self,
        conditioning: Conditioning,
        scales: torch.Tensor,
        window: GradientWindow,
        generator: torch.Generator,
    ) -> torch.Tensor:
        sample_config = self.config.sample
        return x0_at_step(
            self.context,
            conditioning,
            scales,
            num_steps=sample_config.num_steps,
            eta=sample_config.eta,
            gradient_step=window.steps,
            checkpointed=window.checkpointed,
            generator=generator,
        )
