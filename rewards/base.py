"""The Reward protocol and the name registry every part of diffalign shares.

A reward maps a batch of images in [0, 1] and their prompts to one score per image.
Training, benchmarks, TextNorm, FiFA and the app all call rewards through this one
signature, so a new reward written here works everywhere at once.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    """What every reward looks like from the outside.

    ``differentiable`` tells AlignProp-style methods whether gradients flow from the
    score back to the pixels; non-differentiable rewards may run under ``no_grad``.
    """

    name: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score ``images  # [B, 3, H, W] in [0, 1]`` against ``prompts`` (len B); returns ``[B]``."""
        ...


class RewardError(ValueError):
    """A reward was asked for by a wrong name, or returned something unusable."""


@dataclass(frozen=True)
class RewardInfo:
    """One registry entry: how to build a reward and what a user should know about it."""

    name: str
    factory: Callable[..., Reward]
    description: str
    differentiable: bool
    needs_checkpoint: bool


_REGISTRY: dict[str, RewardInfo] = {}


def register(name: str, *, description: str, differentiable: bool, needs_checkpoint: bool = False):
    """Class/function decorator that makes a reward available by ``name`` (CLI and configs)."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise RewardError(f"reward name {name!r} is registered twice")
        _REGISTRY[name] = RewardInfo(name, factory, description, differentiable, needs_checkpoint)
        return factory

    return decorate


def available() -> list[RewardInfo]:
    """All registered rewards, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def info(name: str) -> RewardInfo:
    """The registry entry for ``name``; an unknown name is an error that suggests the closest one."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardError(
            f"unknown reward {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))} "
            "(see `diffalign rewards`)."
        )
    return _REGISTRY[name]


def build(name: str, **options) -> Reward:
    """Build the reward registered as ``name`` with its keyword ``options``."""
    entry = info(name)
    try:
        return entry.factory(**options)
    except TypeError as error:
        raise RewardError(f"reward {name!r} does not take options {sorted(options)}: {error}") from error


def checked_call(reward: Reward, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Call ``reward`` and insist on a finite ``[B]`` float result.

    Training must never continue on a NaN or a mis-shaped score, so this is the only way
    the training loop and the benchmarks call a reward.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise RewardError(f"{images.shape[0]} images but {len(prompts)} prompts")
    scores = reward(images, prompts)
    if not isinstance(scores, torch.Tensor) or scores.shape != (images.shape[0],):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RewardError(
            f"reward {getattr(reward, 'name', reward)!r} returned {shape}; expected a tensor of shape "
            f"[{images.shape[0]}] (one score per image)"
        )
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        raise RewardError(
            f"reward {getattr(reward, 'name', reward)!r} returned non-finite scores at batch positions {bad}"
            f" (prompts: {[prompts[i] for i in bad][:3]})"
        )
    return scores.float()
