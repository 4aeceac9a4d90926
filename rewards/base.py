"""The Reward protocol and the name registry every part of diffalign shares.

A reward maps a batch of images in [0, 1] and their prompts to one score per image.
Training, benchmarks, TextNorm, FiFA and the app all call rewards through this one
signature, so a new reward written here works everywhere at once.

Names are either a registered reward (``shapes-clip``) or a registered *wrapper* applied to
registered rewards (``textnorm(shapes-clip,clip-score)``): a wrapper turns rewards into a new
reward, so every place that builds rewards by name gets wrapped ones for free.
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from diffalign import registry
from diffalign.errors import DiffalignError

if TYPE_CHECKING:  # torch is imported where a reward runs, so that listing rewards stays fast
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


@runtime_checkable
class CandidateReward(Reward, Protocol):
    """A reward that can score each image against several prompts at once (optional).

    Methods that compare one image with many prompts (TextNorm's contrastive prompts) would
    otherwise repeat every image once per prompt and encode it again each time; a two-tower
    reward encodes each image once and each distinct prompt once.
    """

    def score_candidates(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """Score ``images  # [B, 3, H, W]`` against ``candidates`` (B rows of K prompts each);
        returns ``[B, K]`` with ``[b, k] == reward(images[b:b+1], [candidates[b][k]])``."""
        ...


@runtime_checkable
class TextEmbeddingReward(Reward, Protocol):
    """A two-tower reward that can embed prompts on their own (optional).

    FiFA measures the diversity of a set of prompts in the reward's own text-embedding space,
    so that "near" means what the reward model thinks is near.
    """

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm prompt embeddings ``[N, D]``, without a graph."""
        ...


class RewardError(DiffalignError, ValueError):
    """A reward was asked for by a wrong name, or returned something unusable."""


@dataclass(frozen=True)
class RewardInfo:
    """One registry entry: how to build a reward and what a user should know about it."""

    name: str
    factory: Callable[..., Reward]
    description: str
    differentiable: bool
    needs_checkpoint: bool


@dataclass(frozen=True)
class WrapperInfo:
    """A registered wrapper: ``factory(member_names, **options)`` builds a reward from rewards."""

    name: str
    factory: Callable[..., Reward]
    description: str


_REGISTRY: dict[str, RewardInfo] = {}
_WRAPPERS: dict[str, WrapperInfo] = {}
_WRAPPED_NAME = re.compile(r"(?P<outer>[^()\s]+)\((?P<inner>[^()]*)\)")


def register(name: str, *, description: str, differentiable: bool, needs_checkpoint: bool = False):
    """Class/function decorator that makes a reward available by ``name`` (CLI and configs)."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise RewardError(f"reward name {name!r} is registered twice")
        _REGISTRY[name] = RewardInfo(name, factory, description, differentiable, needs_checkpoint)
        return factory

    return decorate


def register_wrapper(name: str, *, description: str):
    """Decorator that makes ``name(reward[,reward...])`` a reward name (see ``info``).

    The factory is called as ``factory(member_names, **options)`` and builds the members itself,
    so that it decides which options are its own and which belong to a member.
    """

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _WRAPPERS or name in _REGISTRY:
            raise RewardError(f"reward wrapper name {name!r} is registered twice")
        _WRAPPERS[name] = WrapperInfo(name, factory, description)
        return factory

    return decorate


def available() -> list[RewardInfo]:
    """All registered rewards, sorted by name, then one entry per wrapper.

    A wrapper's entry is a template (``textnorm(REWARD,...)``) for listings; it is marked
    differentiable because it is exactly when its members are, which ``info`` reports per name.
    Providers (worlds that register rewards, ``diffalign.registry``) are imported first.
    """
    registry.load_providers()
    templates = [
        RewardInfo(
            f"{w.name}(REWARD,...)", w.factory, w.description, differentiable=True, needs_checkpoint=False
        )
        for w in (_WRAPPERS[name] for name in sorted(_WRAPPERS))
    ]
    return [_REGISTRY[name] for name in sorted(_REGISTRY)] + templates


def info(name: str) -> RewardInfo:
    """The registry entry for ``name``; an unknown name is an error that suggests the closest one.

    ``wrapper(a,b)`` gets an entry made on the fly: differentiable iff every member is, needing a
    checkpoint iff any member does. A name not registered yet is looked for in the providers.
    """
    if name not in _REGISTRY:
        registry.load_providers()
    if name in _REGISTRY:
        return _REGISTRY[name]
    wrapped = _WRAPPED_NAME.fullmatch(name.strip())
    if wrapped:
        return _wrapped_info(wrapped["outer"], wrapped["inner"], name)
    if name in _WRAPPERS:
        raise RewardError(
            f"{name!r} wraps other rewards: name them in parentheses, e.g. {name}(shapes-clip) "
            f"or {name}(shapes-clip,clip-score)."
        )
    known = list(_REGISTRY) + [f"{w}(shapes-clip)" for w in _WRAPPERS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    wrappers = "".join(f", {w}(REWARD,...)" for w in sorted(_WRAPPERS))
    raise RewardError(
        f"unknown reward {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}{wrappers} "
        "(see `diffalign rewards`)."
    )


def _wrapped_info(outer: str, inner: str, name: str) -> RewardInfo:
    if outer not in _WRAPPERS:
        close = difflib.get_close_matches(outer, list(_WRAPPERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardError(
            f"unknown reward wrapper {outer!r} in {name!r}.{hint} Wrappers: {', '.join(sorted(_WRAPPERS))}."
        )
    members = [part.strip() for part in inner.split(",")]
    if not all(members):
        raise RewardError(
            f"{name!r}: name one or more rewards separated by commas, e.g. {outer}(shapes-clip)"
        )
    if len(set(members)) != len(members):
        raise RewardError(
            f"{name!r} names a reward twice; name each member once (for two checkpoints of one reward, "
            "build the members in Python and pass them to the wrapper's class)"
        )
    entries = []
    for member in members:
        if member in _WRAPPERS:
            raise RewardError(f"{name!r}: wrappers do not nest; members must be plain rewards")
        try:
            entries.append(info(member))
        except RewardError as error:
            raise RewardError(f"in {name!r}: {error}") from error
    wrapper = _WRAPPERS[outer]
    return RewardInfo(
        name=f"{outer}({','.join(members)})",
        factory=lambda **options: wrapper.factory(members, **options),
        description=f"{wrapper.description} (members: {', '.join(members)})",
        differentiable=all(entry.differentiable for entry in entries),
        needs_checkpoint=any(entry.needs_checkpoint for entry in entries),
    )


def build(name: str, **options) -> Reward:
    """Build the reward registered as ``name`` with its keyword ``options``."""
    entry = info(name)
    try:
        return entry.factory(**options)
    except TypeError as error:
        raise RewardError(f"reward {name!r} does not take options {sorted(options)}: {error}") from error


class TextEmbeddingCache:
    """Prompt -> embedding, computed in one batch per call for the prompts not yet seen.

    Bounded (least recently used entries go first) because contrastive prompts multiply the
    distinct texts a long run meets; ``embed`` must be a frozen text tower (no gradients).
    """

    def __init__(self, embed: Callable[[list[str]], torch.Tensor], max_size: int = 65536):
        self.embed = embed
        self.max_size = max_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: Sequence[str], device: torch.device | str) -> torch.Tensor:
        """Embeddings ``[N, D]`` of ``prompts`` on ``device``."""
        import torch

        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            self._cache.update(zip(missing, self.embed(missing).detach()))
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        embeds = torch.stack([self._cache[p].to(device) for p in prompts])
        while len(self._cache) > self.max_size:
            self._cache.popitem(last=False)
        return embeds


def candidate_rows(candidates: Sequence[Sequence[str]], batch: int, reward: str) -> list[str]:
    """The prompts of ``candidates`` row by row, after checking there is one row of equal length per image."""
    if len(candidates) != batch or len({len(row) for row in candidates}) > 1:
        raise RewardError(
            f"reward {reward!r}: score_candidates needs one row of candidate prompts per image, all rows "
            f"the same length; got {len(candidates)} rows of lengths {sorted({len(r) for r in candidates})} "
            f"for {batch} images"
        )
    return [prompt for row in candidates for prompt in row]


def checked_call(reward: Reward, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Call ``reward`` and insist on a finite ``[B]`` float result.

    Training must never continue on a NaN or a mis-shaped score, so this is the only way
    the training loop and the benchmarks call a reward.
    """
    import torch

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
