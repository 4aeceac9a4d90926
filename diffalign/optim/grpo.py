"""GRPO: group relative policy optimisation on a diffusion sampler's per-step Gaussian policy.

GRPO (Shao et al. 2024, arXiv 2402.03300, for language models) replaces a value function or a
running baseline by the other samples of the same prompt. Flow-GRPO (Liu et al. 2025, arXiv
2505.05470, eq. 4–6) and DanceGRPO (Xue et al. 2025, arXiv 2505.07818) carry it to diffusion:
for a group of G images of one prompt with rewards r_1..r_G,

    A_i = (r_i − mean(r_1..r_G)) / std(r_1..r_G)

and every denoising step of image i is trained with the PPO-clip surrogate of DDPO on the
per-step importance ratio, minus β · KL(p_θ(x_{t-1} | x_t, c) ‖ p_ref(x_{t-1} | x_t, c)):

    L = E_i,t[ min(r_t A_i, clip(r_t, 1−ε, 1+ε) A_i) ] − β · KL

Here the policy is the DDIM-η step of ``diffalign.sampling`` (the same Gaussian DDPO uses); the
KL between two such steps of equal variance is ‖μ_θ − μ_ref‖² / 2σ², averaged over latent
dimensions like the log-probs, and the reference is the UNet with its LoRA adapter switched off
(no second copy in memory). Groups are the ``sample.images_per_prompt`` images of one drawn
prompt in a sampling batch, optionally from one x_T (``sample.shared_initial_noise``, as
DanceGRPO). ``grpo.std: batch`` divides by the whole batch's std instead of each group's: the
variant that does not inflate the advantages of a group whose images all scored nearly alike.

What differs from DDPO (``diffalign/optim/ddpo.py``) is only the advantage and the optional KL:
sampling, the ratio, the clip and the timestep subset are DDPO's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffalign import families
from diffalign.config import ConfigError, doc
from diffalign.optim.base import TrainContext, register
from diffalign.optim.ddpo import DDPO
from diffalign.optim.dpok import adapter_disabled, kl_to_reference
from diffalign.sampling import Trajectory

if TYPE_CHECKING:
    from diffalign.config import TrainConfig


@dataclass
class GRPOSection:
    """GRPO (Shao et al. 2024; on diffusion: Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025)."""

    clip_range: float = doc(1e-2, "PPO clip range on the per-step ratio (as ddpo.clip_range)")
    adv_clip_max: float = doc(5.0, "advantages are clipped to [-this, this]")
    std: str = doc(
        "group", "advantage scale: group = each prompt group's own std (Flow-GRPO), batch = the batch's std"
    )
    kl_weight: float = doc(
        0.0, "beta: weight of the per-step KL to the reference (the UNet with the LoRA adapter off)"
    )

    def validate(self, config: TrainConfig) -> None:
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise ConfigError("grpo.clip_range and grpo.adv_clip_max must be positive")
        if self.std not in ("group", "batch"):
            raise ConfigError(f"grpo.std must be group or batch, got {self.std!r}")
        if self.kl_weight < 0:
            raise ConfigError(f"grpo.kl_weight must not be negative, got {self.kl_weight}")


def group_advantages(rewards: torch.Tensor, group_size: int, std: str = "group") -> torch.Tensor:
    """``rewards  # [N]`` in consecutive groups of ``group_size`` → advantages ``[N]`` (fp32)."""
    groups = rewards.float().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    scale = (
        groups.std(dim=1, unbiased=False, keepdim=True)
        if std == "group"
        else rewards.float().std(unbiased=False)
    )
    return (centred / (scale + 1e-6)).reshape(-1)


@register
class GRPO(DDPO):
    """DDPO's epoch with group-relative advantages and an optional KL to the reference."""

    name = "grpo"
    description = (
        "GRPO (Flow-GRPO, Liu et al. 2025): DDPO with advantages relative to each prompt's image group"
    )
    section = GRPOSection

    def __init__(self, context: TrainContext, config: TrainConfig):
        super().__init__(context, config)
        self.tracker = None  # the group is the baseline; nothing is carried across epochs

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        if config.sample.images_per_prompt < 2:
            raise ConfigError(
                "grpo compares the images of one prompt with each other: sample.images_per_prompt must be at "
                f"least 2, got {config.sample.images_per_prompt}"
            )
        if config.grpo.kl_weight > 0 and not config.lora.enabled:
            raise ConfigError(
                "grpo.kl_weight > 0 regularises towards the model with the LoRA adapter off, so it needs "
                "lora.enabled=true"
            )
        super().validate(config)  # DDPO's: the note when the PPO clip cannot act

    @property
    def clip_range(self) -> float:
        return self.config.grpo.clip_range

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        accelerator = self.context.accelerator
        all_rewards = accelerator.gather(rewards).cpu()  # each process's groups stay contiguous
        advantages = group_advantages(all_rewards, self.config.sample.images_per_prompt, self.config.grpo.std)
        clip = self.config.grpo.adv_clip_max
        start = accelerator.process_index * len(prompts)
        return advantages[start : start + len(prompts)].clamp(-clip, clip).to(accelerator.device)

    def regulariser(
        self, trajectory: Trajectory, rows: torch.Tensor, step: torch.Tensor, noise_pred: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        beta = self.config.grpo.kl_weight
        if beta == 0:
            return {}
        context = self.context
        family = families.of(context.pipe)
        latents, timesteps = trajectory.latents[rows, step], trajectory.timesteps[step]
        conditioning = families.conditioning_of(trajectory, rows)
        with (
            torch.no_grad(),
            adapter_disabled(families.denoiser(context.pipe)),
            context.accelerator.autocast(),
        ):
            reference = family.predict(
                context.unet, latents, timesteps, conditioning, trajectory.guidance_scales[rows, step]
            )
        scheduler = context.pipe.scheduler
        mean, std = family.transition(scheduler, noise_pred, step, latents, trajectory.eta)
        reference_mean, _ = family.transition(scheduler, reference, step, latents, trajectory.eta)
        kl = kl_to_reference(mean, reference_mean, std).mean()
        return {"kl_to_reference": beta * kl}
