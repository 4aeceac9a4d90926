"""DPOK: policy optimisation with KL regularisation (Fan, Watkins, Du, Liu, Ryu, Boutilier,
Abbeel, Ghavamzadeh, Lee, Lee; NeurIPS 2023, arXiv 2305.16381).

The objective is E[-α r(x_0, z)] + β Σ_t E[KL(p_θ(x_{t-1} | x_t, z) ‖ p_pre(x_{t-1} | x_t, z))].
Each epoch samples trajectories into a replay buffer holding the last few epochs; then

* a value network V(x_t, t, z) is regressed onto the final reward of the transitions it sees
  (it predicts the deviation from the buffer's mean reward, so that the baseline is right on
  average from the first epoch instead of after the network has learned the reward's offset), and
* each policy update draws transitions (x_t, x_{t-1}, z, r) from the buffer and minimises the
  clipped importance-weighted policy gradient with advantage α (r - V(x_t, t, z)) plus β times
  the per-step KL. Both steps are Gaussians with the same variance σ_t², so the KL is
  ‖μ_θ - μ_pre‖² / (2σ_t²), averaged over latent dimensions like the log-probs.

The pre-trained reference is the same UNet with its LoRA adapter switched off, so no second copy
of the UNet is held in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from diffalign import families
from diffalign.config import ConfigError, doc
from diffalign.optim.base import (
    TrainContext,
    check_finite,
    clip_and_step,
    mean_over_processes,
    register,
    reward_metrics,
    sample_rollouts,
)
from diffalign.optim.ddpo import ppo_clip_loss
from diffalign.sampling import Trajectory

if TYPE_CHECKING:
    from diffalign.config import TrainConfig


@dataclass
class DPOKSection:
    """DPOK (Fan et al. 2023): KL-regularised policy gradient with a value baseline and replay buffer."""

    reward_weight: float = doc(
        10.0, "alpha: weight of the reward term (advantages are reward minus the value baseline)"
    )
    kl_weight: float = doc(
        0.01, "beta: weight of the per-step KL to the pre-trained model (the UNet with LoRA off)"
    )
    clip_range: float = doc(1e-2, "clip range of the per-step importance ratio, as in the paper's code")
    buffer_epochs: int = doc(4, "the replay buffer keeps the transitions of this many recent epochs")
    updates_per_epoch: int = doc(
        8, "policy updates per epoch, each on train.batch_size transitions drawn from the buffer"
    )
    value_learning_rate: float = doc(1e-3, "AdamW learning rate of the value network")
    value_updates_per_epoch: int = doc(8, "value-network updates per epoch, on buffer transitions")
    value_width: int = doc(
        64, "hidden width of the value network (latents + timestep + pooled text -> expected reward)"
    )

    def validate(self, config: TrainConfig) -> None:
        for key in ("buffer_epochs", "updates_per_epoch", "value_updates_per_epoch", "value_width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"dpok.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("reward_weight", "clip_range", "value_learning_rate"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"dpok.{key} must be positive, got {getattr(self, key)}")
        if self.kl_weight < 0:
            raise ConfigError(f"dpok.kl_weight must not be negative, got {self.kl_weight}")


class ValueNetwork(nn.Module):
    """V(x_t, t, z): the expected final reward of a partly denoised latent under prompt z.

    A small conv encoder of the latent, the mean text embedding and a sinusoidal timestep
    embedding, joined by an MLP. Small on purpose: it only needs to be a baseline.
    """

    def __init__(self, latent_channels: int, text_width: int, width: int):
        super().__init__()
        self.width = width
        self.latent = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.text = nn.Linear(text_width, width)
        self.head = nn.Sequential(nn.Linear(3 * width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """``latents  # [B, C, h, w]``, ``timesteps  # [B]``, ``prompt_embeds  # [B, L, D]`` → ``[B]``."""
        time = get_timestep_embedding(timesteps.float(), self.width).to(latents.dtype)
        features = torch.cat([self.latent(latents), self.text(prompt_embeds.mean(dim=1)), time], dim=1)
        return self.head(features).squeeze(1)


class ReplayBuffer:
    """The trajectories and rewards of the last ``epochs`` epochs (images dropped)."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.entries: list[tuple[Trajectory, torch.Tensor]] = []

    def mean_reward(self) -> torch.Tensor:
        """The mean reward over every buffered sample: the constant part of the baseline."""
        return torch.cat([rewards for _, rewards in self.entries]).float().mean()

    def add(self, trajectory: Trajectory, rewards: torch.Tensor) -> None:
        kept = replace(trajectory, images=trajectory.images[:, :0])
        self.entries = (self.entries + [(kept, rewards.detach())])[-self.epochs :]

    def draw(self, count: int, generator: torch.Generator) -> tuple[Trajectory, torch.Tensor, torch.Tensor]:
        """``count`` transitions uniformly over (sample, step): ``(trajectories, steps  # [count], rewards)``."""
        sizes = [len(trajectory) for trajectory, _ in self.entries]
        num_steps = self.entries[0][0].num_steps
        flat = torch.randint(sum(sizes), (count,), generator=generator)
        steps = torch.randint(num_steps, (count,), generator=generator)
        parts, part_steps, rewards, start = [], [], [], 0
        for (trajectory, epoch_rewards), size in zip(self.entries, sizes):
            inside = (flat >= start) & (flat < start + size)
            rows = flat[inside] - start
            parts.append(trajectory.select(rows))
            part_steps.append(steps[inside])
            rewards.append(epoch_rewards[rows.to(epoch_rewards.device)])
            start += size
        return Trajectory.concat(parts), torch.cat(part_steps), torch.cat(rewards)

    def state_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "entries": [
                ({f.name: getattr(trajectory, f.name) for f in fields(trajectory)}, rewards)
                for trajectory, rewards in self.entries
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.entries = [(Trajectory(**values), rewards) for values, rewards in state["entries"]]


@contextmanager
def adapter_disabled(unet: nn.Module) -> Iterator[None]:
    """The pre-trained UNet: the same module with its LoRA adapter switched off for the block."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def kl_to_reference(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps of equal variance, averaged over latent dimensions: ``[B]``."""
    per_dim = (mean - reference_mean) ** 2 / (2 * std**2)
    return per_dim.mean(dim=tuple(range(1, mean.ndim)))


@register
class DPOK:
    """The DPOK epoch: rollouts into the buffer, value regression, KL-regularised policy updates."""

    name = "dpok"
    description = "DPOK (Fan et al. 2023): policy gradient + KL to the pre-trained model + value baseline"
    section = DPOKSection
    needs_stochastic_sampler = True
    needs_lora = True  # the pre-trained reference is the UNet with its adapter switched off

    def __init__(self, context: TrainContext, config: TrainConfig):
        self.context = context
        self.config = config
        section = config.dpok
        pipe = context.pipe
        family = families.of(pipe)
        with torch.no_grad():  # the width of the text embeddings the denoiser reads
            text_width = family.encode(pipe, [""], "").embeds.shape[-1]
        self.value = ValueNetwork(
            families.denoiser(pipe).config.in_channels, text_width, section.value_width
        ).to(context.accelerator.device)
        self.value_optimizer = torch.optim.AdamW(self.value.parameters(), lr=section.value_learning_rate)
        self.buffer = ReplayBuffer(section.buffer_epochs)

    @staticmethod
    def accumulation_steps(config: TrainConfig) -> int:
        return config.train.gradient_accumulation_steps

    def run_epoch(self, generator: torch.Generator) -> dict[str, float]:
        config, context = self.config, self.context
        started = time.perf_counter()
        trajectory, rewards = sample_rollouts(context, config, generator)
        sampling_seconds = time.perf_counter() - started
        self.buffer.add(trajectory, rewards)
        value_losses = [self._value_update(generator) for _ in range(config.dpok.value_updates_per_epoch)]
        stats: dict[str, list[torch.Tensor]] = {
            "loss": [],
            "approx_kl": [],
            "clipfrac": [],
            "ratio": [],
            "kl_to_pretrained": [],
        }
        for _ in range(config.dpok.updates_per_epoch * config.train.gradient_accumulation_steps):
            self._policy_update(generator, stats)
        return {
            **reward_metrics(context.accelerator, rewards),
            "value_loss": float(torch.stack(value_losses).mean()),
            "sampling_seconds": sampling_seconds,
            **mean_over_processes(context.accelerator, stats),
        }

    def baseline(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """V(x_t, t, z): the buffer's mean reward plus the value network's predicted deviation."""
        return self.buffer.mean_reward() + self.value(latents, timesteps, prompt_embeds)

    def _value_update(self, generator: torch.Generator) -> torch.Tensor:
        """One regression step of V(x_t, t, z) onto the final reward, averaged over processes."""
        batch, steps, rewards = self.buffer.draw(self.config.train.batch_size, generator)
        rows = torch.arange(len(batch))
        predicted = self.baseline(batch.latents[rows, steps], batch.timesteps[steps], batch.prompt_embeds)
        loss = torch.nn.functional.mse_loss(predicted, rewards.float())
        self.value_optimizer.zero_grad()
        loss.backward()
        accelerator = self.context.accelerator
        if accelerator.num_processes > 1:
            for parameter in self.value.parameters():
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        self.value_optimizer.step()
        return loss.detach()

    def _policy_update(self, generator: torch.Generator, stats: dict[str, list[torch.Tensor]]) -> None:
        config, context = self.config, self.context
        section = config.dpok
        batch, steps, rewards = self.buffer.draw(config.train.batch_size, generator)
        rows = torch.arange(len(batch))
        latents, previous = batch.latents[rows, steps], batch.latents[rows, steps + 1]
        timesteps = batch.timesteps[steps]
        scales = batch.guidance_scales[rows, steps]
        family = families.of(context.pipe)
        scheduler = context.pipe.scheduler
        family.set_timesteps(context.pipe, config.sample.num_steps)
        conditioning = families.conditioning_of(batch)
        with torch.no_grad():
            advantages = section.reward_weight * (
                rewards - self.baseline(latents, timesteps, batch.prompt_embeds)
            )
            with adapter_disabled(families.denoiser(context.pipe)):
                reference = family.predict(
                    families.denoiser(context.pipe), latents, timesteps, conditioning, scales
                )
            reference_mean, _ = family.transition(scheduler, reference, steps, latents, batch.eta)
        with context.accelerator.accumulate(context.unet):
            with context.accelerator.autocast():
                noise_pred = family.predict(context.unet, latents, timesteps, conditioning, scales)
            mean, std = family.transition(scheduler, noise_pred, steps, latents, batch.eta)
            _, log_prob = family.step_with_logprob(
                scheduler, noise_pred, steps, latents, batch.eta, prev_sample=previous
            )
            policy_loss, step_stats = ppo_clip_loss(
                log_prob, batch.log_probs[rows, steps], advantages.float(), section.clip_range
            )
            kl = kl_to_reference(mean, reference_mean, std).mean()
            loss = policy_loss + section.kl_weight * kl
            check_finite(loss, "DPOK")
            context.accelerator.backward(loss)
            clip_and_step(context, config.train.max_grad_norm)
        stats["loss"].append(loss.detach())
        stats["kl_to_pretrained"].append(kl.detach())
        for name, value in step_stats.items():
            stats[name].append(value)

    def state_dict(self) -> dict:
        return {
            "value": self.value.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.value.load_state_dict(state["value"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.buffer.load_state_dict(state["buffer"])
