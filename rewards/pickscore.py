"""PickScore (Kirstain et al. 2023): human preference learned from the Pick-a-Pic dataset.

PickScore is CLIP ViT-H/14 (LAION-2B) fine-tuned on Pick-a-Pic, the choices real users of a
text-to-image web app made between two generations for their own prompt. As in the
reference code, the score is CLIP's logit: ``logit_scale.exp()`` (about 100) times the
cosine similarity of the image and prompt embeddings, so scores are about 18-24 and a
difference of 1 is already a clear preference. The model loads with
``transformers.CLIPModel`` from "yuvalkirstain/PickScore_v1"; its tokenizer and image
statistics come from the processor of the base model, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from diffalign.rewards.base import RewardError, TextEmbeddingCache, candidate_rows
from diffalign.rewards.checkpoints import TINY_RANDOM, MissingCheckpointError, seeded
from diffalign.rewards.clip_preprocess import ClipImageTransform
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import PILImageResampling

from diffalign.tokenizer import clip_tokenizer

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TINY_IMAGE_SIZE = 32
Loadable = TypeVar("Loadable", CLIPModel, CLIPProcessor)
INTERPOLATIONS = {PILImageResampling.BILINEAR: "bilinear", PILImageResampling.BICUBIC: "bicubic"}


class PickScore(nn.Module):
    """Human preference for each image given its prompt, as PickScore predicts it.

    Options: ``checkpoint``, a local folder or cached hub id of the CLIP model (default
    ``"yuvalkirstain/PickScore_v1"``), or ``"tiny-random"`` for a tiny random
    ``transformers.CLIPModel``; ``processor``, a local folder or cached hub id of the
    processor (default ``"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"``); ``device`` (default ``"cpu"``).
    """

    name = "pickscore"
    differentiable = True

    def __init__(self, checkpoint: str = MODEL_ID, processor: str = PROCESSOR_ID, device: str = "cpu"):
        super().__init__()
        if checkpoint == TINY_RANDOM:
            model, image_processor, tokenizer = tiny_clip()
        else:
            # The processor first: it is small, so a missing one fails before the 4 GB model loads.
            loaded_processor = from_local(
                CLIPProcessor,
                processor,
                option="processor",
                download=f"hf download {PROCESSOR_ID} --include '*.json' --include '*.txt'",
                example="/path/to/CLIP-ViT-H-14-laion2B-s32B-b79K",
            )
            model = from_local(
                CLIPModel,
                checkpoint,
                option="checkpoint",
                download=f"hf download {MODEL_ID}",
                example="/path/to/PickScore_v1",
            )
            image_processor, tokenizer = loaded_processor.image_processor, loaded_processor.tokenizer
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = image_transform(image_processor)
        self.text_cache = TextEmbeddingCache(self.embed_texts)
        self.eval().to(device)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cosine = (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1)
        return self.model.logit_scale.exp() * cosine

    def score_candidates(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[B, K]`` scores of each image with each of its K candidate prompts: each image is
        encoded once, each distinct prompt once per run (a bounded cache)."""
        flat = candidate_rows(candidates, images.shape[0], self.name)
        image_embeds = self.embed_images(images)  # [B, D]
        text_embeds = self.text_cache(flat, image_embeds.device)  # [B * K, D]
        text_embeds = text_embeds.view(len(candidates), -1, image_embeds.shape[-1])  # [B, K, D]
        return self.model.logit_scale.exp() * torch.einsum("bd,bkd->bk", image_embeds, text_embeds)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, D]``; differentiable with respect to ``images``."""
        logit_scale = self.model.logit_scale
        pixels = self.transform(images.to(device=logit_scale.device, dtype=logit_scale.dtype))
        # Towers and projections called directly: explicit, and the same in transformers 4 and 5.
        image_embeds = self.model.visual_projection(
            self.model.vision_model(pixel_values=pixels).pooler_output
        )
        return F.normalize(image_embeds, dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm prompt embeddings ``[B, D]``; no graph is kept, as prompts never depend on pixels."""
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.model.logit_scale.device)
        pooled = self.model.text_model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)


def image_transform(image_processor: CLIPImageProcessor) -> ClipImageTransform:
    """The torch twin of a ``CLIPImageProcessor``: resize the short side, center crop, normalise."""
    resample = PILImageResampling(image_processor.resample)
    if resample not in INTERPOLATIONS:
        raise RewardError(
            f"reward 'pickscore': the processor resamples with {resample.name}; "
            f"only {[mode.name for mode in INTERPOLATIONS]} have a differentiable twin"
        )
    return ClipImageTransform(
        size=(image_processor.crop_size["height"], image_processor.crop_size["width"]),
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        interpolation=INTERPOLATIONS[resample],
        short_side=image_processor.size["shortest_edge"],
    )


def from_local(cls: type[Loadable], spec: str, *, option: str, download: str, example: str) -> Loadable:
    """``cls.from_pretrained(spec)`` from a local folder or the Hugging Face cache, never the network."""
    try:
        return cls.from_pretrained(spec, local_files_only=True)
    except OSError as error:
        raise MissingCheckpointError(
            reward="pickscore",
            missing=f"the {cls.__name__} {spec!r}",
            looked_in="the Hugging Face cache or a local folder",
            download=download,
            option=option,
            example=example,
            hub_cache=True,
        ) from error


def tiny_clip() -> tuple[CLIPModel, CLIPImageProcessor, PreTrainedTokenizerBase]:
    """A seeded tiny random ``CLIPModel`` with a matching image processor and the real CLIP tokenizer."""
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=CLIPVisionConfig(
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=32,
    )
    with seeded():
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return model, image_processor, tokenizer
