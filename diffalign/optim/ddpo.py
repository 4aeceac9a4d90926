"""DDPO: denoising diffusion policy optimisation (Black, Janner, Du, Kostrikov, Levine; ICLR 2024,
arXiv 2305.13301), the DDPO_IS variant with PPO clipping.

Each epoch: sample trajectories with DDIM-η recording per-step log-probs, reward the final
images, turn rewards into advantages normalised per prompt, then for every stored step
x_t → x_{t-1} maximise the clipped surrogate

    L = E[ min( r · A, clip(r, 1-ε, 1+ε) · A ) ],   r = p_θ(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c)

with gradients accumulated over samples and timesteps.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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
    stochastic_window,
)
from diffalign.sampling import Trajectory

if TYPE_CHECKING:
    from diffalign.config import TrainConfig


@dataclass
class DDPOSection:
    """DDPO (Black et al. 2023): PPO-clip on per-step importance ratios."""

    clip_range: float = doc(
        1e-2, "PPO clip range on the per-step ratio (DDPO used 1e-4 for SD's 16384-dim latents)"
    )
    adv_clip_max: float = doc(5.0, "advantages are clipped to [-this, this]")
    per_prompt_stat_tracking: bool = doc(True, "normalise rewards per prompt with running statistics")
    stat_buffer_size: int = doc(16, "rewards remembered per prompt for its statistics")
    stat_min_count: int = doc(4, "below this many rewards for a prompt, use the whole batch's statistics")

    def validate(self, config: TrainConfig) -> None:
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise ConfigError("ddpo.clip_range and ddpo.adv_clip_max must be positive")


class PerPromptStatTracker:
    """Running reward statistics per prompt, kept across epochs (DDPO §5.1).

    Normalising per prompt removes the difference in difficulty between prompts; below
    ``min_count`` rewards for a prompt its statistics are too noisy, so the whole batch's are used.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this batch's rewards and return their advantages ``[N]``."""
        rewards = rewards.float().cpu()
        advantages = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False) + 1e-6
        for prompt in dict.fromkeys(prompts):
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            seen = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            seen.extend(rewards[index].tolist())
            if len(seen) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(seen))
                mean, std = values.mean(), values.std(unbiased=False) + 1e-6
            advantages[index] = (rewards[index] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "history": {prompt: list(values) for prompt, values in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = {p: deque(v, maxlen=self.buffer_size) for p, v in state["history"].items()}


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The negated PPO-clip surrogate for one batch of steps, all inputs ``[B]`` fp32."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2).detach(),
        "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()).detach(),
        "ratio": ratio.mean().detach(),
    }
    return loss, stats


def advantages_for(
    context: TrainContext,
    tracker: PerPromptStatTracker | None,
    prompts: list[str],
    rewards: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """Advantages for this process's samples, computed over the rewards of all processes."""
    from accelerate.utils import gather_object

    accelerator = context.accelerator
    all_rewards = accelerator.gather(rewards).cpu()
    all_prompts = gather_object(prompts) if accelerator.num_processes > 1 else prompts
    if tracker is not None:
        advantages = tracker.update(all_prompts, all_rewards)
    else:
        advantages = (all_rewards - all_rewards.mean()) / (all_rewards.std(unbiased=False) + 1e-6)
    start = accelerator.process_index * len(prompts)
    return advantages[start : start + len(prompts)].clamp(-clip, clip).to(accelerator.device)


@register
class DDPO:
    """The DDPO epoch: rollouts, per-prompt advantages, PPO-clip updates over (sample, step)."""

    name = "ddpo"
    description = "DDPO (Black et al. 2023): PPO-clip policy gradient on per-step log-probs"
    section = DDPOSection
    needs_stochastic_sampler = True
    uses_stochastic_window = True

    def __init__(self, context: TrainContext, config: TrainConfig):
        self.context = context
        self.config = config
        section = config.ddpo
        self.tracker = (
            PerPromptStatTracker(section.stat_buffer_size, section.stat_min_count)
            if section.per_prompt_stat_tracking
            else None
        )

    @staticmethod
    def accumulation_steps(config: TrainConfig) -> int:
        """Micro-steps per optimiser step: DDPO accumulates over the trained timesteps too."""
        return config.train.gradient_accumulation_steps * trained_steps(config)

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """PPO's clip only acts on samples trained after the policy has moved: with one pass over
        the epoch (train.inner_epochs = 1) and a single optimiser step per epoch, every ratio is
        exactly 1 and the run is plain REINFORCE. Allowed (it is a valid choice), but said."""
        if config.train.inner_epochs > 1:
            return
        per_epoch = config.sample.batch_size * config.sample.num_batches_per_epoch
        if config.train.batch_size * config.train.gradient_accumulation_steps >= per_epoch:
            warnings.warn(
                f"{config.method}: train.gradient_accumulation_steps makes one optimiser step per epoch and "
                "train.inner_epochs is 1, so every importance ratio is exactly 1 and the PPO clip never acts: "
                "this run is plain REINFORCE. Set train.inner_epochs > 1 (or fewer accumulation steps) to use "
                "the clip.",
                stacklevel=4,
            )

    def run_epoch(self, generator: torch.Generator) -> dict[str, float]:
        config, context = self.config, self.context
        started = time.perf_counter()
        trajectory, rewards = sample_rollouts(context, config, generator)
        sampling_seconds = time.perf_counter() - started
        advantages = self.advantages(trajectory.prompts, rewards)
        stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio": []}
        for _ in range(config.train.inner_epochs):
            self._inner_epoch(trajectory, advantages, generator, stats)
        return {
            **reward_metrics(context.accelerator, rewards),
            "sampling_seconds": sampling_seconds,
            **mean_over_processes(context.accelerator, stats),
        }

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """This process's advantages ``[N]``: rewards normalised per prompt (DDPO §5.1), over all processes."""
        return advantages_for(self.context, self.tracker, prompts, rewards, self.config.ddpo.adv_clip_max)

    @property
    def clip_range(self) -> float:
        return self.config.ddpo.clip_range

    def regulariser(
        self, trajectory: Trajectory, rows: torch.Tensor, step: torch.Tensor, noise_pred: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Extra loss terms for these steps, by name (added to the loss and logged); DDPO has none."""
        return {}

    def _inner_epoch(
        self,
        trajectory: Trajectory,
        advantages: torch.Tensor,
        generator: torch.Generator,
        stats: dict[str, list[torch.Tensor]],
    ) -> None:
        config, context = self.config, self.context
        count = len(trajectory)
        order = torch.randperm(count, generator=generator)
        trajectory, advantages = trajectory.select(order), advantages[order.to(advantages.device)]
        # Each sample visits its trainable steps in its own random order; the first `trained` are used.
        candidates = torch.tensor(trainable_steps(config))
        step_order = torch.stack(
            [candidates[torch.randperm(len(candidates), generator=generator)] for _ in range(count)]
        )
        trained = trained_steps(config)
        family = families.of(context.pipe)
        scheduler = context.pipe.scheduler
        family.set_timesteps(context.pipe, config.sample.num_steps)
        for start in range(0, count, config.train.batch_size):
            rows = torch.arange(start, min(start + config.train.batch_size, count))
            for position in range(trained):
                step = step_order[rows, position]
                with context.accelerator.accumulate(context.unet):
                    with context.accelerator.autocast():
                        noise_pred = family.predict(
                            context.unet,
                            trajectory.latents[rows, step],
                            trajectory.timesteps[step],
                            families.conditioning_of(trajectory, rows),
                            trajectory.guidance_scales[rows, step],
                        )
                    _, log_prob = family.step_with_logprob(
                        scheduler,
                        noise_pred,
                        step,
                        trajectory.latents[rows, step],
                        trajectory.eta,
                        prev_sample=trajectory.latents[rows, step + 1],
                    )
                    loss, step_stats = ppo_clip_loss(
                        log_prob, trajectory.log_probs[rows, step], advantages[rows], self.clip_range
                    )
                    for name, term in self.regulariser(trajectory, rows, step, noise_pred).items():
                        loss = loss + term
                        step_stats[name] = term.detach()
                    check_finite(loss, "DDPO")
                    context.accelerator.backward(loss)
                    clip_and_step(context, config.train.max_grad_norm)
                stats["loss"].append(loss.detach())
                for name, value in step_stats.items():
                    stats.setdefault(name, []).append(value)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("tracker"):
            self.tracker.load_state_dict(state["tracker"])


def trainable_steps(config: TrainConfig) -> list[int]:
    """The steps a policy-gradient update may train on: the stochastic ones (all, without a window)."""
    first, last = stochastic_window(config) or (0, config.sample.num_steps - 1)
    return list(range(first, last + 1))


def trained_steps(config: TrainConfig) -> int:
    """How many of each trajectory's trainable steps are trained on (``train.timestep_fraction`` of them)."""
    return max(1, int(len(trainable_steps(config)) * config.train.timestep_fraction))
