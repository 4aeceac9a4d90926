"""What every optimisation method receives from the training loop, and the shared rollout step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from diffalign import prompts as prompt_sets
from diffalign.rewards import Reward, checked_call
from diffalign.sampling import Trajectory, sample


@dataclass
class TrainContext:
    """The objects a method trains with; built once by ``diffalign.train``.

    ``unet`` is the accelerate-prepared module to call in training forward passes (it may be
    wrapped for DDP); ``pipe.unet`` is the same weights unwrapped, used for sampling.
    """

    pipe: StableDiffusionPipeline
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    reward: Reward
    prompts: list[str]
    trainable_parameters: list[torch.nn.Parameter]


def collect_rollouts(
    context: TrainContext,
    *,
    batch_size: int,
    num_batches: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    negative_prompt: str,
    generator: torch.Generator,
) -> tuple[Trajectory, torch.Tensor]:
    """Sample ``num_batches`` batches under the current weights and reward them.

    Returns the joined ``Trajectory`` and ``rewards  # [N] fp32`` of this process.
    """
    context.pipe.unet.eval()
    trajectories, rewards = [], []
    for _ in range(num_batches):
        batch_prompts = prompt_sets.draw(context.prompts, batch_size, generator)
        with context.accelerator.autocast():
            trajectory = sample(
                context.pipe,
                batch_prompts,
                num_steps=num_steps,
                guidance_scale=guidance_scale,
                eta=eta,
                generator=generator,
                negative_prompt=negative_prompt,
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
