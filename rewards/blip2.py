"""BLIP-2 image-text matching (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image
Pre-training with Frozen Image Encoders and Large Language Models", ICML 2023).

BLIP-2's Q-Former reads a prompt together with 32 learned queries that cross-attend to a
frozen image encoder (EVA ViT-g/14 at 224 px); its image-text matching (ITM) head classifies
the pair as matched or not, and the pair's two logits are the mean of the head's output over
the queries. The reward is the log-odds of "matched", ``logit[1] - logit[0]``:
``sigmoid(score)`` is the matching probability LAVIS reports as the ITM score, and per prompt
both rank images identically (so TIA2's metrics are the same for either); the log-odds do not
saturate near 0 and 1, and a softmax over them is the normalised odds, which is why TextNorm's
default scale for this reward is 1. Prompts are truncated to 32 tokens, LAVIS's
``max_txt_len``.

It loads with transformers' ``Blip2ForImageTextRetrieval`` from a local folder or the Hugging
Face cache (``Salesforce/blip2-itm-vit-g``; ``-coco`` is the COCO-finetuned twin), with the
tokenizer and ``BlipImageProcessor`` saved beside it. The image processor's resize (to a
square, bicubic) and normalisation are done in torch, so gradients reach the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffalign.rewards.base import RewardError, candidate_rows
from diffalign.rewards.checkpoints import TINY_RANDOM, seeded
from diffalign.rewards.clip_preprocess import ClipImageTransform
from diffalign.rewards.cross_encoder import MissingWeightsError, pair_scores, tiny_bert_tokenizer
from torch import nn
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
)

MODEL_ID = "Salesforce/blip2-itm-vit-g"
MAX_TOKENS = 32  # LAVIS's Blip2Qformer max_txt_len
TINY_IMAGE_SIZE = 32


class Blip2ITM(nn.Module):
    """How well each image matches its prompt, as BLIP-2's ITM head judges it (log-odds).

    Options: ``checkpoint``, a local folder or cached hub id of a ``Blip2ForImageTextRetrieval``
    model with its tokenizer and image processor (default ``"Salesforce/blip2-itm-vit-g"``), or
    ``"tiny-random"``; ``device`` (default ``"cpu"``).
    """

    name = "blip2"
    differentiable = True

    def __init__(self, checkpoint: str = MODEL_ID, device: str = "cpu"):
        super().__init__()
        if checkpoint == TINY_RANDOM:
            self.tokenizer = tiny_bert_tokenizer()
            with seeded():
                self.model = Blip2ForImageTextRetrieval(tiny_config(self.tokenizer.vocab_size))
            image_processor = BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        else:
            # The small files first, so a folder without them fails before gigabytes of weights load.
            image_processor = _local(BlipImageProcessor, checkpoint)
            self.tokenizer = _local(AutoTokenizer, checkpoint)
            self.model = _local(Blip2ForImageTextRetrieval, checkpoint)
        if self.model.config.image_token_index is not None:
            # Such checkpoints expect the processor to put query placeholders into the text; ``itm_logits``
            # prepends the queries itself, so their ids must not be in the text.
            self.model.config.image_token_index = None
        self.transform = ClipImageTransform(
            size=(image_processor.size["height"], image_processor.size["width"]),
            mean=tuple(image_processor.image_mean),
            std=tuple(image_processor.image_std),
            resize_mode="squash",  # BlipImageProcessor resizes straight to the square, no crop
        )
        self.model.requires_grad_(False)
        self.eval().to(device)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``images  # [B, 3, H, W] in [0, 1]`` and B prompts -> ITM log-odds ``[B]``."""
        return pair_scores(self.score_embeds, self.embed_images(images), range(len(prompts)), prompts)

    def score_candidates(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[B, K]`` log-odds of each image with each of its K candidate prompts; each image goes
        through the (large) image encoder once, each pair through the Q-Former."""
        flat = candidate_rows(candidates, images.shape[0], self.name)
        width = len(flat) // images.shape[0]
        index = [b for b in range(images.shape[0]) for _ in range(width)]
        return pair_scores(self.score_embeds, self.embed_images(images), index, flat).view(-1, width)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder's patch embeddings ``[B, 1 + patches, D]``, differentiable."""
        weight = self.model.vision_model.embeddings.patch_embedding.weight
        pixels = self.transform(images.to(device=weight.device, dtype=weight.dtype))
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def score_embeds(self, image_embeds: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Log-odds ``[P]`` of P prompts, each read against its own ``image_embeds  # [P, N, D]``."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(image_embeds.device)
        logits = itm_logits(self.model, image_embeds, tokens.input_ids, tokens.attention_mask).float()
        return logits[:, 1] - logits[:, 0]


def itm_logits(
    model: Blip2ForImageTextRetrieval,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """``[P, 2]`` ITM logits (not matched, matched) from image embeddings computed beforehand.

    # Mirrors Blip2ForImageTextRetrieval.forward(use_image_text_matching_head=True) after its
    # image encoder, for a config without image_token_index; a test holds the two equal.
    """
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)  # [P, Q, H]
    query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.qformer(
        query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
        query_length=queries.shape[1],
        attention_mask=torch.cat([query_mask, attention_mask], dim=1),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state
    hidden = hidden[:, : queries.shape[1]].to(model.itm_head.weight.dtype)
    return model.itm_head(hidden).mean(dim=1)


def _local(cls, checkpoint: str):
    """``cls.from_pretrained(checkpoint)`` from local files only; a one-line error naming what is missing."""
    try:
        return cls.from_pretrained(checkpoint, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MissingWeightsError(
            reward="blip2",
            missing=f"the {cls.__name__} of {checkpoint!r}",
            looked_in="that folder or the Hugging Face cache",
            provide=f"run `hf download {MODEL_ID} --local-dir DIR` where there is internet and pass checkpoint=DIR",
        ) from error


def tiny_config(vocab_size: int) -> Blip2Config:
    """A tiny BLIP-2 of the real model's structure: ViT 32 wide, a 2-layer Q-Former with 4 queries."""
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            encoder_hidden_size=32,
            use_qformer_text_input=True,  # the text half of each layer, which ITM reads the prompt with
        ).to_dict(),
        num_query_tokens=4,
        image_text_hidden_size=16,
    )
    if config.qformer_config.encoder_hidden_size != config.vision_config.hidden_size:
        raise RewardError("tiny BLIP-2: the Q-Former must cross-attend at the vision width")
    return config
