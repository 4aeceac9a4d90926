"""Reading and writing images as the [0, 1] float tensors every reward takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageError(ValueError):
    """An image file is missing, corrupt or not an image."""


def load_image(path: str | Path) -> torch.Tensor:
    """``path`` → ``[3, H, W]`` float in [0, 1]; corrupt files are an error naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError as error:
        raise ImageError(f"image {str(path)!r} does not exist") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageError(f"{str(path)!r} is not a readable image ({error})") from error
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{str(folder)!r} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save ``image  # [3, H, W] in [0, 1]`` as an 8-bit PNG (or the format the suffix names)."""
    from diffalign.plots import to_pil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)
    return path
