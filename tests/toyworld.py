"""A toy world, registered from outside the diffalign package the way a user's own world would be.

Importing this module makes known to diffalign's generic registries: a pipeline ``toy-pipe`` (its
own loader: a tiny Stable Diffusion pipeline with random weights and the real CLIP tokenizer), a
prompt set ``toy-colours`` written for that pipeline only, and a differentiable reward
``toy-redness`` (how much more red than green or blue an image is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffalign import pipeline, prompts, rewards
from diffalign.tokenizer import clip_tokenizer

PIPELINE = "toy-pipe"
PROMPT_SET = "toy-colours"
REWARD = "toy-redness"
COLOURS = ["a red square", "a green square", "a blue square", "a red disc"]


def load_toy_pipeline(*, torch_dtype: torch.dtype, seed: int):
    """16x16 images from 4x8x8 latents: smaller than tiny-random, so an epoch takes a second."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=16,
        )
    )
    return pipeline.assemble(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet).to(
        torch_dtype
    )


class Redness(torch.nn.Module):
    """Red minus the mean of green and blue, averaged over pixels: in [-1, 1], differentiable."""

    name = REWARD
    differentiable = True

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (images[:, 0] - images[:, 1:].mean(dim=1)).mean(dim=(1, 2))


pipeline.register(PIPELINE, load_toy_pipeline, description="the toy world's tiny random pipeline")
prompts.register(PROMPT_SET, lambda: list(COLOURS), models=(PIPELINE,), world="toy-world")
rewards.register(REWARD, description="toy world: red minus green and blue", differentiable=True)(Redness)
