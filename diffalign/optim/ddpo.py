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
from collections import deque

import torch

from diffalign.config import TrainConfig
from diffalign.optim.base import TrainContext, TrainingDiverged, clip_and_step, collect_rollouts
from diffalign.sampling import Trajectory, ddim_step_with_logprob, guided_noise


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
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "history": {prompt: list(values) for prompt, values in self.history.items()}}

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
    context: TrainContext, tracker: PerPromptStatTracker | None, prompts: list[str], rewards: torch.Tensor,
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


class DDPO:
    """The DDPO epoch: rollouts, per-prompt advantages, PPO-clip updates over (sample, step)."""

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

    def run_epoch(self, epoch: int, generator: torch.Generator) -> dict[str, float]:
        config, context = self.config, self.context
        started = time.perf_counter()
        trajectory, rewards = collect_rollouts(
            context,
            batch_size=config.sample.batch_size,
            num_batches=config.sample.num_batches_per_epoch,
            images_per_prompt=config.sample.images_per_prompt,
            shared_initial_noise=config.sample.shared_initial_noise,
            num_steps=config.sample.num_steps,
            guidance_scale=config.sample.guidance_scale,
            eta=config.sample.eta,
            negative_prompt=config.sample.negative_prompt,
            generator=generator,
            stochastic_steps=stochastic_window(config),
        )
        sampling_seconds = time.perf_counter() - started
        advantages = self.advantages(trajectory.prompts, rewards)
        stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio": []}
        for _ in range(config.train.inner_epochs):
            self._inner_epoch(trajectory, advantages, generator, stats)
        all_rewards = context.accelerator.gather(rewards)
        metrics = {
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std(unbiased=False).item(),
            "samples": int(all_rewards.numel()),
            "sampling_seconds": sampling_seconds,
        }
        for name, values in stats.items():
            metrics[name] = context.accelerator.reduce(torch.stack(values).mean(), reduction="mean").item()
        return metrics

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
        scheduler = context.pipe.scheduler
        scheduler.set_timesteps(config.sample.num_steps, device=context.accelerator.device)
        for start in range(0, count, config.train.batch_size):
            rows = torch.arange(start, min(start + config.train.batch_size, count))
            for position in range(trained):
                step = step_order[rows, position]
                with context.accelerator.accumulate(context.unet):
                    with context.accelerator.autocast():
                        noise_pred = guided_noise(
                            context.unet,
                            trajectory.latents[rows, step],
                            trajectory.timesteps[step],
                            trajectory.prompt_embeds[rows],
                            trajectory.negative_prompt_embeds[rows],
                            trajectory.guidance_scales[rows, step],
                        )
                    _, log_prob = ddim_step_with_logprob(
                        scheduler,
                        noise_pred,
                        trajectory.timesteps[step],
                        trajectory.latents[rows, step],
                        eta=trajectory.eta,
                        prev_sample=trajectory.latents[rows, step + 1],
                    )
                    loss, step_stats = ppo_clip_loss(
                        log_prob, trajectory.log_probs[rows, step], advantages[rows], self.clip_range
                    )
                    for name, term in self.regulariser(trajectory, rows, step, noise_pred).items():
                        loss = loss + term
                        step_stats[name] = term.detach()
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"DDPO loss is {loss.item()}; stopping before the update: "
                    "lower train.learning_rate, or check the scale of the reward")
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


def stochastic_window(config: TrainConfig) -> tuple[int, int] | None:
    """``sample.stochastic_steps`` as ``(first, last)``, or None when every step is stochastic."""
    window = config.sample.stochastic_steps
    return (int(window[0]), int(window[1])) if window else None


def trainable_steps(config: TrainConfig) -> list[int]:
    """The steps a policy-gradient update may train on: the stochastic ones (all, without a window)."""
    first, last = stochastic_window(config) or (0, config.sample.num_steps - 1)
    return list(range(first, last + 1))


def trained_steps(config: TrainConfig) -> int:
    """How many of each trajectory's trainable steps are trained on (``train.timestep_fraction`` of them)."""
    return max(1, int(len(trainable_steps(config)) * config.train.timestep_fraction))
