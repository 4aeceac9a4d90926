"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", NeurIPS 2023): a BLIP reward model trained on 137k expert rankings.

The model is BLIP (Li et al. 2022): a ViT-L/16 image encoder at 224 px, and a BERT-base text
encoder that cross-attends to the image's patch embeddings. The prompt is read with BERT's
tokenizer (up to 35 tokens, starting with ``[CLS]``); the text encoder's output at ``[CLS]``
goes through a five-layer linear head (no activation between layers, as released) to a raw
reward r; the score is ImageReward's normalised ``(r - 0.16717) / 1.03334``, the statistics
its authors measured. Images are resized (short side 224, bicubic), center-cropped and
normalised with CLIP's statistics, in torch, so gradients reach the pixels (ReFL, AlignProp).

**How it loads, and why not through the ``image-reward`` package.** The authors' package
(``image-reward`` 1.5, 2023) pins ``timm==0.6.13`` and ``fairscale==0.4.13`` and vendors a BLIP
text encoder written against transformers 4.2x internals; installing it would downgrade timm
under open_clip, and its vendored code does not import under the transformers diffalign uses
(it takes ``apply_chunking_to_forward`` from ``transformers.modeling_utils``, which no longer has
it; the package also imports OpenAI's ``clip`` module without declaring it).
BLIP itself is in transformers (``BlipVisionModel``, ``BlipTextModel``, ported from the same
BLIP code ImageReward vendors), so this module reads the released ``ImageReward.pt`` and
``med_config.json`` and loads them into those classes: the text encoder's parameter names are
BLIP's own; the image encoder's timm-style names are renamed (``_VISION_NAMES``), and every
tensor must find its place (nothing is silently left at random). Deviation: BERT's tokenizer is
used without the ``[DEC]``/``[ENC]`` tokens BLIP adds, which ImageReward's scoring never uses.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence

import torch
from diffalign.rewards.base import RewardError, candidate_rows
from diffalign.rewards.checkpoints import TINY_RANDOM, seeded
from diffalign.rewards.clip_preprocess import ClipImageTransform
from diffalign.rewards.cross_encoder import local_files, pair_scores, tiny_bert_tokenizer
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

MODEL_REPO = "THUDM/ImageReward"
WEIGHTS, TEXT_CONFIG = "ImageReward.pt", "med_config.json"
TOKENIZER_REPO = "google-bert/bert-base-uncased"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's score normalisation
MAX_TOKENS = 35  # ImageReward's tokenizer call
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # BLIP's ViTs (base 768/12, large 1024/16) use 64-wide attention heads
VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
UNUSED = (
    "blip.vision_proj.",
    "blip.text_proj.",
)  # BLIP's contrastive projections; ImageReward's score skips them
# BLIP's ViT (timm's layout) -> transformers' BlipVisionModel
_VISION_NAMES = (
    (r"cls_token", r"embeddings.class_embedding"),
    (r"pos_embed", r"embeddings.position_embedding"),
    (r"patch_embed\.proj\.(.+)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(.+)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(.+)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(.+)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.norm2\.(.+)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(.+)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(.+)", r"post_layernorm.\1"),
)


class ImageReward(nn.Module):
    """Human preference for each image given its prompt, as ImageReward predicts it (about -2..2).

    Options: ``checkpoint``, a folder holding ``ImageReward.pt`` and ``med_config.json`` (as
    ``hf download THUDM/ImageReward`` gives them) or that hub id in the local cache (the
    default), or ``"tiny-random"``; ``tokenizer``, a folder or cached hub id with BERT's
    ``vocab.txt`` (default: the checkpoint folder if it holds one, else
    ``google-bert/bert-base-uncased``); ``device`` (default ``"cpu"``).
    """

    name = "imagereward"
    differentiable = True

    def __init__(self, checkpoint: str = MODEL_REPO, tokenizer: str | None = None, device: str = "cpu"):
        super().__init__()
        if checkpoint == TINY_RANDOM:
            self.tokenizer = tiny_bert_tokenizer()
            vision_config, text_config, head_sizes = tiny_configs(self.tokenizer.vocab_size)
            with seeded():
                self._build(vision_config, text_config, head_sizes)
        else:
            weights, text_file = local_files(
                checkpoint,
                [WEIGHTS, TEXT_CONFIG],
                reward=self.name,
                download=f"hf download {MODEL_REPO} {WEIGHTS} {TEXT_CONFIG}",
                option="checkpoint",
            )
            if tokenizer is None:
                tokenizer = (
                    str(weights.parent) if (weights.parent / "vocab.txt").is_file() else TOKENIZER_REPO
                )
            (vocab,) = local_files(
                tokenizer,
                ["vocab.txt"],
                reward=self.name,
                download=f"hf download {TOKENIZER_REPO} vocab.txt",
                option="tokenizer",
            )
            self.tokenizer = BertTokenizer(str(vocab), do_lower_case=True)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            vision_config = vision_config_from(state)
            text_config = text_config_from(
                json.loads(text_file.read_text("utf-8")), vision_config.hidden_size
            )
            self._build(vision_config, text_config, head_sizes_from(state))
            self.load_released(state)
        size = self.vision_model.config.image_size
        self.transform = ClipImageTransform(size=(size, size), mean=CLIP_MEAN, std=CLIP_STD)
        self.requires_grad_(False)
        self.eval().to(device)

    def _build(
        self, vision_config: BlipVisionConfig, text_config: BlipTextConfig, head_sizes: list[int]
    ) -> None:
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = released_head(head_sizes)

    def load_released(self, state: dict[str, torch.Tensor]) -> None:
        """Load ImageReward's state dict (its own names) into the transformers modules; every
        parameter must be filled and every tensor used, except BLIP's unused projections."""
        parts: dict[str, dict[str, torch.Tensor]] = {VISION: {}, TEXT: {}, HEAD: {}}
        stray = []
        for key, tensor in state.items():
            prefix = next((p for p in parts if key.startswith(p)), None)
            if prefix is not None:
                parts[prefix][key.removeprefix(prefix)] = tensor
            elif not key.startswith(UNUSED):
                stray.append(key)
        vision = {_vision_name(key): tensor for key, tensor in parts[VISION].items()}
        text = {key: tensor for key, tensor in parts[TEXT].items() if not key.endswith("position_ids")}
        for module, tensors, prefix in ((self.vision_model, vision, VISION), (self.text_encoder, text, TEXT)):
            result = module.load_state_dict(tensors, strict=False)
            stray += [prefix + key for key in result.unexpected_keys]
            if result.missing_keys:
                raise RewardError(
                    f"reward 'imagereward': the checkpoint has no {prefix}... tensors for "
                    f"{result.missing_keys[:5]}; is it ImageReward.pt?"
                )
        self.head.load_state_dict(parts[HEAD])
        if stray:
            raise RewardError(
                f"reward 'imagereward': the checkpoint holds tensors ImageReward does not have: {stray[:5]}"
            )

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``images  # [B, 3, H, W] in [0, 1]`` and B prompts -> normalised rewards ``[B]``."""
        embeds = self.embed_images(images)
        return pair_scores(self.score_embeds, embeds, range(len(prompts)), prompts)

    def score_candidates(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[B, K]`` rewards of each image with each of its K candidate prompts; each image is
        encoded once (the text encoder still reads every pair)."""
        flat = candidate_rows(candidates, images.shape[0], self.name)
        width = len(flat) // images.shape[0]
        index = [b for b in range(images.shape[0]) for _ in range(width)]
        return pair_scores(self.score_embeds, self.embed_images(images), index, flat).view(-1, width)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``[B, 1 + patches, D]`` (after the ViT's final norm), differentiable."""
        weight = self.vision_model.embeddings.patch_embedding.weight
        pixels = self.transform(images.to(device=weight.device, dtype=weight.dtype))
        return self.vision_model(pixel_values=pixels).last_hidden_state

    def score_embeds(self, image_embeds: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards ``[P]`` of P prompts, each read against its own ``image_embeds  # [P, N, D]``."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(image_embeds.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text_encoder(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state[:, 0]  # [P, hidden] at [CLS]
        raw = self.head(hidden.float()).squeeze(-1)  # fp32: the normalisation divides small gaps
        return (raw - REWARD_MEAN) / REWARD_STD


def _vision_name(key: str) -> str:
    for pattern, replacement in _VISION_NAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return key  # reported as unexpected by load_state_dict


def vision_config_from(state: dict[str, torch.Tensor]) -> BlipVisionConfig:
    """BLIP's ViT configuration read off the checkpoint's tensor shapes (ViT-L/16 at 224 px for
    ImageReward); heads are ``HEAD_WIDTH`` wide, as in every BLIP ViT."""
    width = state[f"{VISION}cls_token"].shape[-1]
    patch = state[f"{VISION}patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[f"{VISION}pos_embed"].shape[1] - 1)
    depth = len({key.split(".")[3] for key in state if key.startswith(f"{VISION}blocks.")})
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state[f"{VISION}blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(width // HEAD_WIDTH, 1),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP's ViT; transformers' default is 1e-5
    )


def text_config_from(med: dict, vision_width: int) -> BlipTextConfig:
    """``BlipTextConfig`` from BLIP's ``med_config.json`` (a BERT config), cross-attending to the ViT."""
    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=vision_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0),
    )


def head_sizes_from(state: dict[str, torch.Tensor]) -> list[int]:
    """Widths of the reward head's linear layers, input first: ``[768, 1024, 128, 64, 16, 1]``."""
    weights = sorted(
        (int(k.split(".")[2]), t) for k, t in state.items() if k.startswith(HEAD) and k.endswith("weight")
    )
    return [weights[0][1].shape[1], *(tensor.shape[0] for _, tensor in weights)]


def released_head(sizes: Sequence[int]) -> nn.Sequential:
    """ImageReward's reward head: linear layers with dropout between the first four and no
    activation anywhere (the released model's ReLUs are commented out). Indices match the
    checkpoint's ``mlp.layers.<i>`` (0, 2, 4, 6, 7)."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(sizes) - 3:
            layers.append(nn.Dropout(0.0))  # a placeholder keeping the released indices; inactive in eval
    return nn.Sequential(*layers)


def tiny_configs(vocab_size: int) -> tuple[BlipVisionConfig, BlipTextConfig, list[int]]:
    """A tiny BLIP of ImageReward's shape: ViT 64 wide, 2 layers, 32 px; text encoder 32 wide."""
    vision = BlipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    text = BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        encoder_hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,  # the tiny tokenizer's [CLS] and [SEP]; transformers' defaults are BERT's ids
        eos_token_id=3,
        sep_token_id=3,
    )
    return vision, text, [32, 16, 8, 8, 4, 1]
