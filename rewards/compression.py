"""JPEG (in)compressibility rewards, the simplest rewards of DDPO (Black et al. 2023, sec. 6.1).

The score is the size of the image saved as a JPEG at quality 95, in kilobytes (1000 bytes),
exactly as DDPO measures it: minus the size rewards flat, simple images
(``jpeg-compressibility``), plus the size rewards detailed, high-frequency ones
(``jpeg-incompressibility``). They need no model, so they are the sanity check for any
online RL loop: if DDPO cannot move JPEG size, nothing else will move either.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

JPEG_QUALITY = 95  # DDPO's setting


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """Size in kilobytes of each of ``images  # [B, 3, H, W] in [0, 1]`` encoded by PIL as JPEG -> ``[B]``."""
    # Quantise to 8 bits first: the size of the image as it would be saved is what is measured.
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    sizes = []
    for array in pixels.permute(0, 2, 3, 1).cpu().numpy():  # [H, W, 3] uint8 each
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSizeReward(nn.Module):
    """``sign`` times the JPEG size in kilobytes; prompts are ignored.

    A parameterless module, like every reward, so callers can ``.to(device)`` any reward alike.
    Encoding happens in PIL, so there is no gradient: ``differentiable`` is False.
    """

    differentiable = False

    def __init__(self, name: str, sign: float, quality: int = JPEG_QUALITY):
        super().__init__()
        self.name = name
        self.sign = sign
        self.quality = quality

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


def jpeg_compressibility(quality: int = JPEG_QUALITY) -> JpegSizeReward:
    return JpegSizeReward("jpeg-compressibility", sign=-1.0, quality=quality)


def jpeg_incompressibility(quality: int = JPEG_QUALITY) -> JpegSizeReward:
    return JpegSizeReward("jpeg-incompressibility", sign=1.0, quality=quality)
