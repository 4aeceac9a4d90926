"""The method contract, the method registry, and what every method shares with the others.

A method is a class satisfying ``Method``: its name, a one-line description, its config section
(a dataclass; the config key is the method's name), what it needs from the run (a differentiable
reward, a stochastic sampler, a LoRA adapter), ``validate`` for the rules that hold when it is the
chosen method, and ``run_epoch``. ``register`` makes it known to the config, the CLI and the
training loop; ``diffalign/optim/__init__.py`` shows a whole method in a few lines.

Shared here, so that methods do not spell them out: ``TrainingDiverged`` (``check_finite``), the
rollouts of the ``sample`` section (``sample_rollouts``), and the reward and loss figures of an
epoch's record (``reward_metrics``, ``mean_over_processes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from diffalign import families
from diffalign import prompts as prompt_sets
from diffalign.errors import DiffalignError
from diffalign.registry import suggestion
from diffalign.rewards import Reward, checked_call
from diffalign.sampling import Trajectory, sample

if TYPE_CHECKING:
    from diffalign.config import TrainConfig
    from diffalign.diffexp import DiffExp


class TrainingDiverged(DiffalignError, RuntimeError):
    """A loss became NaN or infinite; training stops before the update rather than continue on garbage."""


class MethodError(DiffalignError, ValueError):
    """A method is registered twice or incompletely, or is asked for by a wrong name."""


class Method(Protocol):
    """What the training loop, the config and the CLI know about a method.

    The class attributes describe it (only ``name`` and ``description`` are required; the others
    default to no section, the shipped preset and no needs). An instance trains:
    ``Method(context, config)`` is built once per run, ``run_epoch`` is called once per epoch with
    that epoch's seeded generator and returns the epoch's metrics, and ``state_dict`` /
    ``load_state_dict`` carry what it keeps between epochs (beyond weights and optimizer)
    through checkpoints.
    """

    name: ClassVar[str]  # the config's ``method`` value, and the key of its config section
    description: ClassVar[str]  # one line, paper first: shown by ``diffalign train --help``
    section: ClassVar[type | None]  # the dataclass of its config section (``config.<name>``)
    preset: ClassVar[str | None]  # a YAML file; None: ``diffalign/presets/<name>.yaml`` if it exists
    needs_differentiable_reward: ClassVar[bool]  # backpropagates through the reward
    needs_stochastic_sampler: ClassVar[bool]  # trains on per-step log-probs: sample.eta must be > 0
    needs_lora: ClassVar[bool]  # switches the adapter off for its reference model: lora.enabled=true
    uses_stochastic_window: ClassVar[bool]  # honours sample.stochastic_steps
    offline: ClassVar[bool]  # learns from preference data (config.data), not from rewarded rollouts

    def __init__(self, context: TrainContext, config: TrainConfig) -> None: ...

    @staticmethod
    def accumulation_steps(config: TrainConfig) -> int:
        """Micro-steps per optimiser step (accelerate's ``gradient_accumulation_steps``)."""
        ...

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """Rules that hold when this is the chosen method; raises ``ConfigError`` naming the key."""
        ...

    def run_epoch(self, generator: torch.Generator) -> dict[str, float]:
        """Sample, reward and update for one epoch; returns its metrics (at least ``reward_mean``,
        ``samples`` and ``loss``), which the loop writes to ``metrics.jsonl``."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class MethodInfo:
    """A registered method as the config and the CLI see it (``Method``'s attributes, defaults filled)."""

    name: str
    description: str
    cls: type
    section: type | None
    preset: Path | None  # its own preset file; None: the shipped presets/<name>.yaml, if any
    needs_differentiable_reward: bool
    needs_stochastic_sampler: bool
    needs_lora: bool
    uses_stochastic_window: bool
    offline: bool = False

    def validate(self, config: TrainConfig) -> None:
        check = getattr(self.cls, "validate", None)
        if check is not None:
            check(config)


_METHODS: dict[str, MethodInfo] = {}
_REQUIRED = ("name", "description", "accumulation_steps", "run_epoch", "state_dict", "load_state_dict")


def register(cls: type) -> type:
    """Class decorator: make ``cls`` (a ``Method``) the method ``method: <cls.name>``."""
    missing = [attribute for attribute in _REQUIRED if not hasattr(cls, attribute)]
    if missing:
        raise MethodError(
            f"method class {cls.__name__} lacks {', '.join(missing)} (see diffalign.optim.base.Method)"
        )
    if getattr(cls, "section", None) is not None and not str(cls.name).isidentifier():
        raise MethodError(f"method name {cls.name!r} names its config section, so it must be an identifier")
    if cls.name in _METHODS and _METHODS[cls.name].cls is not cls:
        raise MethodError(
            f"method name {cls.name!r} is registered twice ({_METHODS[cls.name].cls.__name__}, {cls.__name__})"
        )
    preset = getattr(cls, "preset", None)
    _METHODS[cls.name] = MethodInfo(
        name=cls.name,
        description=cls.description,
        cls=cls,
        section=getattr(cls, "section", None),
        preset=Path(preset) if preset is not None else None,
        needs_differentiable_reward=getattr(cls, "needs_differentiable_reward", False),
        needs_stochastic_sampler=getattr(cls, "needs_stochastic_sampler", False),
        needs_lora=getattr(cls, "needs_lora", False),
        uses_stochastic_window=getattr(cls, "uses_stochastic_window", False),
        offline=getattr(cls, "offline", False),
    )
    return cls


def registered() -> dict[str, MethodInfo]:
    """The registered methods by name, in registration order."""
    return dict(_METHODS)


def lookup(name: str) -> MethodInfo:
    """The method registered as ``name``, or a ``MethodError`` that suggests the closest name."""
    if name not in _METHODS:
        names = list(_METHODS)
        raise MethodError(
            f"unknown method {name!r}.{suggestion(str(name), names)} Methods: {', '.join(names)}."
        )
    return _METHODS[name]


def check_finite(loss: torch.Tensor, label: str) -> None:
    """Stop before an update on a NaN or infinite ``loss`` (``TrainingDiverged``)."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"{label} loss is {loss.item()}; stopping before the update: "
            "lower train.learning_rate, or check the scale of the reward"
        )


def reward_metrics(accelerator: Accelerator, rewards: torch.Tensor) -> dict[str, float]:
    """``reward_mean``, ``reward_std`` and ``samples`` of this epoch's ``rewards  # [N]``, over all processes."""
    all_rewards = accelerator.gather(rewards)
    return {
        "reward_mean": all_rewards.mean().item(),
        "reward_std": all_rewards.std(unbiased=False).item(),
        "samples": int(all_rewards.numel()),
    }


def mean_over_processes(accelerator: Accelerator, stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Each statistic's mean over the epoch's updates, averaged over processes."""
    return {
        name: accelerator.reduce(torch.stack(values).mean(), reduction="mean").item()
        for name, values in stats.items()
    }


def stochastic_window(config: TrainConfig) -> tuple[int, int] | None:
    """``sample.stochastic_steps`` as ``(first, last)``, or None when every step is stochastic."""
    window = config.sample.stochastic_steps
    return (int(window[0]), int(window[1])) if window else None


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
    denoiser = families.denoiser(context.pipe)
    denoiser.eval()
    trajectories, rewards = [], []
    for _ in range(num_batches):
        drawn = prompt_sets.draw(context.prompts, batch_size // images_per_prompt, generator)
        batch_prompts = [prompt for prompt in drawn for _ in range(images_per_prompt)]
        scales, embeds, latents = guidance_scale, None, None
        if shared_initial_noise:
            latents = (
                families.of(context.pipe)
                .initial_latents(context.pipe, len(drawn), generator)
                .repeat_interleave(images_per_prompt, 0)
            )
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
    denoiser.train()
    return Trajectory.concat(trajectories), torch.cat(rewards).to(context.accelerator.device)


def sample_rollouts(
    context: TrainContext, config: TrainConfig, generator: torch.Generator
) -> tuple[Trajectory, torch.Tensor]:
    """``collect_rollouts`` as the run's ``sample`` section says: the rollouts of an epoch of a
    policy-gradient method (``sample.stochastic_steps`` is its window, validated per method)."""
    section = config.sample
    return collect_rollouts(
        context,
        batch_size=section.batch_size,
        num_batches=section.num_batches_per_epoch,
        images_per_prompt=section.images_per_prompt,
        shared_initial_noise=section.shared_initial_noise,
        num_steps=section.num_steps,
        guidance_scale=section.guidance_scale,
        eta=section.eta,
        negative_prompt=section.negative_prompt,
        generator=generator,
        stochastic_steps=stochastic_window(config),
    )


def clip_and_step(context: TrainContext, max_grad_norm: float) -> None:
    """Clip gradients when accelerate is about to apply them, then step (no-op while accumulating)."""
    if context.accelerator.sync_gradients:
        context.accelerator.clip_grad_norm_(context.trainable_parameters, max_grad_norm)
    context.optimizer.step()
    context.optimizer.zero_grad()
