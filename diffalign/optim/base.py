"""What every optimisation method receives from the training loop, and the shared rollout step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from diffalign import prompts as prompt_sets
from diffalign.errors import DiffalignError
from diffalign.rewards import Reward, checked_call
from diffalign.sampling import Trajectory, initial_latents, sample

if TYPE_CHECKING:
    from diffalign.diffexp import DiffExp


class TrainingDiverged(DiffalignError, RuntimeError):
    """A loss became NaN or infinite; training stops before the update rather than continue on garbage."""


@dataclass
class TrainContext:
    """The objects a method trains with; built once by ``diffalign.train``.

    ``unet`` is the accelerate-prepared module to call in training forward passes (it may be
    wrapped for DDP); ``pipe.unet`` is the same weights unwrapped, used for sampling.
    ``exploration`` is the DiffExp sampler when ``exploration: diffexp``, else None.
    """

    pipe: StableDiffusionPipeline
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    reward: Reward
    prompts: list[str]
    trainable_parameters: list[torch.nn.Parameter]
    exploration: DiffExp | None = None


def collect_rollouts(
    context: TrainContext,
    *,
    batch_size: int,
    num_batches: int,
    images_per_prompt: int,
    shared_initial_noise: bool,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    negative_prompt: str,
    generator: torch.Generator,
    stochastic_steps: tuple[int, int] | None = None,
) -> tuple[Trajectory, torch.Tensor]:
    """Sample ``num_batches`` batches under the current weights and reward them.

    Each batch holds ``batch_size / images_per_prompt`` drawn prompts, each repeated
    ``images_per_prompt`` times: rewards of one prompt's images are then compared with each
    other, which removes the difference in difficulty between prompts from the advantages.
    With ``shared_initial_noise`` they also start from one x_T (the group-shared noise of
    DanceGRPO, Xue et al. 2025, arXiv 2505.07818), so advantages credit only the sampled steps; it
    is off by default because on ShapesWorld it did not make gradient estimates more consistent
    (``benchmarks/gradient_snr.py``). ``stochastic_steps`` is ``sampling.sample``'s window.
    Returns the joined ``Trajectory`` and ``rewards  # [N] fp32`` of this process.
    """
    context.pipe.unet.eval()
    trajectories, rewards = [], []
    for _ in range(num_batches):
        drawn = prompt_sets.draw(context.prompts, batch_size // images_per_prompt, generator)
        batch_prompts = [prompt for prompt in drawn for _ in range(images_per_prompt)]
        scales, embeds, latents = guidance_scale, None, None
        if shared_initial_noise:
            latents = initial_latents(context.pipe, len(drawn), generator).repeat_interleave(images_per_prompt, 0)
        if context.exploration is not None:
            explored = context.exploration.explore(batch_prompts, generator)
            scales, embeds = explored.guidance_scales, explored.prompt_embeds
        with context.accelerator.autocast():
            trajectory = sample(
                context.pipe,
                batch_prompts,
                num_steps=num_steps,
                guidance_scale=scales,
                eta=eta,
                generator=generator,
                negative_prompt=negative_prompt,
                prompt_embeds=embeds,
                latents=latents,
                stochastic_steps=stochastic_steps,
            )
        trajectories.append(trajectory)
        rewards.append(checked_call(context.reward, trajectory.images, batch_prompts))
    context.pipe.unet.train()
    return Trajectory.concat(trajectories), torch.cat(rewards).to(context.accelerator.device)


def clip_and_step(context: TrainContext, max_grad_norm: float) -> None:
    """Clip gradients when accelerate is about to apply them, then step (no-op while accumulating)."""
    if context.accelerator.sync_gradients:
        context.accelerator.clip_grad_norm_(context.trainable_parameters, max_grad_norm)
    context.optimizer.step()
    context.optimizer.zero_grad()
