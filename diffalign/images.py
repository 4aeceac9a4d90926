"""Reading and writing images: the one reader every command, benchmark and the app go through.

``open_image`` turns any file Pillow opens into an upright 8-bit ``RGB`` or ``RGBA`` image,
converting each mode by what its values mean rather than by clipping them:

| Pillow mode | read as |
|---|---|
| ``RGB``, ``L``, ``1``, ``P`` (palette), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` | their RGB colours (Pillow's conversions) |
| ``RGBA``, ``LA``, ``PA``, ``P`` with transparency, ``RGBa`` | RGB colours plus the alpha channel |
| ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grey) | grey, 65535 → 255 (rounded, not clipped at 255) |
| ``I`` (32-bit integer grey) | grey on the 16-bit scale when every value is in 0…65535, else refused |
| 16-bit-per-channel RGB(A) PNGs | Pillow reads them as ``RGB``/``RGBA`` with the high byte of each value |
| ``F`` (32-bit float) and anything else | refused by name: a float image has no agreed range |

Cameras store portrait photos sideways with an EXIF orientation tag; the reader applies it,
so every command sees what an image viewer shows. ``load_image`` then composites transparent
pixels onto white (as viewers show them; the colour stored under a transparent pixel is
arbitrary) and returns the ``[3, H, W]`` float tensor in [0, 1] that every reward takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffalign.errors import DiffalignError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(DiffalignError, ValueError):
    """An image file is missing, corrupt, or of a kind diffalign cannot read faithfully."""


def normalise(image: Image.Image, *, name: str = "image") -> Image.Image:
    """``image`` (any Pillow mode, already upright) as 8-bit ``RGB`` or ``RGBA`` (see the module table)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_GREY:
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(
                f"{name} is a 32-bit integer image (mode I) with values from {values.min():.0f} to "
                f"{values.max():.0f}, outside the 16-bit range 0..65535; save it as an 8- or 16-bit PNG"
            )
        grey = np.round(values / 65535.0 * 255.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise ImageError(
            f"{name} is a 32-bit floating-point image (mode F), which has no agreed range of values; "
            "save it as an 8- or 16-bit PNG or a JPEG"
        )
    if mode == "La":  # premultiplied alpha, which Pillow cannot convert directly
        image = image.convert("LA")
        mode = "LA"
    transparent = mode in _WITH_ALPHA or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    try:
        return image.convert("RGBA" if transparent else "RGB")
    except (ValueError, OSError) as error:
        raise ImageError(
            f"{name} has Pillow mode {mode!r}, which diffalign cannot convert to RGB ({error})"
        ) from error


def open_image(path: str | Path, *, role: str = "image") -> Image.Image:
    """Open ``path`` as an upright 8-bit RGB or RGBA image, or raise an ``ImageError`` naming the file.

    Decoding is forced here so that a truncated file fails now, with its name, and not later
    inside a model. Pillow's decompression-bomb guard is kept: an image that large is an
    error rather than gigabytes of memory.
    """
    path = Path(path)
    name = f"{role} {str(path)!r}"
    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)
            upright.load()
    except FileNotFoundError as error:
        raise ImageError(f"{name} does not exist") from error
    except IsADirectoryError as error:
        raise ImageError(f"{name} is a folder, not an image file") from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name} is too large to open safely ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(
            f"{name} is not a readable image ({error}); expected a PNG, JPEG, WebP, BMP or TIFF file"
        ) from error
    return normalise(upright, name=name)


def on_white(image: Image.Image) -> Image.Image:
    """An RGB(A) image in RGB, transparent parts on white as viewers show them."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit image → ``[3, H, W]`` float in [0, 1] (transparency composited onto white)."""
    array = np.asarray(on_white(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, *, role: str = "image") -> torch.Tensor:
    """``path`` → ``[3, H, W]`` float in [0, 1], through ``open_image``."""
    return to_tensor(open_image(path, role=role))


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{str(folder)!r} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save ``image  # [3, H, W] in [0, 1]`` as an 8-bit PNG (or the format the suffix names), atomically."""
    from diffalign import outputs
    from diffalign.plots import to_pil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with outputs.replacing(path) as temporary:
        to_pil(image).save(temporary, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path


def psnr(reference: torch.Tensor, other: torch.Tensor, *, max_db: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1], in float64: of two ``[3, H, W]``
    images, or the mean over images of two batches ``[..., 3, H, W]`` (each image's PSNR, then the
    mean). Identical images give inf, or ``max_db`` when it is given (a batch mean stays finite)."""
    error = (reference.double() - other.double()).pow(2).flatten(-3).mean(-1)  # [...], per image
    decibels = -10 * torch.log10(error)  # inf where the images are identical
    if max_db is not None:
        decibels = decibels.clamp(max=max_db)
    return float(decibels.mean())
