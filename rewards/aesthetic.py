"""The LAION aesthetic predictor v2, the aesthetic reward of DDPO and AlignProp.

Schuhmann's "improved aesthetic predictor" (the model that filtered LAION-Aesthetics) is a
small MLP trained by MSE on human 1-10 ratings (SAC, LAION-Logos, AVA) of L2-normalised
OpenAI CLIP ViT-L/14 image embeddings; the checkpoint used by DDPO (Black et al. 2023) and
AlignProp (Prabhudesai et al. 2023) is ``sac+logos+ava1-l14-linearMSE.pth``. The score does
not depend on the prompt. Preprocessing runs in torch, so the score is differentiable in the
pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffalign.rewards.checkpoints import TINY_RANDOM, existing_file, seeded
from diffalign.rewards.open_clip_encoder import load_open_clip, pretrained_weights, tiny_open_clip
from torch import nn

CLIP_ARCH, CLIP_PRETRAINED = "ViT-L-14", "openai"
MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
MLP_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
DEFAULT_MLP_PATH = Path("~/.cache/diffalign") / MLP_FILENAME


class AestheticMLP(nn.Module):
    """The predictor head; module names match the checkpoint's keys (``layers.0.weight`` ...).

    The released model is this purely linear stack (no activations, hence "linearMSE");
    dropout only mattered in training.
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds  # [B, embed_dim]``, L2-normalised -> ``[B]`` predicted rating."""
        return self.layers(embeds).squeeze(-1)


class AestheticReward(nn.Module):
    """Predicted human aesthetic rating of each image (roughly 1-10 for the real checkpoint).

    Options: ``checkpoint`` is the MLP file (default
    ``~/.cache/diffalign/sac+logos+ava1-l14-linearMSE.pth``), or ``"tiny-random"`` for a tiny
    random CLIP and MLP; ``clip_checkpoint`` is the OpenAI ViT-L/14 open_clip weights file
    (default: found in the Hugging Face cache); ``device`` (default ``"cpu"``).
    """

    name = "aesthetic"
    differentiable = True

    def __init__(
        self, checkpoint: str = str(DEFAULT_MLP_PATH), clip_checkpoint: str | None = None, device: str = "cpu"
    ):
        super().__init__()
        if checkpoint == TINY_RANDOM:
            self.encoder = tiny_open_clip()
            with seeded():
                self.mlp = AestheticMLP(self.encoder.embed_dim)
        else:
            # Find both files before building anything, so a missing one fails in milliseconds.
            mlp_path = existing_file(
                checkpoint,
                reward=self.name,
                download=f"curl -L --create-dirs -o {DEFAULT_MLP_PATH} '{MLP_URL}'",
            )
            clip_weights = pretrained_weights(
                CLIP_ARCH, CLIP_PRETRAINED, clip_checkpoint, reward=self.name, option="clip_checkpoint"
            )
            self.encoder = load_open_clip(CLIP_ARCH, CLIP_PRETRAINED, clip_weights)
            self.mlp = AestheticMLP()
            self.mlp.load_state_dict(torch.load(mlp_path, map_location="cpu", weights_only=True))
        self.requires_grad_(False).eval().to(device)  # a fixed judge: no dropout, no weight gradients

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.mlp(self.encoder.embed_images(images))
