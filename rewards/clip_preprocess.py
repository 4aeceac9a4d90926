"""CLIP image preprocessing in torch, so reward gradients reach the pixels.

CLIP-family reward models (CLIP score, LAION aesthetic, PickScore, HPSv2) ship PIL-based
preprocessing: resize, crop or pad, convert to uint8, normalise. PIL breaks the autograd
graph, which AlignProp-style training (Prabhudesai et al. 2023) needs intact from the score
back to the decoded image. This module does the same steps on tensors: bicubic resize with
antialiasing (as PIL does), center crop or pad, and per-channel normalisation, with the
sizes and statistics read from each model's own preprocessing config. Pixels are not
rounded or clamped, since both would zero the gradient; scores therefore differ from the
PIL path only by the uint8 quantisation the PIL path applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class ClipImageTransform:
    """Differentiable ``[B, 3, H, W]`` in [0, 1] -> normalised ``[B, 3, *size]`` model input.

    ``resize_mode`` uses open_clip's names: ``shortest`` resizes so the image covers ``size``
    and center-crops (OpenAI CLIP, PickScore); ``longest`` resizes so it fits inside ``size``
    and pads with ``fill`` (HPSv2); ``squash`` resizes to ``size`` ignoring the aspect ratio.
    ``short_side`` is the length the short side is resized to before cropping in
    ``shortest`` mode, for processors whose resize and crop sizes differ (transformers'
    ``size["shortest_edge"]`` and ``crop_size``); by default the image just covers ``size``.
    """

    size: tuple[int, int]  # (height, width) the vision tower expects
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill: float = 0.0  # in [0, 1] pixel units, like the images
    short_side: int | None = None

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images  # [B, 3, H, W] in [0, 1]`` -> ``pixels  # [B, 3, size[0], size[1]]``, normalised."""
        resized = self.resized_size(*images.shape[-2:])
        images = F.interpolate(
            images, size=resized, mode=self.interpolation, align_corners=False, antialias=True
        )
        images = center_crop_or_pad(images, self.size, self.fill)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, rounded as the reference PIL pipelines round."""
        target_height, target_width = self.size
        if self.resize_mode == "squash":
            return self.size
        if self.resize_mode == "shortest" and (self.short_side is not None or target_height == target_width):
            # torchvision's Resize(int), used by open_clip and transformers alike: the short side
            # becomes exactly `short`, the long side is truncated.
            short = self.short_side or target_height
            if height <= width:
                return short, int(short * width / height)
            return int(short * height / width), short
        # open_clip's ResizeKeepRatio: cover (shortest) or fit inside (longest) the target, rounded.
        ratio = (min if self.resize_mode == "shortest" else max)(height / target_height, width / target_width)
        return round(height / ratio), round(width / ratio)


def center_crop_or_pad(images: torch.Tensor, size: tuple[int, int], fill: float) -> torch.Tensor:
    """Center ``images  # [B, C, H, W]`` in a ``size`` canvas: crop what is larger, pad what is smaller.

    Offsets round like torchvision's ``center_crop``, so the reference PIL pipelines and this
    one take the same pixels.
    """
    height, width = images.shape[-2:]
    target_height, target_width = size
    pad_height, pad_width = max(target_height - height, 0), max(target_width - width, 0)
    if pad_height or pad_width:
        padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
        images = F.pad(images, padding, value=fill)
        height, width = images.shape[-2:]
    top = round((height - target_height) / 2.0)
    left = round((width - target_width) / 2.0)
    return images[..., top : top + target_height, left : left + target_width]
