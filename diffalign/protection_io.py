"""Images and masks for ``diffalign protect``, ``diffalign edit`` and the app: read, check, fit to the model.

The defenses and ``diffalign.inpainting.edit`` take tensors that are already right:
``[3, H, W]`` in [0, 1], a binary ``[1, H, W]`` mask of the same size, sides divisible by the
VAE's downsampling factor. Files and browser uploads are none of that, so this module turns
them into such tensors once, for the command line and the app alike (the app needs gradio,
the command line must not), and says what it changed on the way as *notices* to show the
user instead of changing things silently.

The size an image is processed at (``working_size``):

- Models trained at one small resolution (native side below ``FIXED_RESOLUTION_BELOW``, e.g.
  ShapesWorld's 32 px pipelines and ``tiny-random-inpaint``) only make sense at that size, so
  every image is resized to ``native × native``. The native side is the UNet's
  ``sample_size`` times the VAE's scale factor (latent pixels × pixels per latent pixel).
- Other models (Stable Diffusion inpainting, native 512 px) take any size, but memory and
  time grow with it, so a side above ``MAX_SIDE`` is scaled down, keeping the aspect ratio.
- Both sides are then rounded to a multiple of the VAE's scale factor.

The protected image is written at that working size: it is the image the perturbation was
computed for, and resizing it afterwards would blur the perturbation away.

Masks are images too: white (≥ 50 % grey) marks the region to protect, i.e. the region an
inpainting editor keeps (``keep_mask`` in ``diffalign.inpainting``); transparent pixels count
as black, so a brush layer with transparency works as a mask as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffalign import images
from diffalign.defenses.common import ProtectionError

# Larger images are scaled down: a 1024 px side is twice SD 1.x/2.x's native 512 (four times the
# memory and time per step), and larger sides would only multiply both.
MAX_SIDE = 1024
# A native side below this marks a model trained at one small resolution (ShapesWorld: 32 px),
# where any other size is out of distribution; real inpainting models start at 512 px.
FIXED_RESOLUTION_BELOW = 256


@dataclass
class ModelInputs:
    """An image and its mask at the size the model works at, and what was changed to get there."""

    image: torch.Tensor  # [3, H, W] in [0, 1], 8-bit values
    mask: torch.Tensor  # [1, H, W] binary, 1 = protected (the region an editor keeps)
    notices: list[str] = field(default_factory=list)


def read_image(path: str | Path, *, role: str = "image") -> Image.Image:
    """Open ``path`` through diffalign's one image reader (``diffalign.images.open_image``): upright,
    8-bit RGB or RGBA, every Pillow mode converted by what its values mean; errors name the file."""
    return images.open_image(path, role=role)


def mask_array(mask: Image.Image) -> np.ndarray:
    """``[H, W]`` float in [0, 1]: luminance times opacity, so white = protect and transparent = not."""
    luminance, alpha = np.asarray(mask.convert("LA"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return luminance * alpha


def check_mask(mask: np.ndarray, *, purpose: str = "protect") -> None:
    """Refuse a mask with no pixel ≥ 0.5; ``purpose`` ("protect" or "keep") words the message."""
    if not (mask >= 0.5).any():
        raise ProtectionError(
            f"nothing to {purpose}: the mask has no white pixel (≥ 50% grey). "
            f"Paint the region to {purpose} (e.g. the face) white and the rest black."
        )


def read_image_and_mask(
    image_path: str | Path, mask_path: str | Path, *, purpose: str = "protect"
) -> tuple[Image.Image, np.ndarray]:
    """An image file and its mask file (``[h, w]`` in [0, 1], see ``mask_array``), both checked."""
    image = read_image(image_path)
    mask = mask_array(read_image(mask_path, role="mask"))
    check_mask(mask, purpose=purpose)
    return image, mask


def native_side(pipe: DiffusionPipeline) -> int:
    """The side the model was trained at: UNet ``sample_size`` (latent pixels) × VAE scale factor."""
    sample_size = pipe.unet.config.sample_size
    if not isinstance(sample_size, int):  # some configs store (height, width)
        sample_size = max(sample_size)
    return sample_size * pipe.vae_scale_factor


def working_size(width: int, height: int, *, native: int, factor: int) -> tuple[int, int]:
    """``(width, height)`` a ``width × height`` image is processed at (see the module docstring)."""
    if native < FIXED_RESOLUTION_BELOW:
        return native, native
    scale = min(1.0, MAX_SIDE / max(width, height))
    return (
        max(factor, round(width * scale) // factor * factor),
        max(factor, round(height * scale) // factor * factor),
    )


def fit_to_model(
    pipe: DiffusionPipeline, image: Image.Image, mask: np.ndarray, *, purpose: str = "protect"
) -> ModelInputs:
    """``image`` and ``mask  # [h, w] in [0, 1]`` resized to the model's working size, as tensors.

    The image is resampled with Lanczos; the mask is resampled as a coverage map (bilinear,
    area-averaging when shrinking) and binarised at 0.5, so a pixel is protected when mostly
    covered. A mask of another size than the image is stretched onto it, with a notice.
    """
    notices = []
    if mask.shape != (image.height, image.width):
        notices.append(
            f"the mask is {mask.shape[1]}×{mask.shape[0]} px but the image is "
            f"{image.width}×{image.height} px; resized the mask to the image."
        )
    native = native_side(pipe)
    size = working_size(image.width, image.height, native=native, factor=pipe.vae_scale_factor)
    if size != image.size:
        if native < FIXED_RESOLUTION_BELOW:
            why = (
                f"this model works at its native {native}×{native} px only (UNet sample_size "
                f"{native // pipe.vae_scale_factor} × VAE factor {pipe.vae_scale_factor})"
            )
        elif max(image.size) > MAX_SIDE:
            why = (
                f"the largest side processed is {MAX_SIDE} px, "
                f"and sides must be multiples of {pipe.vae_scale_factor}"
            )
        else:
            why = f"the model needs sides that are multiples of {pipe.vae_scale_factor}"
        notices.append(
            f"the image is {image.width}×{image.height} px; resized it to {size[0]}×{size[1]} px: {why}. "
            "Outputs are written at that size."
        )
    resized = opaque(image).resize(size, Image.Resampling.LANCZOS)
    coverage = Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)  # mode "F"
    binary = np.asarray(coverage) >= 0.5
    if not binary.any():
        raise ProtectionError(
            f"nothing to {purpose}: the marked region vanished when the mask was resized to "
            f"{size[0]}×{size[1]} px; mark a larger region."
        )
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return ModelInputs(image=pixels, mask=torch.from_numpy(binary).float()[None], notices=notices)


def opaque(image: Image.Image) -> Image.Image:
    """``image`` in RGB, transparent parts on white as viewers show them (stored colour is arbitrary)."""
    return images.on_white(images.normalise(image))
