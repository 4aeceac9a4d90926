"""AlignProp: reward backpropagation through the sampling chain (Prabhudesai, Goyal, Pathak,
Fragkiadaki; arXiv 2310.03739).

Each update samples a batch from noise with DDIM; the first T-K denoising steps run without
gradient and the last K with gradient, every UNet call among those K gradient-checkpointed, so
memory stays near one UNet call per step. The decoded images are scored by a differentiable
reward and ``-reward`` is backpropagated into the LoRA weights. With ``random_truncation``, K is
drawn uniformly from 1..``truncation_steps`` for each update (the paper's randomised truncated
backpropagation), which keeps the gradient from only ever seeing the last step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from diffalign import families
from diffalign import prompts as prompt_sets
from diffalign.config import ConfigError, doc
from diffalign.families import Conditioning
from diffalign.optim.base import (
    TrainContext,
    check_finite,
    clip_and_step,
    mean_over_processes,
    register,
    reward_metrics,
)
from diffalign.rewards import checked_call

if TYPE_CHECKING:
    from diffalign.config import TrainConfig


@dataclass
class AlignPropSection:
    """AlignProp (Prabhudesai et al. 2023): backpropagate a differentiable reward through sampling."""

    truncation_steps: int = doc(
        2, "K: gradients flow through the last K denoising steps (earlier ones run without)"
    )
    random_truncation: bool = doc(
        True, "draw K uniformly from 1..truncation_steps for every update (randomised truncated backprop)"
    )
    checkpoint_unet: bool = doc(
        True, "gradient-checkpoint every UNet call with gradients (memory ~ one call)"
    )
    reward_scale: float = doc(1.0, "the loss is -reward_scale x mean reward")


@dataclass
class GradientWindow:
    """Which UNet calls of a differentiable sample carry gradient: the last ``steps`` of the chain."""

    steps: int
    checkpointed: bool


def differentiable_sample(
    context: TrainContext,
    conditioning: Conditioning,
    guidance_scales: torch.Tensor,
    *,
    num_steps: int,
    eta: float,
    window: GradientWindow,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sample images ``[B, 3, H, W]`` in [0, 1] whose graph reaches the denoiser only through the last steps.

    ``guidance_scales  # [B, T]`` per sample and step (DiffExp schedules). Any model family: the
    DDIM-η chain of a UNet, the flow SDE (ODE at η = 0) of an SD3-style transformer.
    """
    pipe, denoiser = context.pipe, context.unet
    family = families.of(pipe)
    scheduler = pipe.scheduler
    timesteps = family.set_timesteps(pipe, num_steps)
    latents = family.initial_latents(pipe, conditioning.embeds.shape[0], generator)
    first_with_gradient = num_steps - window.steps
    for step, timestep in enumerate(timesteps):
        with torch.set_grad_enabled(step >= first_with_gradient):

            def predict(x: torch.Tensor, step: int = step, timestep: torch.Tensor = timestep) -> torch.Tensor:
                return family.predict(denoiser, x, timestep, conditioning, guidance_scales[:, step])

            if torch.is_grad_enabled() and window.checkpointed:
                prediction = checkpoint(predict, latents, use_reentrant=False)
            else:
                prediction = predict(latents)
            latents, _ = family.step_with_logprob(
                scheduler, prediction, step, latents, eta, generator=generator
            )
    return family.decode(pipe, latents)


@register
class AlignProp:
    """The AlignProp epoch: ``num_batches_per_epoch`` differentiable samples, one update each."""

    name = "alignprop"
    description = "AlignProp (Prabhudesai et al. 2023): backprop of a differentiable reward through sampling"
    section = AlignPropSection
    needs_differentiable_reward = True
    label = "AlignProp"
    window_metric = "truncation_steps"  # the metric that logs each update's GradientWindow.steps

    def __init__(self, context: TrainContext, config: TrainConfig):
        self.context = context
        self.config = config

    @staticmethod
    def accumulation_steps(config: TrainConfig) -> int:
        """Micro-steps per optimiser step: one per sampled batch."""
        return config.train.gradient_accumulation_steps

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """The window must fit the sampler; checked only for alignprop runs, which use it."""
        steps = config.alignprop.truncation_steps
        if not 1 <= steps <= config.sample.num_steps:
            raise ConfigError(
                f"alignprop.truncation_steps must be between 1 and sample.num_steps ({config.sample.num_steps}), "
                f"got {steps}"
            )
        if config.alignprop.reward_scale <= 0:
            raise ConfigError(f"alignprop.reward_scale must be positive, got {config.alignprop.reward_scale}")

    @property
    def reward_scale(self) -> float:
        return self.config.alignprop.reward_scale

    def window(self, generator: torch.Generator) -> GradientWindow:
        """The gradient window of the next update (K drawn by ``truncation``)."""
        return GradientWindow(self.truncation(generator), self.config.alignprop.checkpoint_unet)

    def sample_images(
        self,
        conditioning: Conditioning,
        scales: torch.Tensor,
        window: GradientWindow,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The images the reward scores, ``[B, 3, H, W]`` in [0, 1], with a graph to the LoRA weights."""
        sample_config = self.config.sample
        return differentiable_sample(
            self.context,
            conditioning,
            scales,
            num_steps=sample_config.num_steps,
            eta=sample_config.eta,
            window=window,
            generator=generator,
        )

    @torch.no_grad()
    def prompt_embeddings(self, prompts: list[str]) -> Conditioning:
        """The batch's text conditioning; without gradient, as the text encoders are frozen."""
        pipe = self.context.pipe
        return families.of(pipe).encode(pipe, prompts, self.config.sample.negative_prompt)

    def truncation(self, generator: torch.Generator) -> int:
        """K for the next update: fixed, or uniform on 1..truncation_steps."""
        section = self.config.alignprop
        if not section.random_truncation:
            return section.truncation_steps
        return int(torch.randint(1, section.truncation_steps + 1, (), generator=generator))

    def run_epoch(self, generator: torch.Generator) -> dict[str, float]:
        config, context = self.config, self.context
        sample_config = config.sample
        rewards, losses, windows = [], [], []
        families.denoiser(context.pipe).train()
        for _ in range(sample_config.num_batches_per_epoch):
            per_prompt = sample_config.images_per_prompt
            drawn = prompt_sets.draw(context.prompts, sample_config.batch_size // per_prompt, generator)
            prompts = [prompt for prompt in drawn for _ in range(per_prompt)]
            conditioning = self.prompt_embeddings(prompts)
            scales = torch.full((len(prompts), sample_config.num_steps), sample_config.guidance_scale)
            if context.exploration is not None:
                explored = context.exploration.explore(prompts, generator)
                scales = explored.guidance_scales
                conditioning.embeds = explored.prompt_embeds.to(conditioning.embeds)
            window = self.window(generator)
            with context.accelerator.accumulate(context.unet):
                with context.accelerator.autocast():
                    images = self.sample_images(
                        conditioning, scales.to(conditioning.embeds.device), window, generator
                    )
                    scores = checked_call(context.reward, images, prompts)
                loss = -self.reward_scale * scores.mean()
                check_finite(loss, self.label)
                context.accelerator.backward(loss)
                clip_and_step(context, config.train.max_grad_norm)
            rewards.append(scores.detach())
            losses.append(loss.detach())
            windows.append(window.steps)
        return {
            **reward_metrics(context.accelerator, torch.cat(rewards)),
            **mean_over_processes(context.accelerator, {"loss": losses}),
            self.window_metric: sum(windows) / len(windows),
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """AlignProp keeps no state between epochs beyond the weights and optimiser."""
