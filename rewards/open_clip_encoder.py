"""Frozen open_clip models as image and text embedders for the CLIP-based rewards.

CLIP score, HPSv2 and the LAION aesthetic predictor all start from an open_clip CLIP
(Radford et al. 2021; Cherti et al. 2023): this module builds one from local weights (a
file, or a pretrained tag's weights in the Hugging Face cache) or as a tiny seeded random
model of the same ``open_clip.model.CLIP`` class, and wraps it with its tokenizer and a
differentiable copy of its preprocessing.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
from diffalign.rewards.base import RewardError, TextEmbeddingCache, candidate_rows
from diffalign.rewards.checkpoints import MissingCheckpointError, cached_hub_file, existing_file, seeded
from diffalign.rewards.clip_preprocess import ClipImageTransform
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, set_model_preprocess_cfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from torch import nn

# Small enough to build in well under a second on a CPU, yet every part of the real
# architecture (patch embedding, attention, projections, the 49408-token CLIP vocabulary) is present.
TINY_EMBED_DIM = 32
TINY_VISION = CLIPVisionCfg(image_size=32, patch_size=8, width=32, head_width=16, layers=2)
TINY_TEXT = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)


class OpenClipEncoder(nn.Module):
    """An open_clip CLIP in eval mode with frozen weights, its tokenizer and its preprocessing.

    Gradients flow from the embeddings to the input pixels, never into the weights: a reward
    is a fixed judge.
    """

    def __init__(self, model: CLIP, tokenizer: Callable[[list[str]], torch.Tensor]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = image_transform(open_clip.get_model_preprocess_cfg(model))

    @property
    def embed_dim(self) -> int:
        return self.model.visual.output_dim

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images  # [B, 3, H, W] in [0, 1]`` -> unit-norm embeddings ``[B, D]`` (differentiable)."""
        weight = next(self.model.parameters())
        pixels = self.transform(images.to(device=weight.device, dtype=weight.dtype))
        return self.model.encode_image(pixels, normalize=True)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm prompt embeddings ``[B, D]``; no graph is kept, as prompts never depend on pixels."""
        tokens = self.tokenizer(list(prompts)).to(next(self.model.parameters()).device)
        return self.model.encode_text(tokens, normalize=True)


def image_transform(preprocess_cfg: dict) -> ClipImageTransform:
    """The torch twin of the PIL transform open_clip builds from a model's preprocess config."""
    size = preprocess_cfg["size"]
    return ClipImageTransform(
        size=(size, size) if isinstance(size, int) else tuple(size),
        mean=tuple(preprocess_cfg["mean"]),
        std=tuple(preprocess_cfg["std"]),
        interpolation=preprocess_cfg["interpolation"],
        resize_mode=preprocess_cfg["resize_mode"],
        fill=preprocess_cfg["fill_color"] / 255.0,
    )


def pretrained_cfg(arch: str, pretrained: str, *, reward: str) -> dict:
    """open_clip's record of the weights named ``pretrained`` for ``arch``; unknown names suggest close ones."""
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise RewardError(f"reward {reward!r}: open_clip has no architecture {arch!r}; closest: {close}")
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        close = difflib.get_close_matches(pretrained, tags, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardError(
            f"reward {reward!r}: open_clip has no pretrained weights {pretrained!r} for {arch}.{hint} "
            f"Known: {tags}"
        )
    return cfg


def pretrained_weights(
    arch: str, pretrained: str, checkpoint: str | None, *, reward: str, option: str = "checkpoint"
) -> Path:
    """The weights file of open_clip's ``arch``/``pretrained``: ``checkpoint`` if given, else from the HF cache."""
    cfg = pretrained_cfg(arch, pretrained, reward=reward)
    # open_clip writes hub weights as "org/repo/" (its default file name) or "org/repo/file".
    hub = cfg.get("hf_hub", "")
    repo_id, filename = os.path.split(hub)
    filenames = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    download = f"hf download {repo_id} {filenames[-1]}" if hub else f"curl -L -O {cfg['url']}"
    if checkpoint is not None:
        return existing_file(checkpoint, reward=reward, download=download, option=option)
    if hub:
        return cached_hub_file(repo_id, filenames, reward=reward, option=option)
    raise MissingCheckpointError(
        reward=reward,
        missing=f"the open_clip weights {arch}/{pretrained}",
        looked_in="the Hugging Face cache",
        download=download,
        option=option,
        example=f"/path/to/{os.path.basename(cfg['url'])}",
    )


def load_open_clip(
    arch: str, pretrained: str, weights: Path, *, preprocess: dict | None = None
) -> OpenClipEncoder:
    """open_clip ``arch`` on the CPU with the weights in the file ``weights``.

    ``pretrained`` names the tag those weights were trained as (or fine-tuned from): it fixes
    what the file does not say, the activation (OpenAI's QuickGELU) and the preprocessing
    statistics. ``preprocess`` overrides preprocessing fields, e.g. HPSv2's ``resize_mode``.
    """
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    tag_preprocess = {key: cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in cfg}
    model = open_clip.create_model(
        arch,
        pretrained=str(weights),
        force_quick_gelu=cfg.get("quick_gelu", False),
        force_preprocess_cfg={**tag_preprocess, **(preprocess or {})},
    )
    return OpenClipEncoder(model, open_clip.get_tokenizer(arch))


def tiny_open_clip(*, preprocess: dict | None = None) -> OpenClipEncoder:
    """A seeded, randomly initialised tiny ``open_clip.model.CLIP`` with the real CLIP tokenizer."""
    with seeded():
        model = CLIP(TINY_EMBED_DIM, TINY_VISION, TINY_TEXT)
    cfg = merge_preprocess_dict(PreprocessCfg(size=TINY_VISION.image_size), preprocess or {})
    set_model_preprocess_cfg(model, cfg)
    return OpenClipEncoder(model, SimpleTokenizer(context_length=TINY_TEXT.context_length))


class OpenClipCosine(nn.Module):
    """The cosine of an open_clip model's unit-norm image and prompt embeddings, in [-1, 1].

    What CLIP score and HPSv2 share; they differ only in the model they load (``encoder``).
    ``score_candidates`` encodes each image once and each distinct prompt once per run (a
    bounded cache), for TextNorm's contrastive prompts.
    """

    differentiable = True

    def __init__(self, encoder: OpenClipEncoder, device: str = "cpu"):
        super().__init__()
        self.encoder = encoder
        self.text_cache = TextEmbeddingCache(self.encoder.embed_texts)
        self.eval().to(device)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.encoder.embed_images(images) * self.encoder.embed_texts(prompts)).sum(dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm prompt embeddings ``[B, D]`` (``TextEmbeddingReward``: FiFA's diversity term)."""
        return self.encoder.embed_texts(list(prompts))

    def score_candidates(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[B, K]`` cosines of each image with each of its K candidate prompts."""
        flat = candidate_rows(candidates, images.shape[0], self.name)
        image_embeds = self.encoder.embed_images(images)  # [B, D]
        text_embeds = self.text_cache(flat, image_embeds.device)  # [B * K, D]
        text_embeds = text_embeds.view(len(candidates), -1, image_embeds.shape[-1])  # [B, K, D]
        return torch.einsum("bd,bkd->bk", image_embeds, text_embeds)
