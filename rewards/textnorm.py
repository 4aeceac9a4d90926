"""TextNorm: a reward calibrated by its confidence across contrastive prompts.

Kim et al., ICLR 2024, "Confidence-aware Reward Optimization for Fine-tuning Text-to-Image
Models". A raw alignment reward R(x, y) is not comparable across prompts — some prompts
simply score higher — and it can be high for an image that fits a *different* prompt just
as well. TextNorm asks how much more the image fits its prompt than prompts that differ in one
detail. With C(y) the contrastive prompts of y (``contrast.py``),

    R_TN(x, y) = exp(c R(x, y)) / sum over y' in {y} ∪ C(y) of exp(c R(x, y')),

the probability of y among its contrasts, in (0, 1). An ensemble of M base rewards averages
the members' probabilities, each member with its own scale c (their raw scores live on
different scales), and may subtract an uncertainty penalty:

    R(x, y) = mean_m p_m  -  uncertainty_weight * var_m p_m     (population variance over members).

The scale c is a softmax inverse temperature. For CLIP-style cosines the natural value is
the logit scale the model was trained with: it makes the probability exactly the model's own
zero-shot classification of the image among the candidate prompts. ``DEFAULT_SCALES`` holds
that value for the built-in rewards; any other reward needs an explicit ``c``.

Empty contrast sets stop the run (``TextNormError``) instead of falling back to something: the
probability over a set of one prompt is 1 for every image, so a silent fallback would hand the
optimiser a constant (or, falling back to the raw reward, a number on another scale) for some
prompts and corrupt every advantage computed across a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from diffalign.rewards import contrast as contrast_module
from diffalign.rewards.base import Reward, RewardError, build
from diffalign.rewards.contrast import ContrastGenerator
from torch import nn

# c per built-in reward: the logit scale each was trained with (see the module docstring).
# shapes-clip learned exp(3.0) = 20.1. On 384 ShapesWorld renders of train prompts (~17 contrasts
# each), telling an image of its prompt from an image of one of the prompt's contrasts, pooled over
# prompts, has AUC 0.72 at c=1, 0.93 at c=5, 0.96 for c in 10-50 (best, 0.962, at c=20) and 0.954
# at c=100, against 0.952 for the raw cosine; at c=20 the true prompt's mean probability is 0.47.
# Larger c pushes probabilities to 0 or 1, where their gradient vanishes. OpenAI CLIP's logit scale
# is 100, as is that of LAION's ViT-H/14, which HPSv2 fine-tunes (its own value unchecked here: no
# weights on this machine); PickScore's score already includes its logit scale, so its c is 1.
# shapes-negclip (shapes-clip fine-tuned with hard negatives) ended its fine-tune at exp = 27.4.
# ImageReward was trained as a Bradley-Terry model on its raw output r, and its score is
# (r - mean) / 1.0333, so c = 1.0333 makes the softmax the model's own choice among the prompts;
# blip2's score is ITM log-odds, whose softmax at c = 1 is the matching odds normalised over them.
DEFAULT_SCALES: dict[str, float] = {
    "shapes-clip": 20.0,
    "shapes-negclip": 27.4,
    "clip-score": 100.0,
    "hpsv2": 100.0,
    "pickscore": 1.0,
    "imagereward": 1.0333394966054072,
    "blip2": 1.0,
}


class TextNormError(RewardError):
    """TextNorm cannot calibrate: no contrastive prompts for a prompt, or an unusable option."""


class TextNorm(nn.Module):
    """A reward (or an ensemble of rewards) turned into the probability of the prompt among its
    contrastive prompts; callable like any reward, ``[B, 3, H, W]`` images and B prompts -> ``[B]``.

    ``reward``: a reward or a list of rewards (an ensemble). ``contrast``: a generator
    ``prompt -> list[str]`` or its name (``shapes``, ``rules``, ``file:PATH``, ``lm:PATH``; see
    ``contrast.py``), built with ``contrast_options``. ``c``: one scale for every member, one per
    member, or None for ``DEFAULT_SCALES``. ``uncertainty_weight``: lambda of the variance
    penalty (ensembles only). ``contrasts(prompt)`` is a prompt's contrast set, generated once
    and cached (``cache_size`` prompts, least recently used dropped first).

    Rewards that have ``score_candidates`` (``CandidateReward``) encode each image once for all
    its candidate prompts; others are called on the image repeated once per candidate.
    Gradients reach the images when every member is differentiable.
    """

    def __init__(
        self,
        reward: Reward | Sequence[Reward],
        contrast: str | ContrastGenerator = "shapes",
        c: float | Sequence[float] | None = None,
        uncertainty_weight: float = 0.0,
        contrast_options: dict[str, Any] | None = None,
        cache_size: int = 65536,
    ):
        super().__init__()
        members = [reward] if callable(reward) else list(reward)
        if not members:
            raise TextNormError("TextNorm needs at least one reward")
        self.members = members
        # Registered so that .to(device) and .eval() reach the member models; other callables stay as is.
        self.member_modules = nn.ModuleList(m for m in members if isinstance(m, nn.Module))
        self.scales = _scales(c, members)
        if not (uncertainty_weight >= 0 and math.isfinite(uncertainty_weight)):
            raise TextNormError(f"uncertainty_weight must be a finite number >= 0, got {uncertainty_weight}")
        if uncertainty_weight and len(members) < 2:
            raise TextNormError(
                "uncertainty_weight penalises disagreement between ensemble members, and one member never "
                "disagrees with itself; name two or more rewards, e.g. textnorm(shapes-clip,clip-score)"
            )
        self.uncertainty_weight = float(uncertainty_weight)
        self.contrast = contrast_module.from_spec(contrast, **(contrast_options or {}))
        self.name = f"textnorm({','.join(m.name for m in members)})"
        self.differentiable = all(m.differentiable for m in members)
        self.contrasts = lru_cache(maxsize=cache_size)(self._contrast_set)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``images  # [B, 3, H, W] in [0, 1]``, B prompts -> calibrated rewards ``[B]`` (fp32)."""
        candidates = [(prompt, *self.contrasts(prompt)) for prompt in prompts]  # prompt first, then C(prompt)
        probabilities = self.member_probabilities(images, candidates)  # [M, B]
        reward = probabilities.mean(dim=0)
        if self.uncertainty_weight:
            reward = reward - self.uncertainty_weight * probabilities.var(dim=0, unbiased=False)
        return reward

    def member_probabilities(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[M, B]``: each member's softmax probability of ``candidates[b][0]`` among ``candidates[b]``."""
        width = max(len(row) for row in candidates)
        mask = torch.tensor([[k < len(row) for k in range(width)] for row in candidates])  # [B, K]
        probabilities = []
        for member, scale in zip(self.members, self.scales):
            scores = candidate_scores(member, images, candidates, mask)  # [B, K]
            # fp32 softmax: small score gaps times c decide the result. Padding gets probability 0.
            logits = (scale * scores.float()).masked_fill(~mask.to(scores.device), -math.inf)
            probabilities.append(torch.softmax(logits, dim=-1)[:, 0])
        return torch.stack(probabilities)

    def _contrast_set(self, prompt: str) -> tuple[str, ...]:
        contrasts = self.contrast(prompt)
        if not isinstance(contrasts, (list, tuple)) or not all(isinstance(c, str) for c in contrasts):
            raise TextNormError(
                f"contrast generator {_label(self.contrast)} returned {type(contrasts).__name__} for "
                f"{prompt!r}; it must return a list of strings"
            )
        kept = tuple(dict.fromkeys(c for c in contrasts if c.strip() and c.strip() != prompt.strip()))
        if not kept:
            raise TextNormError(
                f"no contrastive prompts for {prompt!r} from contrast generator {_label(self.contrast)}: "
                "TextNorm's probability over a prompt alone is 1 for every image. Use a generator that "
                "covers the prompt (contrast: shapes for ShapesWorld prompts, contrast: rules for free text "
                "with numbers, colours or spatial words, contrast: lm:PATH for any text), or add the prompt "
                "and its contrasts to the contrast file (contrast: file:PATH)."
            )
        return kept


def candidate_scores(
    member: Reward, images: torch.Tensor, candidates: Sequence[Sequence[str]], mask: torch.Tensor
) -> torch.Tensor:
    """``[B, K]`` scores of each image against its candidate prompts (``mask`` marks the real ones).

    Rows are padded with their first prompt to K, so a ``score_candidates`` reward sees a
    rectangle; the fallback calls the reward once on each image repeated for its real candidates.
    """
    width = mask.shape[1]
    score_candidates = getattr(member, "score_candidates", None)
    if callable(score_candidates):
        padded = [list(row) + [row[0]] * (width - len(row)) for row in candidates]
        return score_candidates(images, padded)
    index = torch.tensor([b for b, row in enumerate(candidates) for _ in row], device=images.device)
    flat = member(images[index], [prompt for row in candidates for prompt in row])
    scores = flat.new_zeros(mask.shape)
    scores[mask.to(flat.device)] = flat  # row-major, the order ``flat`` was built in
    return scores


def _scales(c: float | Sequence[float] | None, members: Sequence[Reward]) -> list[float]:
    if c is None:
        missing = [m.name for m in members if m.name not in DEFAULT_SCALES]
        if missing:
            raise TextNormError(
                f"TextNorm has no default scale c for {missing}: pass c (the softmax inverse temperature "
                "for that reward's scores; for a cosine similarity the model's logit scale, about 100 for "
                f"OpenAI CLIP). Defaults exist for {sorted(DEFAULT_SCALES)}."
            )
        return [DEFAULT_SCALES[m.name] for m in members]
    scales = [c] * len(members) if isinstance(c, (int, float)) else list(c)
    if len(scales) != len(members):
        raise TextNormError(
            f"c has {len(scales)} values for {len(members)} rewards {[m.name for m in members]}; give one "
            "number for all or one per reward, in order"
        )
    for value in scales:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise TextNormError(f"c must be positive finite numbers, got {c!r}")
    return [float(value) for value in scales]


def _label(generator: ContrastGenerator) -> str:
    return repr(getattr(generator, "name", generator))


def build_textnorm(members: Sequence[str], **options: Any) -> TextNorm:
    """``textnorm(a,b)`` from the registry. A member's own options are a mapping under its name,
    e.g. ``{c: [20, 100], contrast: shapes, clip-score: {checkpoint: tiny-random}}``; all other
    options are ``TextNorm``'s."""
    member_options = {name: options.pop(name) for name in members if name in options}
    for name, value in member_options.items():
        if not isinstance(value, dict):
            raise TextNormError(
                f"textnorm option {name!r} holds the options of member {name!r} and must be a mapping, "
                f"e.g. {{{name}: {{checkpoint: /path}}}}; got {value!r}"
            )
    rewards = [build(name, **member_options.get(name, {})) for name in members]
    return TextNorm(rewards, **options)


def build_textnorm_ur(members: Sequence[str], uncertainty_weight: float = 1.0, **options: Any) -> TextNorm:
    """``textnorm-ur(a,b,...)``: ``textnorm(a,b,...)`` with the variance penalty on by default
    (lambda = 1, the value most of the authors' released TIA2 prompts record); options as there."""
    reward = build_textnorm(members, uncertainty_weight=uncertainty_weight, **options)
    reward.name = f"textnorm-ur({','.join(members)})"
    return reward
