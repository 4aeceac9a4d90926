"""Model families: what sampling and the optimisers need to know about a pipeline's denoiser.

Stable Diffusion 1.x/2.x is a UNet predicting noise, stepped by DDIM-η (``diffalign.sampling``);
Stable Diffusion 3 is a transformer predicting a rectified-flow velocity, stepped by the SDE of
``diffalign.flow``. Both are Gaussian policies per step, so DDPO, DPOK, GRPO, AlignProp and ReFL are
written once against the ``Family`` contract below and run on either. A family registers itself
with ``register`` when its module is imported; ``of(pipe)`` finds the one a pipeline belongs to,
and generic code never names one. A FLUX family would be one more module implementing the same
methods (its transformer takes packed latents and text ids, its scheduler is the same flow).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from diffalign.sampling import Trajectory

# Modules that register the built-in families, imported on first need.
BUILTIN = ("diffalign.sampling", "diffalign.flow")


class FamilyError(DiffalignError, ValueError):
    """A pipeline belongs to no registered model family."""


@dataclass
class Conditioning:
    """Text conditioning of a batch for classifier-free guidance.

    ``pooled``/``negative_pooled`` are the pooled text vectors SD3-style transformers also take
    (None for a UNet, which reads only the token embeddings).
    """

    embeds: torch.Tensor  # [B, L, D] conditional token embeddings
    negative_embeds: torch.Tensor  # [B, L, D] unconditional token embeddings
    pooled: torch.Tensor | None = None  # [B, P]
    negative_pooled: torch.Tensor | None = None  # [B, P]

    def select(self, rows: torch.Tensor) -> Conditioning:
        """The rows ``rows`` (a 1-D long tensor) of every tensor."""
        pick = lambda value: None if value is None else value[rows.to(value.device)]
        return Conditioning(
            pick(self.embeds), pick(self.negative_embeds), pick(self.pooled), pick(self.negative_pooled)
        )


class Family(Protocol):
    """How to condition, predict, step and decode one kind of pipeline.

    ``step`` indices count denoising steps from 0 (the noisiest) after ``set_timesteps``; the
    per-step policy is Gaussian, ``transition`` returns its mean and standard deviation and
    ``step_with_logprob`` samples or re-scores it. ``noise_level`` is ``sample.eta``: DDIM's η
    for a UNet, the SDE's noise level for a flow model; 0 is the deterministic sampler.
    """

    name: str
    denoiser_class: type  # the trained module's class (UNet2DConditionModel, SD3Transformer2DModel)
    pipeline_class: type  # whose save_lora_weights / lora_state_dict read and write its adapters
    lora_targets: tuple[str, ...]  # default LoRA target modules (peft names)
    denoiser_name: str  # the pipeline component that is trained: "unet" or "transformer"
    sampler: str  # one line for messages: the stochastic sampler this family uses
    supports_prompt_weighting: bool  # DiffExp's compel phrase weights can encode its prompts

    def matches(self, pipe: DiffusionPipeline) -> bool: ...

    def prepare_scheduler(self, pipe: DiffusionPipeline) -> None:
        """Give ``pipe`` the scheduler the family's sampler steps with, or raise ``PipelineError``."""
        ...

    def encode(self, pipe: DiffusionPipeline, prompts: list[str], negative_prompt: str) -> Conditioning: ...

    def initial_latents(
        self, pipe: DiffusionPipeline, batch_size: int, generator: torch.Generator | None
    ) -> torch.Tensor: ...

    def set_timesteps(self, pipe: DiffusionPipeline, num_steps: int) -> torch.Tensor: ...

    def predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: torch.Tensor,
    ) -> torch.Tensor: ...

    def transition(
        self,
        scheduler,
        prediction: torch.Tensor,
        step: torch.Tensor,
        latents: torch.Tensor,
        noise_level: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step_with_logprob(
        self,
        scheduler,
        prediction: torch.Tensor,
        step: torch.Tensor,
        latents: torch.Tensor,
        noise_level: float,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def predict_clean(
        self, scheduler, prediction: torch.Tensor, step: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor: ...

    def decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor: ...

    # The denoising objective the model was pre-trained with, which Diffusion-DPO compares model
    # and reference on: noise clean latents at timesteps from the training distribution, predict
    # the target without guidance.

    def training_timesteps(
        self, pipe: DiffusionPipeline, count: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``count`` timesteps ``[count]`` (in the denoiser's units, on the CPU) drawn with ``generator``
        from the family's training distribution."""
        ...

    def noised(
        self, pipe: DiffusionPipeline, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``clean`` latents noised with ``noise`` at ``timesteps``, and the regression target there."""
        ...

    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
    ) -> torch.Tensor:
        """The conditional prediction (no classifier-free guidance) at ``timesteps  # [B]``."""
        ...


_FAMILIES: list[Family] = []
_loaded = False


def register(family: Family) -> Family:
    """Make ``family`` known to ``of``; a family registered under an existing name replaces it."""
    _FAMILIES[:] = [known for known in _FAMILIES if known.name != family.name]
    _FAMILIES.append(family)
    return family


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def of(pipe: DiffusionPipeline) -> Family:
    """The family ``pipe`` belongs to, or a ``FamilyError`` naming the supported ones."""
    _load_builtin()
    for family in _FAMILIES:
        if family.matches(pipe):
            return family
    raise FamilyError(
        f"diffalign cannot train or sample a {type(pipe).__name__}: supported model families are "
        f"{', '.join(f'{family.name} ({family.sampler})' for family in _FAMILIES)}"
    )


def of_denoiser(module: torch.nn.Module) -> Family:
    """The family whose denoiser class ``module`` (unwrapped) is an instance of."""
    _load_builtin()
    for family in _FAMILIES:
        if isinstance(module, family.denoiser_class):
            return family
    raise FamilyError(f"no model family trains a {type(module).__name__}")


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The module training changes: the UNet of Stable Diffusion 1.x/2.x, the transformer of SD3."""
    return getattr(pipe, of(pipe).denoiser_name)


def conditioning_of(trajectory: Trajectory, rows: torch.Tensor | None = None) -> Conditioning:
    """The text conditioning stored in ``trajectory`` (of its ``rows``, or all)."""
    conditioning = Conditioning(
        trajectory.prompt_embeds,
        trajectory.negative_prompt_embeds,
        trajectory.pooled_prompt_embeds,
        trajectory.negative_pooled_prompt_embeds,
    )
    return conditioning if rows is None else conditioning.select(rows)
