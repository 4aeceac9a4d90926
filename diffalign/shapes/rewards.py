"""ShapesWorld rewards: learned proxies (``shapes-clip``, ``shapes-negclip``) and the exact oracle
(``shapes-oracle``), registered by name in ``diffalign/shapes/__init__.py``.

The pair is what makes ShapesWorld useful: fine-tuning optimises the proxy, and the oracle —
the world's exact detector — measures true alignment beside it, so reward over-optimisation
shows up as the two curves parting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.rewards.base import RewardError, candidate_rows
from diffalign.shapes import assets
from diffalign.shapes.models import CLIP_MEAN, CLIP_STD


class ShapesClip(nn.Module):
    """Cosine similarity between the ShapesWorld CLIP's image and text embeddings, in [-1, 1].

    Option ``checkpoint``: a CLIPModel folder (default: the shipped one). Text embeddings
    are cached per prompt: training asks about the same prompts over and over.
    """

    name = "shapes-clip"
    differentiable = True
    shipped = "CLIP_DIR"  # the assets folder read when no checkpoint is given

    def __init__(self, checkpoint: str | None = None, device: str = "cpu"):
        super().__init__()
        folder = getattr(assets, self.shipped) if checkpoint is None else Path(checkpoint)
        model, self.tokenizer = assets.load_clip(folder)
        self.model = model.requires_grad_(False)
        self.image_size = model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.to(device)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, D]``, computed once per distinct prompt."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", truncation=True, return_tensors="pt"
            ).input_ids
            output = self.model.text_model(input_ids=ids.to(self.mean.device))
            embeds = F.normalize(self.model.text_projection(output.pooler_output), dim=-1)
            self._text_cache.update(zip(missing, embeds))
        return torch.stack([self._text_cache[p] for p in prompts])

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``text_embeddings`` under the name ``TextEmbeddingReward`` asks for (FiFA's diversity term)."""
        return self.text_embeddings(prompts)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, D]``; differentiable with respect to ``images``."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        pixels = (images.to(self.mean.dtype) - self.mean) / self.std
        output = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(output.pooler_output), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.image_embeddings(images) * self.text_embeddings(prompts).to(images.device)).sum(dim=-1)

    def score_candidates(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[B, K]`` cosines of each image with each of its K candidate prompts; each image is
        encoded once (TextNorm scores every image against its prompt and the contrasts)."""
        flat = candidate_rows(candidates, images.shape[0], self.name)
        image_embeds = self.image_embeddings(images)  # [B, D]
        text_embeds = self.text_embeddings(flat).to(images.device)  # [B * K, D]
        text_embeds = text_embeds.view(len(candidates), -1, image_embeds.shape[-1])  # [B, K, D]
        return torch.einsum("bd,bkd->bk", image_embeds, text_embeds)


class ShapesNegClip(ShapesClip):
    """``shapes-clip`` fine-tuned with hard negatives (Yuksekgonul et al. 2023, NegCLIP; see
    ``diffalign.shapes.negclip``): the same cosine, from a model that tells "A left of B" from
    "A right of B" (pairwise accuracy 0.50 for ``shapes-clip``). Still a learned proxy: the
    oracle stays the ground truth it is measured against."""

    name = "shapes-negclip"
    shipped = "NEGCLIP_DIR"


class ShapesOracle(nn.Module):
    """The fraction of a prompt's facts (objects, colours, counts, relations) that hold in the image.

    Only prompts of the ShapesWorld grammar can be scored; any other prompt is an error that
    says which and shows valid examples (``shapes-clip`` scores any text).
    """

    name = "shapes-oracle"
    differentiable = False

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from diffalign.shapes import PromptOutsideGrammar, score_batch

        try:
            return score_batch(images.detach().float().cpu(), list(prompts)).to(images.device)
        except PromptOutsideGrammar as error:
            raise RewardError(
                f"shapes-oracle can only score prompts of the ShapesWorld grammar: {error} "
                "(the learned proxy `shapes-clip` accepts any prompt)"
            ) from error
