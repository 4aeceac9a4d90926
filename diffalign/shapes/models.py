"""Architectures of the small models trained on ShapesWorld, as plain configs of real classes.

A ``transformers.CLIPModel`` (whose text tower is also the diffusion model's text encoder), a
``diffusers.AutoencoderKL`` (32×32 RGB ↔ 4×8×8 latents) and a ``UNet2DConditionModel``: the
same classes as Stable Diffusion 1.x, sized so that a CPU samples 8 images in 20 DDIM steps
in a few seconds and the shipped weights stay small.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

IMAGE_SIZE = 32
LATENT_SIZE = 8
# Captions of the grammar take at most 12 tokens; 16 leaves room and keeps attention cheap.
TOKEN_LENGTH = 16
TEXT_WIDTH = 64
# The CLIP's input normalisation (OpenAI CLIP's constants, so it reads images like any CLIP does):
# what training fed it and what the reward feeds it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_config() -> CLIPConfig:
    """A 3-layer text tower and a 3-layer ViT with 4×4 patches (64 tokens per image)."""
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TOKEN_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=64,
    )
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=64,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def new_clip() -> CLIPModel:
    return CLIPModel(clip_config())


def new_vae() -> AutoencoderKL:
    """Three resolution levels: 32 → 16 → 8, four latent channels (as in SD's ×8 VAE, scaled down)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def new_unet() -> UNet2DConditionModel:
    """Cross-attention at 8×8 and 4×4 and in the middle: where colour, shape and place are bound."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=32,
    )
