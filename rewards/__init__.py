"""Reward models for diffalign (installed as ``diffalign.rewards``).

``build(name, **options)`` makes a reward by its registry name; ``available()`` lists them.
The built-in rewards and the ``textnorm(...)`` wrapper (``TextNorm``, Kim et al. 2024) are
registered below, so ``build("textnorm(shapes-clip)", c=20)`` works too; a world registers its
own rewards when it is imported (ShapesWorld's ``shapes-*``: ``diffalign/shapes/__init__.py``).

Entries name their class as ``"module:attribute"``: listing and checking rewards imports no model
code (and no torch), and a reward's module is imported when the reward is first built.
"""

from __future__ import annotations

import importlib

from diffalign.rewards.base import (
    CandidateReward,
    Reward,
    RewardError,
    RewardInfo,
    TextEmbeddingReward,
    available,
    build,
    checked_call,
    info,
    register,
    register_wrapper,
)

from diffalign.registry import lazy

register(
    "aesthetic",
    description="LAION aesthetic predictor v2 (MLP on CLIP ViT-L/14 embeddings), prompt-independent",
    differentiable=True,
    needs_checkpoint=True,
)(lazy("diffalign.rewards.aesthetic:AestheticReward"))
register(
    "clip-score",
    description="cosine similarity of open_clip image and prompt embeddings (default ViT-L-14, OpenAI weights)",
    differentiable=True,
    needs_checkpoint=True,
)(lazy("diffalign.rewards.clip_score:ClipScore"))
register(
    "hpsv2",
    description="Human Preference Score v2: cosine of HPS-fine-tuned open_clip ViT-H/14 embeddings",
    differentiable=True,
    needs_checkpoint=True,
)(lazy("diffalign.rewards.hpsv2:HPSv2"))
register(
    "jpeg-compressibility",
    description="minus the JPEG size (kB, quality 95) of each image: favours simple images (DDPO)",
    differentiable=False,
)(lazy("diffalign.rewards.compression:jpeg_compressibility"))
register(
    "jpeg-incompressibility",
    description="the JPEG size (kB, quality 95) of each image: favours detailed images (DDPO)",
    differentiable=False,
)(lazy("diffalign.rewards.compression:jpeg_incompressibility"))
register(
    "pickscore",
    description="PickScore: CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences (logit scale x cosine)",
    differentiable=True,
    needs_checkpoint=True,
)(lazy("diffalign.rewards.pickscore:PickScore"))
register(
    "imagereward",
    description="ImageReward (Xu et al. 2023): BLIP reward model of human preference, normalised score",
    differentiable=True,
    needs_checkpoint=True,
)(lazy("diffalign.rewards.imagereward:ImageReward"))
register(
    "blip2",
    description="BLIP-2 image-text matching (Li et al. 2023): log-odds that the prompt matches the image",
    differentiable=True,
    needs_checkpoint=True,
)(lazy("diffalign.rewards.blip2:Blip2ITM"))
register_wrapper(
    "textnorm",
    description="TextNorm (Kim et al. 2024): probability of the prompt among contrastive prompts; "
    "differentiable iff its members are",
)(lazy("diffalign.rewards.textnorm:build_textnorm"))
register_wrapper(
    "textnorm-ur",
    description="TextNorm's uncertainty-regularised ensemble (Kim et al. 2024): the members' mean "
    "probability minus uncertainty_weight (default 1) times their variance",
)(lazy("diffalign.rewards.textnorm:build_textnorm_ur"))

# Names of the reward modules, imported on first access (PEP 562) so that importing the package stays light.
_LAZY = {
    "TINY_RANDOM": "checkpoints",
    "MissingCheckpointError": "checkpoints",
    "ContrastError": "contrast",
    "TextNorm": "textnorm",
    "TextNormError": "textnorm",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"diffalign.rewards.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'diffalign.rewards' has no attribute {name!r}")


__all__ = [
    "TINY_RANDOM",
    "CandidateReward",
    "ContrastError",
    "MissingCheckpointError",
    "Reward",
    "RewardError",
    "RewardInfo",
    "TextEmbeddingReward",
    "TextNorm",
    "TextNormError",
    "available",
    "build",
    "checked_call",
    "info",
    "register",
    "register_wrapper",
]
